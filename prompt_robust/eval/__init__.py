"""Evaluation metrics: accuracy, per-group and worst-group accuracy, the average-to-worst gap, base/new HM."""

from .metrics import accuracy, accuracy_gap, harmonic_mean, per_group_accuracy, worst_group_accuracy

__all__ = ["accuracy", "accuracy_gap", "harmonic_mean", "per_group_accuracy", "worst_group_accuracy"]
