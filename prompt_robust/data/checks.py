"""Cheap checks of what enters training: a dtype test of the images and the min/max of the labels.

Two mistakes train silently without them: raw integer images (``uint8`` 0..255) are cast to float by the first
layer without being scaled or normalised, and a label of ``-100`` is torch's ``ignore_index``, so
``cross_entropy`` skips that sample (a batch of only ``-100`` labels even has loss 0).
:class:`~prompt_robust.RobustPromptModel` runs :func:`check_batch` at the top of every ``forward``; the refiner's
target pass runs it on every batch it reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["check_batch", "check_labels", "check_pixel_values", "class_count"]


def check_pixel_values(pixel_values: Any) -> None:
    """Refuse images that are not a floating-point tensor (raw ``uint8`` or integer images).

    Args:
        pixel_values: ``(batch, 3, H, W)`` images, normalised with the backbone's mean and std.

    Raises:
        TypeError: not a tensor, or a tensor of a non-floating dtype.

    Example:
        >>> check_pixel_values(torch.zeros(1, 3, 4, 4))  # fine, returns None
        >>> check_pixel_values(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: pixel_values has dtype torch.uint8; ...
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a float tensor (batch, 3, H, W); got {type(pixel_values).__name__}. Load images "
            "with a transform from prompt_robust.data.transform_for(backbone)."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}; the model needs floating-point images normalised with "
            "the backbone's mean and std (raw integer images would be cast without scaling or normalisation). "
            "Read images with prompt_robust.data.transform_for(backbone) (PIL image -> normalised float tensor), "
            "or convert a uint8 tensor with (x.float() / 255 - mean) / std using backbone.image_mean and "
            "backbone.image_std."
        )


def check_labels(labels: Any, num_classes: int | None = None) -> None:
    """Refuse labels that ``cross_entropy`` would ignore or reject: negative ones (``-100`` is its
    ``ignore_index``), ones ``>= num_classes`` and 1-D floating labels. 2-D floating labels (class probabilities)
    pass unchecked.

    Args:
        labels: ``(batch,)`` integer class indices; None (no labels) passes.
        num_classes: the learner's class count; None checks only the lower bound.

    Raises:
        TypeError: not a tensor, or 1-D labels that are not integers.
        ValueError: a label outside ``[0, num_classes)``.

    Example:
        >>> check_labels(torch.tensor([0, 2]), num_classes=3)  # fine, returns None
        >>> check_labels(torch.tensor([0, -100]), num_classes=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices in [0, 3); got -100 (1 of 2 labels negative). ...
    """
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of class indices (batch,); got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        if labels.is_floating_point() and labels.dim() == 2:  # soft targets: (batch, n_classes) probabilities
            return
        raise TypeError(
            f"labels must be integer class indices (batch,) (e.g. torch.long); got dtype {labels.dtype} with shape "
            f"{tuple(labels.shape)}. Convert them with labels.long(), or pass (batch, n_classes) probabilities."
        )
    if labels.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(labels))
    allowed = f"[0, {num_classes})" if num_classes is not None else "[0, n_classes)"
    if low < 0:
        n_bad = int((labels < 0).sum())
        raise ValueError(
            f"labels must be class indices in {allowed}; got {low} ({n_bad} of {labels.numel()} labels negative). "
            "A negative label is never a class: -100 is cross_entropy's ignore_index, which would silently skip "
            "those samples (and train with loss 0 on a batch of only -100). Drop unlabelled samples from the "
            "dataset or give them their class index."
        )
    if num_classes is not None and high >= num_classes:
        n_bad = int((labels >= num_classes).sum())
        raise ValueError(
            f"labels must be class indices in {allowed}; got {high} ({n_bad} of {labels.numel()} labels too "
            f"large) but the learner has {num_classes} classes. Relabel the dataset to 0..{num_classes - 1} or build "
            "the learner with every class name."
        )


def check_batch(pixel_values: Any, labels: Any = None, num_classes: int | None = None) -> None:
    """:func:`check_pixel_values` and :func:`check_labels` of one batch (one dtype test and one min/max).

    Args:
        pixel_values: ``(batch, 3, H, W)`` normalised images.
        labels: ``(batch,)`` class indices, or None.
        num_classes: the learner's class count (see :func:`class_count`), or None.

    Example:
        >>> check_batch(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), num_classes=2)  # fine, returns None
    """
    check_pixel_values(pixel_values)
    check_labels(labels, num_classes)


def class_count(learner: Any) -> int | None:
    """The number of classes a learner predicts, from its ``classnames`` list; None when it has none.

    Example:
        >>> class Learner:
        ...     classnames = ["cat", "dog"]
        >>> class_count(Learner()), class_count(object())
        (2, None)
    """
    names = getattr(learner, "classnames", None)
    if isinstance(names, Sequence) and not isinstance(names, str):
        return len(names)
    return None
