"""Reference prompt learners and the registry that builds them by name.

Adding a learner = one module here + one line in ``LEARNERS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backbones.base import ClipBackbone
from ..config import unknown_name_error
from .base import ClassPrompts, LearnerConfig, LearnerOutput, PromptLearner, PromptLearnerProtocol
from .cocoop import CoCoOp, CoCoOpConfig
from .coop import CoOp, CoOpConfig
from .kgcoop import KgCoOp, KgCoOpConfig
from .maple import MaPLe, MaPLeConfig
from .promptsrc import GaussianPromptAggregation, PromptSRC, PromptSRCConfig
from .vpt import VPT, VPTConfig
from .zeroshot import ZeroShotCLIP, ZeroShotConfig

__all__ = [
    "LEARNERS",
    "VPT",
    "ClassPrompts",
    "CoCoOp",
    "CoCoOpConfig",
    "CoOp",
    "CoOpConfig",
    "GaussianPromptAggregation",
    "KgCoOp",
    "KgCoOpConfig",
    "LearnerConfig",
    "LearnerOutput",
    "MaPLe",
    "MaPLeConfig",
    "PromptLearner",
    "PromptLearnerProtocol",
    "PromptSRC",
    "PromptSRCConfig",
    "VPTConfig",
    "ZeroShotCLIP",
    "ZeroShotConfig",
    "build_learner",
]

LEARNERS: dict[str, type[PromptLearner]] = {
    cls.learner_type: cls for cls in (ZeroShotCLIP, CoOp, CoCoOp, VPT, MaPLe, KgCoOp, PromptSRC)
}


def build_learner(
    name: str,
    backbone: ClipBackbone,
    classnames: Sequence[str],
    config: LearnerConfig | dict[str, Any] | None = None,
    **overrides: Any,
) -> PromptLearner:
    """Build a reference learner by name.

    Args:
        name: one of ``zeroshot``, ``coop``, ``cocoop``, ``vpt``, ``maple``, ``kgcoop``, ``promptsrc``.
        backbone: the CLIP backbone.
        classnames: class names to predict.
        config: the learner's config object or a dict of its fields (None: defaults).
        **overrides: config fields to change, e.g. ``n_ctx=4``.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4).n_ctx
        4
    """
    if name not in LEARNERS:
        raise unknown_name_error("learner", name, list(LEARNERS))
    cls = LEARNERS[name]
    if isinstance(config, LearnerConfig):
        fields = {**config.to_dict(), **overrides}
    else:
        fields = {**(config or {}), **overrides}
    return cls(backbone, classnames, cls.config_class.from_dict(fields))
