"""The conditional velocity network of the refiner: a small transformer over the prompt tokens of every site."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...flows.time import TimeEmbedding
from .config import RefinerConfig

_DEFAULT = RefinerConfig()  # the one source of the network's default settings

__all__ = ["PromptFlowNet"]


class PromptFlowNet(nn.Module):
    """``v(x_t, t, c)``: velocity of every prompt token of every site, given the time and the image feature.

    Each site's tokens are projected to ``hidden_dim`` by their own linear map, get a learned position and site
    embedding, and are modulated (adaptive LayerNorm scale/shift) by the sum of the time and condition
    embeddings before every block of a pre-norm transformer; per-site output maps go back to the site widths.
    The output maps start at zero, so an untrained network predicts zero velocity.

    Args:
        sites: ``{site: (n_tokens, width)}`` of the learner's prompt.
        cond_dim: size of the conditioning image feature.
        hidden_dim: transformer width.
        layers: transformer blocks.
        heads: attention heads (must divide ``hidden_dim``).

    Example:
        >>> net = PromptFlowNet({"text": (4, 32)}, cond_dim=16, hidden_dim=64)
        >>> v = net({"text": torch.zeros(3, 4, 32)}, torch.rand(3), torch.randn(3, 16))
        >>> v["text"].shape
        torch.Size([3, 4, 32])
    """

    def __init__(
        self,
        sites: Mapping[str, tuple[int, int]],
        cond_dim: int,
        hidden_dim: int = _DEFAULT.hidden_dim,
        layers: int = _DEFAULT.layers,
        heads: int = _DEFAULT.heads,
    ) -> None:
        super().__init__()
        if not sites:
            raise ValueError("the learner has no prompt tokens (prompt_tokens() is empty): nothing to refine.")
        if hidden_dim % heads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of heads ({heads}).")
        self.sites = {name: (int(n), int(w)) for name, (n, w) in sites.items()}
        total = sum(n for n, _ in self.sites.values())
        self.hidden_dim = hidden_dim
        self.inputs = nn.ModuleDict({name: nn.Linear(w, hidden_dim) for name, (_, w) in self.sites.items()})
        self.position = nn.Parameter(torch.randn(total, hidden_dim) * 0.02)  # (T, h) over all sites' tokens
        self.time = TimeEmbedding(hidden_dim)
        self.cond = nn.Sequential(nn.Linear(cond_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden_dim, heads, 4 * hidden_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        # adaptive LayerNorm: per block a scale and shift from the (time + condition) embedding
        self.modulation = nn.ModuleList(nn.Linear(hidden_dim, 2 * hidden_dim) for _ in range(layers + 1))
        for mod in self.modulation:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.outputs = nn.ModuleDict({name: nn.Linear(hidden_dim, w) for name, (_, w) in self.sites.items()})
        for layer in self.outputs.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Mapping[str, torch.Tensor], t: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Velocities ``{site: (b, n_tokens, width)}``.

        Args:
            x: ``{site: (b, n_tokens, width)}`` current (normalised) prompts.
            t: ``(b,)`` or 0-dim time in ``[0, 1]``.
            cond: ``(b, cond_dim)`` image features.
        """
        batch = cond.shape[0]
        dtype = self.position.dtype
        tokens = torch.cat([self.inputs[name](x[name].to(dtype)) for name in self.sites], dim=1)  # (b, T, h)
        tokens = tokens + self.position
        context = self.time(t, batch) + self.cond(cond.to(dtype))  # (b, h)
        for block, mod in zip(self.blocks, self.modulation[:-1], strict=True):
            scale, shift = mod(context).unsqueeze(1).chunk(2, dim=-1)  # (b, 1, h) each
            tokens = block(tokens * (1 + scale) + shift)
        scale, shift = self.modulation[-1](context).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.norm(tokens) * (1 + scale) + shift  # (b, T, h)
        out, start = {}, 0
        for name, (n, _) in self.sites.items():
            out[name] = self.outputs[name](tokens[:, start : start + n])  # (b, n, w)
            start += n
        return out
