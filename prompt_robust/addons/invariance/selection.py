"""The rule that picks CLIP-ICM's ``λ`` and ``k`` when the user gives none, from training-domain data only.

The paper (https://arxiv.org/abs/2405.15289) treats ``λ`` and ``k`` as hyper-parameters. Tuning them on the
test domains would leak the distribution shift the method is meant to survive, so here they are chosen on the
*training* images alone:

1. split the training images, per class, into a fit part and a held-out validation part (``val_fraction``);
2. for every relative ``λ`` in the grid (units of ``tr(ZᵀZ/n) / tr(ΔᵀΔ/m)`` on the fit part) and every ``k`` in
   ``dim_fractions · d``, fit the projection on the fit part;
3. score it by the accuracy on the **intervened** copies of the validation images (zero-shot against the base
   template's class text features, or a linear probe trained on the fit part): robustness to the
   interventions, measured on images the fit has not seen;
4. keep the best; ties go to the larger ``k``, then to the smaller ``λ`` (the smallest change to CLIP).

``k = d`` is a rotation of CLIP's space (zero-shot predictions unchanged), so the rule falls back to plain CLIP
when no projection helps on the validation images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ...eval.metrics import accuracy
from ...eval.probe import LinearProbe
from .config import InvarianceConfig
from .features import InterventionalFeatures, split_fit_val
from .icm import ICMProjection, Selection, dims_from_fractions, select_lam_dim
from .predict import zero_shot_logits

_DEFAULT = InvarianceConfig()  # the one source of the selection rule's default settings

__all__ = ["PREDICTORS", "choose_lam_dim", "fit_from_config", "intervention_sets"]

logger = logging.getLogger(__name__)

PREDICTORS = ("zero_shot", "linear_probe")


def intervention_sets(
    image_deltas: torch.Tensor, text_deltas: torch.Tensor | None = None, text_weight: float = _DEFAULT.text_weight
) -> tuple[list[torch.Tensor], list[float]]:
    """The sets of differences in the intervention term and their weights: the image pairs alone, or the image and
    text pairs with shares ``1 - text_weight`` and ``text_weight`` (text pairs at weight 0 are left out).

    Example:
        >>> sets, weights = intervention_sets(torch.ones(4, 2), torch.zeros(3, 2), text_weight=0.25)
        >>> len(sets), weights
        (2, [0.75, 0.25])
    """
    if text_deltas is None or text_weight <= 0:
        return [image_deltas], [1.0]
    return [image_deltas, text_deltas], [1.0 - text_weight, text_weight]


def fit_from_config(
    features: InterventionalFeatures,
    config: InvarianceConfig,
    *,
    text_features: torch.Tensor | None = None,
    text_deltas: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[ICMProjection, Selection | None]:
    """The whole rule of an :class:`~prompt_robust.InvarianceConfig`: ``λ`` and ``k`` as configured, the unset
    ones chosen by :func:`choose_lam_dim` on held-out training images, then the projection fitted on all images
    (and the text pairs, with ``text_weight``).

    Args:
        features: interventional features of the training images.
        config: the settings (``lam``, ``dim``, the grids, ``selection``, ``text_weight``, ...).
        text_features: ``(n_cls, d)`` class text features (needed by ``selection="zero_shot"``).
        text_deltas: ``(m_t, d)`` text-pair differences, or None.
        seed: seed of the held-out split.

    Returns:
        The projection, and the selection (None when both ``lam`` and ``dim`` were given).
    """
    lam, dim, selection = config.lam, config.dim, None
    if lam is None or dim is None:
        selection = choose_lam_dim(
            features,
            lam=lam,
            dim=dim,
            lam_grid=config.lam_grid,
            dim_fractions=config.dim_fractions,
            val_fraction=config.val_fraction,
            predictor=config.selection,
            text_features=text_features,
            probe_reg=config.probe_reg,
            text_deltas=text_deltas,
            text_weight=config.text_weight,
            seed=seed,
        )
        lam, dim = selection.lam, selection.dim
    deltas, weights = intervention_sets(features.deltas(), text_deltas, config.text_weight)
    return ICMProjection.fit(features.clean, deltas, lam=lam, dim=dim, weights=weights), selection


def choose_lam_dim(
    features: InterventionalFeatures,
    *,
    lam: float | None = None,
    dim: int | None = None,
    lam_grid: Sequence[float] = tuple(_DEFAULT.lam_grid),
    dim_fractions: Sequence[float] = tuple(_DEFAULT.dim_fractions),
    val_fraction: float = _DEFAULT.val_fraction,
    predictor: str = _DEFAULT.selection,
    text_features: torch.Tensor | None = None,
    probe_reg: float = _DEFAULT.probe_reg,
    text_deltas: torch.Tensor | None = None,
    text_weight: float = _DEFAULT.text_weight,
    seed: int = 0,
) -> Selection:
    """Choose the relative ``λ`` and ``k`` by the held-out rule of this module.

    Args:
        features: interventional features of the training images.
        lam / dim: a fixed value (only the other one is searched); both None: search both.
        lam_grid: relative ``λ`` candidates.
        dim_fractions: ``k`` candidates as fractions of the feature size.
        val_fraction: share of every class held out.
        predictor: ``"zero_shot"`` (needs ``text_features``) or ``"linear_probe"``.
        text_features: ``(n_cls, d)`` class text features for zero-shot scoring.
        probe_reg: L2 strength of the linear probe.
        text_deltas: ``(m_t, d)`` text-pair differences, added to the intervention term with ``text_weight``.
        text_weight: share of the text pairs in the intervention term.
        seed: seed of the split.

    Returns:
        The :class:`~prompt_robust.addons.invariance.icm.Selection` (relative ``λ``).

    Example:
        >>> sel = choose_lam_dim(feats, text_features=class_text)  # doctest: +SKIP
        >>> sel.lam, sel.dim  # doctest: +SKIP
        (2.0, 256)
    """
    if predictor not in PREDICTORS:
        from ...config import unknown_name_error

        raise unknown_name_error("selection predictor", predictor, PREDICTORS)
    d = features.dim
    lams = [float(lam)] if lam is not None else list(lam_grid)
    dims = [int(dim)] if dim is not None else dims_from_fractions(d, dim_fractions)
    fit_index, val_index = split_fit_val(features.labels, val_fraction, seed)
    fit, val = features.subset(fit_index), features.subset(val_index)
    val_z, val_y = val.intervened_flat()  # (n_val * m, d), (n_val * m,)
    deltas, weights = intervention_sets(fit.deltas(), text_deltas, text_weight)

    if predictor == "zero_shot":
        if text_features is None:
            raise ValueError("zero-shot selection needs the class text features (text_features=(n_cls, d)).")
        text = text_features.detach().to("cpu", torch.float32)

        def score(projection: torch.Tensor) -> float:
            return accuracy(zero_shot_logits(val_z, text, projection), val_y)

    else:
        n_cls = int(features.labels.max()) + 1

        def score(projection: torch.Tensor) -> float:
            probe = LinearProbe(probe_reg).fit(fit.clean @ projection, fit.labels, num_classes=n_cls)
            return probe.score(val_z @ projection, val_y)

    selection = select_lam_dim(fit.clean, deltas, score, lam_grid=lams, dim_grid=dims, weights=weights)
    logger.info(
        "CLIP-ICM: chose lam=%g, dim=%d on %d held-out images x %d interventions (%s accuracy %.3f)",
        selection.lam,
        selection.dim,
        len(val),
        len(features.names),
        predictor,
        selection.score,
    )
    return selection
