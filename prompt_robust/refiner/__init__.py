"""Prompt-space diffusion refiner: sampler, velocity network, overfitted targets and the add-on."""

from .addon import PromptRefiner
from .network import PromptFlowNet
from .sampler import SOLVER_ORDERS, ODESampler, SamplerOutput
from .targets import RefinerTargets, build_targets, overfit_prompts

__all__ = [
    "SOLVER_ORDERS",
    "ODESampler",
    "PromptFlowNet",
    "PromptRefiner",
    "RefinerTargets",
    "SamplerOutput",
    "build_targets",
    "overfit_prompts",
]
