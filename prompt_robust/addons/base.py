"""The add-on slot: what a robustness method can change in a wrapped learner, and the registry.

An add-on is an ``nn.Module`` built from ``(learner, config)``. The wrapped model asks every enabled add-on,
in a fixed order, for

* ``prompt_override(pixel_values)``: per-sample prompts (the diffusion refiner);
* ``sample_weights(batch, output)``: per-sample loss weights (group reweighting);
* ``extra_loss(batch, output)``: a term added to the loss, with logs (the counterfactual regularizer);
* ``adjust_output(output)``: a change to the logits (the invariant projection).

Add-ons that train something of their own after the prompt (the refiner's generator) declare ``stages``;
``RobustPromptModel.set_stage(name)`` then makes ``stage_parameters(name)`` the trainable tensors, and
``stage_loss`` may replace the task loss in that stage. ``plan_stages`` returns them as data
(:class:`StagePlan`), which the model runs, in order, after the prompt was trained; ``prepare`` fits what an add-on needs before the prompt is trained.

Adding a method = one package ``prompt_robust/addons/<name>/`` (``config.py``: its config dataclass;
``addon.py``: the add-on) or a module of your own implementing these + one ``register_addon`` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["ADDONS", "RobustAddon", "StagePlan", "addon_configs", "learner_feature_dim", "register_addon"]

#: names RobustConfig uses itself
_RESERVED = frozenset({"enabled", "to_dict", "from_dict", "addon_configs"})


@dataclass(frozen=True)
class StagePlan:
    """One training stage an add-on asks for: in stage ``stage`` (its :meth:`RobustAddon.stage_parameters`
    train), ``steps`` AdamW-or-SGD steps on ``dataset`` with these optimizer settings. The model runs it
    (:meth:`RobustPromptModel.fit_addons`), with checkpoints in ``<checkpoint_dir>/<stage>/``.

    Example:
        >>> StagePlan("refiner", dataset=[], steps=100, lr=1e-3, batch_size=32).optimizer
        'adamw'
    """

    stage: str
    dataset: Any
    steps: int
    lr: float
    batch_size: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0


class RobustAddon(nn.Module):
    """Base class of the robustness add-ons; every hook defaults to "no change".

    Args:
        learner: the wrapped learner (kept as a plain reference, not a submodule, so its weights are saved once).
        config: the add-on's config dataclass.
    """

    name: ClassVar[str] = "abstract"
    config_class: ClassVar[type] = object
    #: one line saying what the add-on does (RobustConfig's documentation lists it)
    description: ClassVar[str] = ""
    #: position in the model's forward among the enabled add-ons (lower first; ties: registration order)
    order: ClassVar[int] = 100
    #: training stages this add-on owns (trained after the learner's own "prompt" stage)
    stages: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learner: nn.Module, config: Any) -> None:
        super().__init__()
        self.__dict__["learner"] = learner
        self.config = config

    def prompt_override(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return None

    def sample_weights(self, batch: Mapping[str, Any], output: Any) -> torch.Tensor | None:
        return None

    def extra_loss(self, batch: Mapping[str, Any], output: Any) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def adjust_output(self, output: Any) -> Any:
        return output

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The add-on's tensors trained in ``stage`` (none by default)."""
        return []

    def trains_learner(self, stage: str) -> bool:
        """Whether the learner's own trainable tensors also train in this add-on's ``stage``."""
        return False

    def stage_loss(
        self, stage: str, pixel_values: torch.Tensor, labels: torch.Tensor, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """A loss that replaces the task loss in ``stage`` (then no logits are computed), or None."""
        return None

    def training_state(self) -> dict[str, torch.Tensor]:
        """Running state that changes during prompt training but is not part of the adapter (e.g. group
        statistics). Training checkpoints (``fit``'s and the Trainer callback's) save it, so that a resumed run
        continues exactly. Most add-ons have none."""
        return {}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`training_state` (called after :meth:`prepare` when a run resumes)."""
        if state:
            raise ValueError(
                f"the {self.name!r} add-on keeps no training state, but the checkpoint holds {sorted(state)}; it was "
                "written by a model with other add-ons."
            )

    def prepare(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Fit what the add-on needs *before* the prompt is trained (e.g. a generative model of the training
        features that the regularizer samples from during prompt tuning); returns logs."""
        return {}

    def plan_stages(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> tuple[list[StagePlan], dict[str, float]]:
        """The training stages this add-on needs after the prompt was trained, as data, and logs of preparing
        them (e.g. the refiner's target statistics). :meth:`RobustPromptModel.fit_addons` runs each plan with
        ``prompt_robust.training.fit``; an add-on never drives the training loop itself."""
        return [], {}

    def detach(self) -> None:
        """Undo anything the add-on attached to the learner (hooks); called by ``unwrap()``."""


def learner_feature_dim(learner: nn.Module) -> int:
    """Size of ``learner.image_features()``: the learner's ``feature_dim`` attribute, else its backbone's
    ``embed_dim`` (known at construction, so add-on tensors have fixed shapes for saving and loading)."""
    from ..backbones.base import find_backbone

    backbone = find_backbone(learner)
    dim = getattr(learner, "feature_dim", None) or (backbone.embed_dim if backbone is not None else None)
    if not dim:
        raise ValueError(
            f"cannot tell the size of {type(learner).__name__}.image_features(): the learner holds no prompt_robust "
            "ClipBackbone. Set an int attribute `feature_dim` on the learner."
        )
    return int(dim)


def learner_logit_scale(learner: nn.Module, addon: str, backbone: Any = None) -> torch.Tensor | float:
    """The similarity scale of the learner's logits: its backbone's ``logit_scale`` (``backbone``: the one found
    before, else searched), else a ``logit_scale`` attribute of the learner (a custom learner without a
    ClipBackbone)."""
    from ..backbones.base import find_backbone

    backbone = backbone if backbone is not None else find_backbone(learner)
    if backbone is not None:
        return backbone.logit_scale
    scale = getattr(learner, "logit_scale", None)
    if scale is None:
        raise ValueError(
            f"{type(learner).__name__} holds no ClipBackbone, so the {addon} add-on does not know the logit scale; "
            "set a `logit_scale` attribute (float or 0-dim tensor) on the learner."
        )
    return scale


#: add-on name (the ``RobustConfig`` field) -> implementation
ADDONS: dict[str, type[RobustAddon]] = {}


def register_addon(cls: type[RobustAddon]) -> type[RobustAddon]:
    """Class decorator registering an add-on under ``cls.name``, with its config class ``cls.config_class``:
    ``RobustConfig(<name>=<config>)`` then enables it, and adapters save and load it. This is the only line a
    new add-on needs (see ``docs/design.md``).

    Raises:
        ValueError: the name is not a lowercase identifier, is taken by another class, or the config class is not
            a config dataclass (``ConfigMixin``).

    Example:
        >>> sorted(ADDONS)
        ['counterfactual', 'debias', 'invariance', 'refiner']
    """
    from ..config import ConfigMixin

    name = cls.name
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower() and not name.startswith("_")):
        raise ValueError(
            f"an add-on name must be a lowercase identifier (it becomes a RobustConfig keyword); got {name!r}."
        )
    if name in _RESERVED:
        raise ValueError(f"add-on name {name!r} is reserved by RobustConfig; choose another.")
    config_class = cls.config_class
    if not (isinstance(config_class, type) and issubclass(config_class, ConfigMixin) and is_dataclass(config_class)):
        raise ValueError(
            f"{cls.__name__}.config_class must be a @dataclass config deriving from prompt_robust.config.ConfigMixin "
            f"(for saving and loading adapters); got {config_class!r}."
        )
    existing = ADDONS.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"add-on name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}."
        )
    ADDONS[name] = cls
    # run order: by ``order``, then by registration (the model's forward and RobustConfig list add-ons this way)
    ordered = sorted(ADDONS.items(), key=lambda item: item[1].order)
    ADDONS.clear()
    ADDONS.update(ordered)
    return cls


def addon_configs() -> dict[str, type]:
    """``{name: config class}`` of the registered add-ons, in run order.

    Example:
        >>> list(addon_configs())
        ['refiner', 'counterfactual', 'invariance', 'debias']
    """
    return {name: cls.config_class for name, cls in ADDONS.items()}
