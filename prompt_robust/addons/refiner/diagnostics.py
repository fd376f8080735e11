"""What the refiner's targets and generated offsets encode: do they carry the label, and do they just repeat the
learner's guess? (Reported by ``prompt-robust bench --suite mechanisms``.)

Per-sample targets defined by each sample's own label are decodable back to the label; a generator trained on them
learns "push towards the class I guess" and can only repeat the learner's prediction. These two numbers detect
that, computed from the offsets themselves.
"""

from __future__ import annotations

import torch

__all__ = ["label_decodability", "nearest_class_mean", "prediction_agreement"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()  # (N, D)


def _check(offsets: torch.Tensor, labels: torch.Tensor) -> None:
    if offsets.shape[0] != labels.shape[0] or labels.dim() != 1:
        raise ValueError(
            f"need one label per offset: got offsets of shape {tuple(offsets.shape)} and labels of shape "
            f"{tuple(labels.shape)}."
        )
    if offsets.shape[0] < 2:
        raise ValueError(f"need at least 2 offsets to decode labels from; got {offsets.shape[0]}.")


def _class_sums(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, labels, x)  # (C, D)
    counts = torch.bincount(labels, minlength=n_classes).float()  # (C,)
    return sums, counts


def nearest_class_mean(
    train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, n_classes: int | None = None
) -> torch.Tensor:
    """The class whose mean training offset is nearest (Euclidean) to each query offset.

    Args:
        train: ``(N, ...)`` offsets (flattened per sample).
        train_labels: ``(N,)`` their classes.
        query: ``(M, ...)`` offsets to decode.
        n_classes: number of classes (default: ``max(train_labels) + 1``); classes without training offsets are
            never predicted.

    Returns:
        ``(M,)`` decoded classes.

    Example:
        >>> nearest_class_mean(torch.eye(2), torch.tensor([0, 1]), torch.tensor([[0.9, 0.1]])).tolist()
        [0]
    """
    _check(train, train_labels)
    n_classes = int(train_labels.max()) + 1 if n_classes is None else n_classes
    sums, counts = _class_sums(_flat(train), train_labels, n_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1)  # (C, D)
    dist = torch.cdist(_flat(query), means)  # (M, C)
    dist[:, counts == 0] = float("inf")
    return dist.argmin(1)


def label_decodability(offsets: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out nearest-class-mean accuracy of the offsets: how well a sample's offset names its label.

    Each offset is compared with every class's mean offset, its own class's mean computed without it (a class
    with a single sample cannot be decoded to: its left-out mean does not exist). 1.0: the offsets encode the
    label; about ``1 / n_classes``: they carry none of it.

    Args:
        offsets: ``(N, ...)`` per-sample target offsets (e.g. ``RefinerTargets.deltas[site]``, several sites
            concatenated along the last dimension).
        labels: ``(N,)`` the samples' classes.

    Example:
        >>> label_decodability(torch.eye(3).repeat(2, 1), torch.arange(3).repeat(2))
        1.0
    """
    _check(offsets, labels)
    x = _flat(offsets)
    n_classes = int(labels.max()) + 1
    sums, counts = _class_sums(x, labels, n_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1)  # (C, D)
    dist = torch.cdist(x, means)  # (N, C)
    own_count = counts[labels]  # (N,)
    # the own class's mean without the sample itself
    own_mean = (sums[labels] - x) / (own_count - 1).clamp_min(1).unsqueeze(1)  # (N, D)
    own = (x - own_mean).norm(dim=1)
    own[own_count < 2] = float("inf")
    dist[torch.arange(len(x)), labels] = own
    dist[:, counts == 0] = float("inf")
    return float((dist.argmin(1) == labels).float().mean())


def prediction_agreement(
    train: torch.Tensor, train_labels: torch.Tensor, generated: torch.Tensor, predictions: torch.Tensor
) -> float:
    """How often a generated offset, decoded by the training offsets' class means, names the learner's own
    prediction for that image: near 1.0 means the refiner repeats the learner's guess (its added vote carries
    nothing new).

    Args:
        train / train_labels: the training targets and their classes.
        generated: ``(M, ...)`` offsets the refiner generated for test images.
        predictions: ``(M,)`` the learner's predicted classes for the same images.

    Example:
        >>> train, labels = torch.eye(2), torch.tensor([0, 1])
        >>> prediction_agreement(train, labels, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
        0.5
    """
    if generated.shape[0] != predictions.shape[0]:
        raise ValueError(
            f"need one prediction per generated offset: got {generated.shape[0]} offsets and "
            f"{predictions.shape[0]} predictions."
        )
    n_classes = max(int(train_labels.max()), int(predictions.max())) + 1
    decoded = nearest_class_mean(train, train_labels, generated, n_classes)
    return float((decoded == predictions).float().mean())
