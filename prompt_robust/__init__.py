"""prompt_robust: make existing CLIP prompt learners robust to distribution shift.

``wrap(learner, RobustConfig(...))`` attaches plug-and-play robustness add-ons to a prompt learner (CoOp,
CoCoOp, VPT, MaPLe or your own) and saves them as PEFT-style adapter files.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .addons.counterfactual import CounterfactualConfig, CounterfactualRegularizer  # registers "counterfactual"
from .addons.debias import DebiasConfig, DebiasReweighting  # registers "debias"
from .addons.invariance import InvarianceConfig, InvariantProjection  # registers "invariance"
from .addons.refiner import PromptRefiner, RefinerConfig  # registers "refiner"
from .backbones import ClipBackbone, HFClipBackbone, load_backbone
from .config import RobustConfig
from .learners import LEARNERS, PromptLearner, build_learner
from .model import RobustOutput, RobustPromptModel, wrap
from .training import FitConfig, evaluate, fit

__all__ = [
    "LEARNERS",
    "ClipBackbone",
    "CounterfactualConfig",
    "CounterfactualRegularizer",
    "DebiasConfig",
    "DebiasReweighting",
    "FitConfig",
    "HFClipBackbone",
    "InvarianceConfig",
    "InvariantProjection",
    "PromptLearner",
    "PromptRefiner",
    "RefinerConfig",
    "RobustConfig",
    "RobustOutput",
    "RobustPromptModel",
    "__version__",
    "build_learner",
    "evaluate",
    "fit",
    "load_backbone",
    "wrap",
]
