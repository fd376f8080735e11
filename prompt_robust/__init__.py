"""prompt_robust: make existing CLIP prompt learners robust to distribution shift.

``wrap(learner, RobustConfig(...))`` attaches plug-and-play robustness add-ons to a prompt learner (CoOp,
CoCoOp, VPT, MaPLe or your own) and saves them as PEFT-style adapter files.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import ClipBackbone, HFClipBackbone, load_backbone
from .config import CounterfactualConfig, DebiasConfig, InvarianceConfig, RefinerConfig, RobustConfig
from .counterfactual import CounterfactualRegularizer  # registers the "counterfactual" add-on
from .debias import DebiasReweighting  # registers the "debias" add-on
from .invariance import InvariantProjection  # registers the "invariance" add-on
from .learners import LEARNERS, PromptLearner, build_learner
from .model import RobustOutput, RobustPromptModel, wrap
from .refiner import PromptRefiner  # registers the "refiner" add-on
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
