"""Ablations: arms, the runner, statistics, reports and exports."""
