"""Evaluation metrics: accuracy, per-group and worst-group accuracy, the average-to-worst gap, base/new HM; and the
linear probe."""

from .metrics import accuracy, accuracy_gap, harmonic_mean, per_group_accuracy, worst_group_accuracy
from .probe import LinearProbe

__all__ = ["LinearProbe", "accuracy", "accuracy_gap", "harmonic_mean", "per_group_accuracy", "worst_group_accuracy"]
