"""MaPLe: deep language prompts coupled to vision prompts (Khattak et al., "MaPLe: Multi-modal Prompt
Learning", https://arxiv.org/abs/2210.03117)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import help_field
from .base import ClassPrompts, ContextConfig, LearnerOutput, PromptLearner, cosine_logits, init_context

__all__ = ["MaPLe", "MaPLeConfig"]


@dataclass
class MaPLeConfig(ContextConfig):
    """MaPLe options (paper: 2 tokens, depth 9 of 12; depth is capped at the backbone's layer count).

    The default layout is the paper's and its repository's (``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx
    .yaml``, ``trainers/maple.py``): the prompt reads "a photo of a {class}.", the first ``n_ctx`` = 2 tokens
    ("a photo") are learned, "of a" stays fixed text. ``ctx_layout="all"`` learns every token of ``ctx_init``
    instead (``n_ctx`` becomes its token count, 4 for "a photo of a"), as CoOp does with a context init.
    """

    n_ctx: int = help_field(
        2, "Learned prompt tokens per layer (with ctx_layout='paper': the first n_ctx tokens of ctx_init).", ge=0
    )
    ctx_init: str | None = help_field("a photo of a", "Initialise the first-layer text prompt from these words.")
    depth: int = help_field(9, "Number of prompted layers in both towers (capped at the backbone depth).", ge=1)
    ctx_layout: str = help_field(
        "paper",
        "How ctx_init becomes the prompt: paper (its first n_ctx tokens learned, the rest fixed text, as MaPLe's "
        "reference) or all (every token of ctx_init learned; n_ctx is ignored).",
        choices="LAYOUTS",
        kind="MaPLe context layout",
    )

    LAYOUTS: ClassVar[tuple[str, ...]] = ("paper", "all")


class MaPLe(PromptLearner):
    """Multi-modal Prompt Learning: text prompts at the first ``depth`` layers, vision prompts obtained from
    them through per-layer linear coupling functions ``F_j: text_width -> vision_width``.

    Paper: https://arxiv.org/abs/2210.03117

    Prompt site: ``"text"`` of shape ``(depth * n_ctx, text_width)`` (layer-major). Per-sample overrides
    give per-sample vision prompts too, through the coupling.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = MaPLe(tiny_clip_backbone(layers=2), ["cat", "dog"])
        >>> model.prompt_tokens()["text"].shape  # depth capped at 2 layers, 2 tokens ("a photo") per layer
        torch.Size([4, 32])
    """

    learner_type = "maple"
    config_class = MaPLeConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: MaPLeConfig | None = None) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        self.depth = min(config.depth, backbone.num_text_layers, backbone.num_vision_layers)
        # the paper's layout: the first n_ctx tokens of ctx_init learned, its other words fixed text (ClassPrompts)
        self._fixed_prefix = config.ctx_init if config.ctx_init and config.ctx_layout == "paper" else None
        first, self.n_ctx = init_context(
            backbone,
            config.n_ctx,
            config.ctx_init,
            backbone.text_width,
            config.init_std,
            first_tokens=self._fixed_prefix is not None,
        )
        deeper = torch.randn(self.depth - 1, self.n_ctx, backbone.text_width) * config.init_std
        self.text_prompts = nn.Parameter(torch.cat([first.unsqueeze(0), deeper]).to(backbone.device))  # (J, n, w)
        self.coupling = nn.ModuleList(
            nn.Linear(backbone.text_width, backbone.vision_width) for _ in range(self.depth)
        ).to(backbone.device)
        self._build_class_state()

    def _build_class_state(self) -> None:
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx, prefix=self._fixed_prefix)

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
