"""Prompt-space diffusion refiner: velocity network, overfitted targets and the add-on (the ODE sampler, shared with
the counterfactual generator, lives in :mod:`prompt_robust.flows` and is re-exported here)."""

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
    "TARGET_RULES",
    "PromptFlowNet",
    "PromptRefiner",
    "RefinerConfig",
    "RefinerTargets",
    "build_targets",
    "descend_prompts",
    "discover_groups",
    "kmeans",
    "overfit_prompts",
]
