"""Curriculum: difficulty scores, stage splits and the stage-aware sampler."""
