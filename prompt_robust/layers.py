"""Small torch helpers shared across the package (the flow networks' time embedding lives in
:mod:`prompt_robust.flows`)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["module_device"]


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
