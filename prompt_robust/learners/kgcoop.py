"""KgCoOp: CoOp's learned context, kept close to CLIP's hand-crafted prompts (Yao et al., "Visual-Language Prompt
Tuning with Knowledge-guided Context Optimization", CVPR 2023, https://arxiv.org/abs/2303.13283)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import ClipBackbone
from ..config import help_field
from .base import LearnerOutput
from .coop import CoOp, CoOpConfig

__all__ = ["KgCoOp", "KgCoOpConfig", "hand_crafted_text_features"]


def hand_crafted_text_features(
    backbone: ClipBackbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    normalize_each: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Frozen CLIP text features of hand-crafted prompts, one row per class, averaged over ``templates``.

    The "knowledge" KgCoOp and PromptSRC regularise towards. Computed without gradients; with several templates
    the features of each class are averaged (CLIP's prompt ensembling normalises each one first,
    ``normalize_each=True``; PromptSRC's reference averages the raw features, ``normalize_each=False``).

    Args:
        backbone: the CLIP backbone.
        classnames: class names.
        templates: prompt templates with one ``{}`` for the class name.
        normalize_each: L2-normalise every template's features before averaging.
        chunk_size: most texts per text pass (None: one pass per template, ``len(classnames)`` texts).

    Returns:
        ``(n_classes, embed_dim)`` L2-normalised features.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> hand_crafted_text_features(tiny_clip_backbone(layers=1), ["cat", "dog"], ["a photo of a {}."]).shape
        torch.Size([2, 32])
    """
    chunk = chunk_size or len(classnames)
    per_template = []
    # plain tensors even when first asked inside inference_mode: they are cached and used in later training steps
    with torch.inference_mode(False), torch.no_grad():
        for template in templates:
            texts = [template.format(name) for name in classnames]
            features = torch.cat(
                [
                    backbone.encode_text(backbone.tokenize(texts[start : start + chunk]))
                    for start in range(0, len(texts), chunk)
                ]
            )  # (n_cls, d)
            per_template.append(F.normalize(features, dim=-1) if normalize_each else features)
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)  # (n_cls, d)


@dataclass
class KgCoOpConfig(CoOpConfig):
    """KgCoOp options. Defaults from the reference code (github.com/htyao89/KgCoOp,
    ``configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml`` and ``scripts/base2new_train.sh``: ``CTX_INIT: True``,
    i.e. "a photo of a", ``N_CTX 4``, ``W 8.0``; the template is its ``CUSTOM_TEMPLATES`` entry for ImageNet and
    generic datasets)."""

    n_ctx: int = help_field(4, "Number of context tokens (ignored when ctx_init is given).", ge=0)
    ctx_init: str | None = help_field("a photo of a", "Initialise the context from these words.")
    lam: float = help_field(
        8.0,
        "Weight of the knowledge-guided term lam * mean_i (1 - cos(w_i, w_i^clip)), i.e. (lam / 2) times the "
        "mean squared L2 distance between the learned and the hand-crafted class text features (paper and "
        "reference: 8.0). 0 gives CoOp.",
        ge=0,
    )
    templates: list[str] = help_field(
        ["a photo of a {}."],
        "Hand-crafted prompts of the frozen CLIP text features the context is kept close to (several: their "
        "features are averaged). The reference uses one per dataset, e.g. 'a photo of a {}, a type of pet.'.",
        min_len=1,
        placeholder="the class name",
    )


class KgCoOp(CoOp):
    """Knowledge-guided Context Optimization: CoOp plus ``lam x`` the distance between the class text features of
    the learned prompt and those of CLIP's hand-crafted prompt, which keeps the context from forgetting CLIP's
    general knowledge (better accuracy on unseen classes).

    Paper: https://arxiv.org/abs/2303.13283

    The paper writes the term as ``lam * (1/N_c) sum_i ||w_i - w_i^clip||^2``; its released code (which produced
    the published numbers with ``W = 8``) computes ``W * (1 - mean_i cos(w_i, w_i^clip))``, half of that for unit
    vectors. This class computes the code's form, so ``lam = 8`` trains as the reference does.

    In training mode :meth:`forward` returns the term as ``LearnerOutput.loss`` (the wrapped model adds it to the
    cross-entropy); with per-sample prompts (``prompt_override``) it averages over samples and classes. Prompt
    site: ``"text"`` as for :class:`~prompt_robust.learners.coop.CoOp`.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = KgCoOp(tiny_clip_backbone(layers=1), ["cat", "dog"])
        >>> out = model.train()(torch.zeros(2, 3, 32, 32))
        >>> out.loss.shape, bool(out.loss < 1e-4)  # the context starts as the hand-crafted "a photo of a"
        (torch.Size([]), True)
    """

    learner_type = "kgcoop"
    config_class = KgCoOpConfig

    def _build_class_state(self) -> None:
        super()._build_class_state()
        # the hand-crafted features of these classes, computed on first use (derived, never saved)
        self.register_buffer("clip_text_features", None, persistent=False)

    def hand_crafted_features(self) -> torch.Tensor:
        """``(n_cls, d)``: frozen CLIP features of the hand-crafted prompts (computed once per class list, from
        the backbone as it is then, as the reference computes them from a frozen copy of CLIP)."""
        if self.clip_text_features is None:
            self.clip_text_features = hand_crafted_text_features(
                self.backbone, self.classnames, self.config.templates, chunk_size=self.config.text_chunk_size
            )
        return self.clip_text_features

    def knowledge_distance(self, text_features: torch.Tensor) -> torch.Tensor:
        """``mean (1 - cos)`` between normalised text features ``(..., n_cls, d)`` and the hand-crafted ones: a
        scalar, ``0`` when they coincide (``= mean ||w - w_clip||^2 / 2``)."""
        clip = self.hand_crafted_features().to(text_features.dtype)  # (n_cls, d)
        return (1.0 - (text_features * clip).sum(dim=-1)).mean()

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        out = super().forward(pixel_values, prompt_override)
        if self.training:
            out.loss = self.config.lam * self.knowledge_distance(out.text_features)
        return out
