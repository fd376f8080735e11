"""CoCoOp: context conditioned on each image by a small meta-network (Zhou et al., "Conditional Prompt
Learning for Vision-Language Models", https://arxiv.org/abs/2203.05557)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import help_field
from .base import ClassPrompts, ContextConfig, LearnerOutput, PromptLearner, cosine_logits, init_context

__all__ = ["CoCoOp", "CoCoOpConfig"]


@dataclass
class CoCoOpConfig(ContextConfig):
    """CoCoOp options (paper defaults: 4 context tokens from "a photo of a", meta-net bottleneck 1/16)."""

    n_ctx: int = help_field(4, "Number of context tokens (ignored when ctx_init is given).", ge=0)
    ctx_init: str | None = help_field("a photo of a", "Initialise the context from these words.")
    meta_ratio: int = help_field(16, "Meta-net bottleneck: hidden = embed_dim // meta_ratio.", ge=1)


class CoCoOp(PromptLearner):
    """Conditional Context Optimization: ``ctx_m(x) = ctx_m + pi(x)``, ``pi`` = Linear-ReLU-Linear meta-net.

    Paper: https://arxiv.org/abs/2203.05557

    Every image gets its own prompts, so text features cost ``batch x n_cls`` text passes (bounded per pass
    by ``text_chunk_size``). Prompt site: ``"text"`` ``(n_ctx, text_width)``; an override replaces the shared
    context and the image's meta-net shift is still added.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = CoCoOp(tiny_clip_backbone(layers=1), ["cat", "dog"])
        >>> model(torch.zeros(3, 3, 32, 32)).text_features.shape
        torch.Size([3, 2, 32])
    """

    learner_type = "cocoop"
    config_class = CoCoOpConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: CoCoOpConfig | None = None) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        ctx, self.n_ctx = init_context(backbone, config.n_ctx, config.ctx_init, backbone.text_width, config.init_std)
        self.ctx = nn.Parameter(ctx.to(backbone.device))
        hidden = max(1, backbone.embed_dim // config.meta_ratio)
        self.meta_net = nn.Sequential(
            nn.Linear(backbone.embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, backbone.text_width)
        ).to(backbone.device)
        self._build_class_state()

    def _build_class_state(self) -> None:
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx)

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        return {"text": self.ctx}

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        batch = pixel_values.shape[0]
        override = self.check_override(prompt_override, batch)
        # The meta-net reads the normalised image feature, as in the reference implementation.
        image = self.plain_image_features(pixel_values)  # (b, d)
        shift = self.meta_net(image.to(self.ctx.dtype)).unsqueeze(1)  # (b, 1, w)
        base = override.get("text", self.ctx.unsqueeze(0))  # (b | 1, n_ctx, w)
        ctx = (base + shift).unsqueeze(1)  # (b, 1, n_ctx, w)
        text = self.encode_prompts(self.prompts, ctx)  # (b, n_cls, d)
        return LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
