"""The conditional flow-matching objective on the straight path from noise to data (Lipman et al., "Flow Matching
for Generative Modeling", https://arxiv.org/abs/2210.02747), shared by the refiner and the counterfactual flow."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["flow_matching_loss"]


def flow_matching_loss(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between ``velocity(x_t, t)`` and the constant velocity ``x_1 - x_0`` of the straight path
    ``x_t = (1 - t) x_0 + t x_1``, with noise ``x_0 ~ N(0, I)`` and one time ``t ~ U[0, 1)`` per row.

    The noise is drawn before the times, and ``velocity`` is called after both: a conditioning it draws at
    random (e.g. classifier-free label dropout from the same ``generator``) comes third in the stream.

    Args:
        velocity: ``v(x_t, t)`` with ``x_t`` shaped like ``x1`` and ``t`` ``(b,)``; returns ``x1``'s shape.
        x1: ``(b, D)`` data points (time 1).
        generator: None: draw on ``x1``'s device from its global RNG; a ``torch.Generator``: draw from it on
            its device (e.g. a seeded CPU generator, for a stream that does not depend on the device) and move.

    Returns:
        The scalar loss.

    Example:
        >>> x1 = torch.randn(8, 3)
        >>> loss = flow_matching_loss(lambda xt, t: torch.zeros_like(xt), x1)  # zero velocity: E|x1 - x0|^2
        >>> loss.shape
        torch.Size([])
    """
    batch, device, dtype = x1.shape[0], x1.device, x1.dtype
    if generator is None:
        x0 = torch.randn_like(x1)
        t = torch.rand(batch, 1, device=device, dtype=dtype)  # (b, 1)
    else:
        x0 = torch.randn(x1.shape, generator=generator, device=generator.device).to(device, dtype)
        t = torch.rand(batch, 1, generator=generator, device=generator.device).to(device, dtype)  # (b, 1)
    xt = (1 - t) * x0 + t * x1
    return F.mse_loss(velocity(xt, t.squeeze(1)), x1 - x0)
