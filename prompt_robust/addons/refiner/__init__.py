"""Prompt-space diffusion refiner: velocity network, overfitted targets and the add-on (the ODE sampler, shared with
the counterfactual generator, lives in :mod:`prompt_robust.flows` and is re-exported here)."""

from ...flows import SOLVER_ORDERS, ODESampler, SamplerOutput
from .addon import PromptRefiner
from .config import RefinerConfig
from .network import PromptFlowNet
from .targets import (
    TARGET_RULES,
    RefinerTargets,
    build_targets,
    descend_prompts,
    discover_groups,
    kmeans,
    overfit_prompts,
)

__all__ = [
    "SOLVER_ORDERS",
    "TARGET_RULES",
    "ODESampler",
    "PromptFlowNet",
    "PromptRefiner",
    "RefinerConfig",
    "RefinerTargets",
    "SamplerOutput",
    "build_targets",
    "descend_prompts",
    "discover_groups",
    "kmeans",
    "overfit_prompts",
]
