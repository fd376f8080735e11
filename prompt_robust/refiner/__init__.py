"""Prompt-space diffusion refiner: sampler, velocity network, overfitted targets and the add-on."""

from .addon import PromptRefiner
from .network import PromptFlowNet
from .sampler import SOLVER_ORDERS, ODESampler, SamplerOutput
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
    "RefinerTargets",
    "SamplerOutput",
    "build_targets",
    "descend_prompts",
    "discover_groups",
    "kmeans",
    "overfit_prompts",
]
