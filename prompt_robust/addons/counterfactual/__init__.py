"""Counterfactual contrastive regularizer (DiCap, https://arxiv.org/abs/2507.19882): a class-conditional
flow-matching model of frozen image features, minimal counterfactuals by inversion and guided re-integration,
their quality metrics, and the add-on (registered as ``"counterfactual"`` on import)."""

from .addon import CounterfactualRegularizer
from .config import CounterfactualConfig
from .feature_flow import FeatureFlow, FeatureFlowNet, FlowFitResult, fit_feature_flow
from .generator import (
    TARGET_MODES,
    CounterfactualCacheInfo,
    CounterfactualGenerator,
    CounterfactualOutput,
    choose_targets,
)
from .metrics import CounterfactualQuality, counterfactual_quality, fit_linear_probe

__all__ = [
    "TARGET_MODES",
    "CounterfactualCacheInfo",
    "CounterfactualConfig",
    "CounterfactualGenerator",
    "CounterfactualOutput",
    "CounterfactualQuality",
    "CounterfactualRegularizer",
    "FeatureFlow",
    "FeatureFlowNet",
    "FlowFitResult",
    "choose_targets",
    "counterfactual_quality",
    "fit_feature_flow",
    "fit_linear_probe",
]
