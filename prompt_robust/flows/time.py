"""The time input of the flow networks: sinusoidal features of ``t`` and the learned map that embeds them."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TimeEmbedding", "time_embedding"]


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of times ``t`` in ``[0, 1]``: ``(b,) -> (b, dim)`` (the flow networks' time input).

    Args:
        t: ``(b,)`` times.
        dim: feature size (odd sizes get a zero last column).

    Example:
        >>> time_embedding(torch.tensor([0.0, 1.0]), 5).shape
        torch.Size([2, 5])
    """
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    angles = 1000.0 * t.float().unsqueeze(-1) * freqs  # (b, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)


class TimeEmbedding(nn.Sequential):
    """``t -> Linear(SiLU(Linear(time_embedding(t))))``: the time part of a flow network's conditioning.

    A :class:`torch.nn.Sequential` (``Linear``, ``SiLU``, ``Linear``), so its weights are saved as ``0.weight``,
    ``2.weight``, ... under whatever name the network gives it. A single time (0-dim or one element) is shared
    by the whole batch.

    Args:
        dim: width of the sinusoidal features and of the output.

    Example:
        >>> embed = TimeEmbedding(16)
        >>> embed(torch.tensor(0.5), batch=3).shape, embed(torch.rand(3), batch=3).shape
        (torch.Size([3, 16]), torch.Size([3, 16]))
    """

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """``(batch, dim)`` embeddings of ``t`` (``(batch,)``, or 0-dim / one element for the whole batch)."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        return super().forward(time_embedding(t, self.dim).to(self[0].weight.dtype))  # (batch, dim)
