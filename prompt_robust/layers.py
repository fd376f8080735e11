"""Small torch helpers shared across the package (the flow networks' time embedding lives in
:mod:`prompt_robust.flows`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["module_device", "non_finite"]


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter; the CPU for a module without parameters.

    Args:
        module: any module (a learner, a wrapped model).

    Example:
        >>> module_device(torch.nn.Linear(2, 2)), module_device(torch.nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def non_finite(tensors: Mapping[str, torch.Tensor | None]) -> list[str]:
    """Names of the floating-point (or complex) tensors holding a NaN or an infinity, with one device sync for all
    of them; None and empty tensors are skipped.

    Args:
        tensors: ``{name: tensor}`` (weights, gradients, targets).

    Example:
        >>> non_finite({"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")]), "c": torch.arange(3)})
        ['b']
    """
    items = [
        (name, t)
        for name, t in tensors.items()
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.numel()
    ]
    if not items:
        return []
    device = items[0][1].device
    flags = torch.stack([torch.isfinite(t.detach()).all().to(device) for _, t in items]).tolist()
    return [name for (name, _), ok in zip(items, flags, strict=True) if not ok]
