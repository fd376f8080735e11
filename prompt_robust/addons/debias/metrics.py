"""Group-robustness metrics of a debiasing run: average and worst-group accuracy and their gap (reusing
:mod:`prompt_robust.eval.metrics`), plus the accuracy of the pseudo-labels."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ...attributes import pseudo_label_accuracy
from ...eval.metrics import accuracy, accuracy_gap, per_group_accuracy, worst_group_accuracy

__all__ = ["group_robustness", "pseudo_label_accuracy"]


def group_robustness(
    predictions: Sequence[int] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    groups: Sequence[Hashable] | torch.Tensor,
    group_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Average accuracy, worst-group accuracy, their gap and the per-group accuracies (Sagawa et al.,
    https://arxiv.org/abs/1911.08731; DPT reports the same, https://arxiv.org/abs/2503.08368).

    Args:
        predictions: ``(n,)`` predicted classes.
        labels: ``(n,)`` true classes.
        groups: ``(n,)`` true group ids (e.g. ``test.groups`` of the Waterbirds/CelebA loaders or the embedded
            spurious task).
        group_names: names indexed by group id, used as keys of ``per_group`` when given.

    Returns:
        ``{"avg", "worst_group", "gap", "per_group"}``.

    Example:
        >>> group_robustness([0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1])["worst_group"]
        0.5
    """
    per_group = per_group_accuracy(predictions, labels, groups)
    avg, worst = accuracy(predictions, labels), worst_group_accuracy(per_group)
    if group_names is not None:
        per_group = {group_names[int(g)]: acc for g, acc in per_group.items()}
    return {"avg": avg, "worst_group": worst, "gap": accuracy_gap(avg, worst), "per_group": per_group}
