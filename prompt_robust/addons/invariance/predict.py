"""Predictors in CLIP's feature space, with or without the CLIP-ICM projection: zero-shot and a linear probe.

CLIP-ICM (https://arxiv.org/abs/2405.15289) predicts in the projected space ``Pᵀz``: zero-shot against the
projected class text features, or with a linear probe trained on projected features. The four variants a
benchmark compares are :func:`compare_predictors`: ``zero_shot``, ``icm_zero_shot``, ``linear_probe`` and
``icm_linear_probe``. ``LinearProbe`` and ``accuracy`` are the library's shared ones
(:class:`prompt_robust.eval.LinearProbe`, :func:`prompt_robust.eval.accuracy`), re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ...config import field_default
from ...eval.metrics import accuracy
from ...eval.probe import LinearProbe
from ...learners.base import cosine_logits
from .config import InvarianceConfig
from .icm import ICMProjection

__all__ = ["LinearProbe", "accuracy", "compare_predictors", "zero_shot_logits"]


def zero_shot_logits(
    image: torch.Tensor,
    text: torch.Tensor,
    projection: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``scale · normalize(Pᵀz) · normalize(Pᵀt)``: zero-shot logits, in the projected space if ``projection``.

    Args:
        image: ``(b, d)`` image features.
        text: ``(n_cls, d)`` class text features, or ``(b, n_cls, d)`` per sample.
        projection: ``P`` ``(d, k)``; None: CLIP's own space.
        scale: logit scale (e.g. ``backbone.logit_scale``).

    Returns:
        ``(b, n_cls)``.

    Example:
        >>> image, text = torch.randn(4, 8), torch.randn(3, 8)
        >>> zero_shot_logits(image, text, torch.eye(8)[:, :2], scale=100.0).shape
        torch.Size([4, 3])
    """
    if image.dim() != 2 or text.dim() not in (2, 3) or text.shape[-1] != image.shape[-1]:
        raise ValueError(
            f"image must be (b, d) and text (n_cls, d) or (b, n_cls, d) with the same d; got {tuple(image.shape)} "
            f"and {tuple(text.shape)}."
        )
    if projection is not None:
        if projection.dim() != 2 or projection.shape[0] != image.shape[-1]:
            raise ValueError(f"projection must be (d={image.shape[-1]}, k); got {tuple(projection.shape)}.")
        projection = projection.to(image.device, image.dtype)
        image = image @ projection  # (b, k)
        text = text @ projection.to(text.dtype)  # (n_cls, k) or (b, n_cls, k)
    return cosine_logits(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)


def compare_predictors(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    icm: ICMProjection,
    text_features: torch.Tensor,
    tests: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    probe_reg: float = field_default(InvarianceConfig, "probe_reg"),
    methods: Sequence[str] = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe"),
) -> dict[str, dict[str, float]]:
    """Accuracy of zero-shot and linear-probe prediction, each without and with the ICM projection.

    Args:
        train_features: ``(n, d)`` features of the (clean) training images (for the probes).
        train_labels: ``(n,)``.
        icm: a fitted :class:`ICMProjection`.
        text_features: ``(n_cls, d)`` class text features (for zero-shot).
        tests: ``{name: (features (n_t, d), labels (n_t,))}``, e.g. one entry per test domain.
        probe_reg: L2 strength of both probes.
        methods: which of the four variants to run.

    Returns:
        ``{method: {test name: accuracy}}``.

    Example:
        >>> z, y = torch.randn(30, 6), torch.arange(30) % 3
        >>> icm = ICMProjection.fit(z, torch.randn(10, 6), lam=1.0, dim=3)
        >>> out = compare_predictors(z, y, icm, torch.randn(3, 6), {"test": (z, y)})
        >>> sorted(out)
        ['icm_linear_probe', 'icm_zero_shot', 'linear_probe', 'zero_shot']
    """
    known = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(known)}.")
    n_cls = text_features.shape[0]
    projection = icm.projection
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        use_icm = method.startswith("icm_")
        proj = projection if use_icm else None
        if method.endswith("zero_shot"):
            out[method] = {
                name: accuracy(zero_shot_logits(z, text_features, proj), y) for name, (z, y) in tests.items()
            }
        else:
            prep = icm.project if use_icm else (lambda x: x)
            probe = LinearProbe(probe_reg).fit(prep(train_features), train_labels, num_classes=n_cls)
            out[method] = {name: probe.score(prep(z), y) for name, (z, y) in tests.items()}
    return out
