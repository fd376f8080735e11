"""VPT: learned visual prompt tokens inserted after CLS (Jia et al., "Visual Prompt Tuning",
https://arxiv.org/abs/2203.12119)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import _check, help_field
from .base import LearnerConfig, LearnerOutput, PromptLearner, cosine_logits

__all__ = ["VPT", "VPTConfig"]


@dataclass
class VPTConfig(LearnerConfig):
    """VPT options."""

    n_tokens: int = help_field(8, "Visual prompt tokens per layer.", ge=1)
    deep: bool = help_field(False, "VPT-deep (new prompts before every prompted layer) instead of VPT-shallow.")
    depth: int | None = help_field(None, "Prompted layers when deep (None: all layers).", ge=1)
    template: str = help_field(
        "a photo of a {}.", "Fixed text template for the class features.", placeholder="the class name"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth is not None:
            _check(
                self.deep or self.depth == 1,
                f"VPTConfig.depth > 1 requires deep=True (shallow VPT prompts one layer); got depth={self.depth}. Set "
                "deep=True or depth=1.",
            )


class VPT(PromptLearner):
    """Visual Prompt Tuning on the CLIP image tower; the text side is the fixed zero-shot template.

    Paper: https://arxiv.org/abs/2203.12119

    Prompt site: ``"vision"`` of shape ``(depth * n_tokens, vision_width)`` (layer-major).

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = VPT(tiny_clip_backbone(layers=2), ["cat", "dog"], VPTConfig(n_tokens=4, deep=True))
        >>> model.prompt_tokens()["vision"].shape
        torch.Size([8, 32])
    """

    learner_type = "vpt"
    config_class = VPTConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: VPTConfig | None = None) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        layers = backbone.num_vision_layers
        depth = (config.depth or layers) if config.deep else 1
        if depth > layers:
            raise ValueError(f"VPT depth {depth} exceeds the {layers} vision layers of this backbone.")
        self.depth = depth
        # Xavier-uniform range of the paper, computed from the width (the patch size is not exposed uniformly).
        bound = math.sqrt(6.0 / (2 * backbone.vision_width))
        prompts = torch.empty(depth, config.n_tokens, backbone.vision_width).uniform_(-bound, bound)
        self.vision_prompts = nn.Parameter(prompts.to(backbone.device))  # (depth, n_tokens, vw)

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        return {"vision": self.vision_prompts.reshape(-1, self.vision_prompts.shape[-1])}

    def text_features(self) -> torch.Tensor:
        return self.fixed_text_features([self.config.template.format(name) for name in self.classnames])

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        batch = pixel_values.shape[0]
        override = self.check_override(prompt_override, batch)
        if "vision" in override:
            prompts = override["vision"].reshape(batch, self.depth, self.config.n_tokens, -1)  # (b, D, n, vw)
            per_layer = [prompts[:, layer] for layer in range(self.depth)]
        else:
            per_layer = list(self.vision_prompts)  # D x (n, vw)
        deep = {layer: per_layer[layer] for layer in range(1, self.depth)}
        image = self.backbone.encode_image(pixel_values, prompts=per_layer[0], deep_prompts=deep)
        image = F.normalize(image, dim=-1)
        text = self.text_features()
        return LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
