"""CoOp: learned context vectors for the text prompt (Zhou et al., "Learning to Prompt for Vision-Language
Models", https://arxiv.org/abs/2109.01134)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import help_field
from .base import ClassPrompts, ContextConfig, LearnerOutput, PromptLearner, cosine_logits, init_context

__all__ = ["CoOp", "CoOpConfig"]


@dataclass
class CoOpConfig(ContextConfig):
    """CoOp options (defaults of the paper's few-shot setting, 16 context tokens, class token at the end)."""

    class_specific: bool = help_field(False, "One context per class (CSC) instead of one shared context.")
    class_token_position: str = help_field(
        "end",
        "Where the class name goes: end, middle or front.",
        choices=ClassPrompts.POSITIONS,
        kind="class token position",
    )


class CoOp(PromptLearner):
    """Context Optimization: ``[V]_1 ... [V]_M [CLASS].`` with learned ``[V]`` vectors.

    Paper: https://arxiv.org/abs/2109.01134

    Prompt site: ``"text"`` of shape ``(n_ctx, text_width)``; class-specific context flattens its
    ``(n_cls, n_ctx, w)`` tensor to ``(n_cls * n_ctx, w)``.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> coop = CoOp(tiny_clip_backbone(layers=1), ["cat", "dog"], CoOpConfig(ctx_init="a photo of a"))
        >>> coop.prompt_tokens()["text"].shape
        torch.Size([4, 32])
    """

    learner_type = "coop"
    config_class = CoOpConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: CoOpConfig | None = None) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        ctx, self.n_ctx = init_context(backbone, config.n_ctx, config.ctx_init, backbone.text_width, config.init_std)
        if config.class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)  # (n_cls, n_ctx, w)
        self.ctx = nn.Parameter(ctx.to(backbone.device))
        self._build_class_state()

    def _build_class_state(self) -> None:
        if self.config.class_specific and self.ctx.shape[0] != len(self.classnames):
            raise ValueError(
                f"class-specific CoOp learned one context per class for {self.ctx.shape[0]} classes; it cannot "
                f"predict {len(self.classnames)} other classes. Use a shared context (class_specific=False) to "
                "transfer to new classes."
            )
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx, self.config.class_token_position)

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        return {"text": self.ctx.reshape(-1, self.ctx.shape[-1])}

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        override = self.check_override(prompt_override, pixel_values.shape[0])
        image = self.plain_image_features(pixel_values)  # (b, d)
        if "text" in override:
            # (b, n_tokens, w) -> (b, n_cls | 1, n_ctx, w)
            ctx = override["text"].reshape(pixel_values.shape[0], -1, self.n_ctx, self.ctx.shape[-1])
        else:
            ctx = self.ctx if self.config.class_specific else self.ctx.unsqueeze(0)  # (n_cls | 1, n_ctx, w)
        text = self.encode_prompts(self.prompts, ctx)  # (n_cls, d) or (b, n_cls, d)
        return LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
