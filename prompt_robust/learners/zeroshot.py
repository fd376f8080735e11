"""Zero-shot CLIP: hand-written prompt templates, nothing learned (Radford et al., https://arxiv.org/abs/2103.00020)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import help_field
from .base import LearnerConfig, LearnerOutput, PromptLearner, cosine_logits

__all__ = ["ZeroShotCLIP", "ZeroShotConfig"]


@dataclass
class ZeroShotConfig(LearnerConfig):
    """Zero-shot CLIP options."""

    templates: list[str] = help_field(
        ["a photo of a {}."],
        "Prompt templates; features are averaged over them.",
        min_len=1,
        placeholder="the class name",
    )


class ZeroShotCLIP(PromptLearner):
    """CLIP with fixed prompts: the baseline every learner is compared with.

    Paper: https://arxiv.org/abs/2103.00020

    Args:
        backbone: a :class:`~prompt_robust.backbones.ClipBackbone`.
        classnames: class names.
        config: :class:`ZeroShotConfig`.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = ZeroShotCLIP(tiny_clip_backbone(layers=1), ["cat", "dog"])
        >>> model(torch.zeros(2, 3, 32, 32)).logits.shape
        torch.Size([2, 2])
    """

    learner_type = "zeroshot"
    config_class = ZeroShotConfig

    def text_features(self) -> torch.Tensor:
        """``(n_cls, d)`` class features averaged over templates (each normalised first, as in CLIP)."""
        templates = self.config.templates
        texts = [template.format(name) for name in self.classnames for template in templates]
        features = self.fixed_text_features(texts).reshape(len(self.classnames), len(templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        self.check_override(prompt_override, pixel_values.shape[0])
        image = self.plain_image_features(pixel_values)
        text = self.text_features()
        return LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
