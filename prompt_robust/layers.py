"""Small building blocks shared by the add-ons' networks."""

from __future__ import annotations

import math

import torch

__all__ = ["time_embedding"]


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of times ``t`` in ``[0, 1]``: ``(b,) -> (b, dim)`` (the flow networks' time input).

    Example:
        >>> time_embedding(torch.tensor([0.0, 1.0]), 5).shape
        torch.Size([2, 5])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs  # (b, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
