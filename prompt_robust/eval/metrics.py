"""Small, pure metric functions shared by ``evaluate``, the benchmarks and the CLI.

Predictions and labels are class indices (1-D tensors or sequences of ints); group ids are any hashable values
(ints after conversion from tensors). Accuracies are fractions in [0, 1].

- base/new harmonic mean: CoCoOp, "Conditional Prompt Learning for Vision-Language Models",
  https://arxiv.org/abs/2203.05557
- worst-group accuracy and the average-to-worst gap: Sagawa et al., "Distributionally Robust Neural Networks",
  https://arxiv.org/abs/1911.08731
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

__all__ = ["accuracy", "accuracy_gap", "harmonic_mean", "per_group_accuracy", "worst_group_accuracy"]

_Ints = Sequence[int] | torch.Tensor


def _as_list(name: str, values: _Ints | Sequence[Hashable]) -> list:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one entry per example); got shape {tuple(values.shape)}.")
        return values.tolist()
    return list(values)


def _paired(predictions: _Ints, labels: _Ints) -> tuple[list, list]:
    preds, labs = _as_list("predictions", predictions), _as_list("labels", labels)
    if len(preds) != len(labs):
        raise ValueError(f"predictions and labels differ in length: {len(preds)} vs {len(labs)}.")
    if not preds:
        raise ValueError("cannot compute an accuracy over zero examples; got empty predictions and labels.")
    return preds, labs


def accuracy(predictions: _Ints, labels: _Ints) -> float:
    """Fraction of predictions equal to the labels (the library's one top-1 accuracy).

    Args:
        predictions: predicted class indices ``(n,)``, or class scores ``(n, n_classes)`` (e.g. logits), of which
            the highest-scoring class is the prediction.
        labels: true class indices, ``(n,)``.

    Example:
        >>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
        0.75
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))  # logits
        0.5
    """
    if isinstance(predictions, torch.Tensor) and predictions.dim() == 2:
        predictions = predictions.argmax(dim=-1)  # (n,)
    preds, labs = _paired(predictions, labels)
    return sum(p == y for p, y in zip(preds, labs, strict=True)) / len(labs)


def per_group_accuracy(predictions: _Ints, labels: _Ints, groups: _Ints | Sequence[Hashable]) -> dict[Hashable, float]:
    """Accuracy within each group, keyed by group id in sorted order.

    Args:
        predictions: predicted class indices, ``(n,)``.
        labels: true class indices, ``(n,)``.
        groups: group id of each example, ``(n,)`` (e.g. a (class, attribute) pair encoded as one int).

    Example:
        >>> per_group_accuracy([0, 1, 1, 0], [0, 1, 0, 0], groups=[0, 0, 1, 1])
        {0: 1.0, 1: 0.5}
    """
    preds, labs = _paired(predictions, labels)
    group_ids = _as_list("groups", groups)
    if len(group_ids) != len(labs):
        raise ValueError(f"groups and labels differ in length: {len(group_ids)} vs {len(labs)}.")
    correct: dict[Hashable, int] = {}
    total: dict[Hashable, int] = {}
    for p, y, g in zip(preds, labs, group_ids, strict=True):
        correct[g] = correct.get(g, 0) + int(p == y)
        total[g] = total.get(g, 0) + 1
    try:
        order = sorted(total)
    except TypeError:  # mixed, unorderable ids: keep first-seen order
        order = list(total)
    return {g: correct[g] / total[g] for g in order}


def worst_group_accuracy(per_group: Mapping[Hashable, float]) -> float:
    """Lowest accuracy over groups.

    Args:
        per_group: group id -> accuracy, as returned by :func:`per_group_accuracy`.

    Example:
        >>> worst_group_accuracy({0: 1.0, 1: 0.5})
        0.5
    """
    if not per_group:
        raise ValueError("worst_group_accuracy needs at least one group; got an empty mapping.")
    return min(per_group.values())


def accuracy_gap(average: float, worst: float) -> float:
    """Average accuracy minus worst-group accuracy (lower is more robust).

    Args:
        average: overall (example-weighted) accuracy.
        worst: worst-group accuracy.

    Example:
        >>> accuracy_gap(0.75, 0.5)
        0.25
    """
    return average - worst


def harmonic_mean(base: float, new: float) -> float:
    """Harmonic mean of base- and new-class accuracy, HM = 2·base·new / (base + new) (0 when both are 0).

    Args:
        base: accuracy on the classes seen in training.
        new: accuracy on held-out classes.

    Example:
        >>> round(harmonic_mean(0.8, 0.6), 6)
        0.685714
    """
    for name, value in (("base", base), ("new", new)):
        if value < 0:
            raise ValueError(f"{name} accuracy must be >= 0; got {value!r}.")
    if base + new == 0:
        return 0.0
    return 2 * base * new / (base + new)
