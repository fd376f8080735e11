"""MaPLe: deep language prompts coupled to vision prompts (Khattak et al., "MaPLe: Multi-modal Prompt
Learning", https://arxiv.org/abs/2210.03117)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import help_field
from .base import ClassPrompts, ContextConfig, LearnerOutput, PromptLearner, cosine_logits, init_context

__all__ = ["MaPLe", "MaPLeConfig"]


@dataclass
class MaPLeConfig(ContextConfig):
    """MaPLe options (paper: 2 tokens, depth 9 of 12; depth is capped at the backbone's layer count)."""

    n_ctx: int = help_field(2, "Prompt tokens per layer (ignored when ctx_init is given).", ge=0)
    ctx_init: str | None = help_field("a photo of a", "Initialise the first-layer text prompt from these words.")
    depth: int = help_field(9, "Number of prompted layers in both towers (capped at the backbone depth).", ge=1)


class MaPLe(PromptLearner):
    """Multi-modal Prompt Learning: text prompts at the first ``depth`` layers, vision prompts obtained from
    them through per-layer linear coupling functions ``F_j: text_width -> vision_width``.

    Paper: https://arxiv.org/abs/2210.03117

    Prompt site: ``"text"`` of shape ``(depth * n_ctx, text_width)`` (layer-major). Per-sample overrides
    give per-sample vision prompts too, through the coupling.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = MaPLe(tiny_clip_backbone(layers=2), ["cat", "dog"])
        >>> model.prompt_tokens()["text"].shape  # depth capped at 2 layers, 4 tokens from "a photo of a"
        torch.Size([8, 32])
    """

    learner_type = "maple"
    config_class = MaPLeConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: MaPLeConfig | None = None) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        self.depth = min(config.depth, backbone.num_text_layers, backbone.num_vision_layers)
        first, self.n_ctx = init_context(backbone, config.n_ctx, config.ctx_init, backbone.text_width, config.init_std)
        deeper = torch.randn(self.depth - 1, self.n_ctx, backbone.text_width) * config.init_std
        self.text_prompts = nn.Parameter(torch.cat([first.unsqueeze(0), deeper]).to(backbone.device))  # (J, n, w)
        self.coupling = nn.ModuleList(
            nn.Linear(backbone.text_width, backbone.vision_width) for _ in range(self.depth)
        ).to(backbone.device)
        self._build_class_state()

    def _build_class_state(self) -> None:
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx)

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        return {"text": self.text_prompts.reshape(-1, self.text_prompts.shape[-1])}

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        batch = pixel_values.shape[0]
        override = self.check_override(prompt_override, batch)
        if "text" in override:
            text_prompts = override["text"].reshape(batch, self.depth, self.n_ctx, -1)  # (b, J, n, w)
            layers = [text_prompts[:, j] for j in range(self.depth)]  # J x (b, n, w)
            ctx = layers[0].unsqueeze(1)  # (b, 1, n, w)
        else:
            layers = list(self.text_prompts)  # J x (n, w)
            ctx = layers[0].unsqueeze(0)  # (1, n, w)
        vision = [coupling(layer) for coupling, layer in zip(self.coupling, layers, strict=True)]  # J x (b | -, n, vw)
        image = self.backbone.encode_image(
            pixel_values, prompts=vision[0], deep_prompts={j: vision[j] for j in range(1, self.depth)}
        )
        image = F.normalize(image, dim=-1)
        text = self.encode_prompts(self.prompts, ctx, deep_prompts={j: layers[j] for j in range(1, self.depth)})
        return LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
