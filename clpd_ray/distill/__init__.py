"""Distillation in torch only: losses, models, the training helpers and the teacher ladder."""
