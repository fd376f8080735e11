"""The add-ons: the slot a robustness method plugs into (:mod:`prompt_robust.addons.base`: ``RobustAddon``,
``StagePlan`` and the ``ADDONS`` registry) and one package per method, each ``config.py`` (its config dataclass)
+ ``addon.py`` (the ``RobustAddon``, registered once with ``@register_addon``) + its internals:

* :mod:`prompt_robust.addons.refiner`: prompt-space diffusion refiner;
* :mod:`prompt_robust.addons.counterfactual`: counterfactual contrastive regularizer;
* :mod:`prompt_robust.addons.invariance`: invariant causal mechanism projection;
* :mod:`prompt_robust.addons.debias`: group reweighting against spurious correlations.

Importing ``prompt_robust`` registers the four; ``RobustConfig`` takes one keyword per registered add-on.
"""

from .base import ADDONS, RobustAddon, StagePlan, addon_configs, learner_feature_dim, register_addon

__all__ = ["ADDONS", "RobustAddon", "StagePlan", "addon_configs", "learner_feature_dim", "register_addon"]
