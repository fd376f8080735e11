"""Invariant causal mechanism (CLIP-ICM, https://arxiv.org/abs/2405.15289): interventions, the closed-form
invariant projection, zero-shot and linear-probe prediction in the projected space, and the add-on.

Importing this package registers the ``"invariance"`` add-on (``RobustConfig(invariance=InvarianceConfig())``).
"""

from .addon import InvariantProjection
from .config import InvarianceConfig
from .features import InterventionalFeatures, interventional_features, split_fit_val
from .icm import (
    ICMProjection,
    Selection,
    dims_from_fractions,
    intervention_covariance,
    lam_scale,
    second_moment,
    select_lam_dim,
)
from .interventions import IMAGE_INTERVENTIONS, ImageIntervention, get_intervention, intervene, text_deltas, text_pairs
from .predict import compare_predictors, zero_shot_logits
from .selection import choose_lam_dim

__all__ = [
    "IMAGE_INTERVENTIONS",
    "ICMProjection",
    "ImageIntervention",
    "InterventionalFeatures",
    "InvarianceConfig",
    "InvariantProjection",
    "Selection",
    "choose_lam_dim",
    "compare_predictors",
    "dims_from_fractions",
    "get_intervention",
    "intervene",
    "intervention_covariance",
    "interventional_features",
    "lam_scale",
    "second_moment",
    "select_lam_dim",
    "split_fit_val",
    "text_deltas",
    "text_pairs",
    "zero_shot_logits",
]
