"""The add-on slot: what a robustness method can change in a wrapped learner, and the registry.

An add-on is an ``nn.Module`` built from ``(learner, config)``. For every forward pass the wrapped model builds
one :class:`ForwardState` (the images, labels, extra batch keys, the stage, the learner's typed output and
image features encoded at most once) and asks every enabled add-on, in a fixed order, for

* ``prompt_override(state)``: per-sample prompts (the diffusion refiner);
* ``adjust_output(state)``: a replacement of the learner's output, e.g. its logits (the invariant projection);
* ``loss_terms(state)``: per-sample loss weights, a term added to the loss, and logs (:class:`LossTerms`;
  the counterfactual regularizer, group reweighting);
* ``stage_loss(state)``: in one of the add-on's own training stages, the loss that replaces the task loss.

What an add-on fits from data is declared by ``fit_phase`` and done by :meth:`RobustAddon.fit`: either directly
(a feature flow, a projection, group statistics) or by returning training stages as data (:class:`StagePlan`)
that the model runs; ``RobustPromptModel.fit_addons`` is the one entry for both, and ``fitted`` the one
"trained yet?" flag. ``RobustPromptModel.set_stage(name)`` makes ``stage_parameters(name)`` the trainable
tensors.

Adding a method = one package ``prompt_robust/addons/<name>/`` (``config.py``: its config dataclass;
``addon.py``: the add-on) or a module of your own implementing these + one ``register_addon`` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..learners.base import LearnerOutput

__all__ = [
    "ADDONS",
    "FIT_PHASES",
    "AddonFit",
    "ForwardState",
    "LossTerms",
    "RobustAddon",
    "StagePlan",
    "addon_configs",
    "learner_feature_dim",
    "register_addon",
]

#: when ``fit_addons`` fits an add-on: before the prompt is tuned (what prompt tuning needs) or after it
FIT_PHASES = ("before_prompt", "after_prompt")

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


@dataclass(frozen=True)
class AddonFit:
    """What :meth:`RobustAddon.fit` returns: training stages for the model to run (in order) and logs."""

    stages: list[StagePlan] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class LossTerms:
    """An add-on's contribution to the training loss of one batch.

    Attributes:
        weights: ``(batch,)`` per-sample weights of the cross-entropy (multiplied across add-ons; the weighted
            mean ``Σ w·ce / Σ w`` is the task loss), or None.
        loss: a scalar added to the loss, or None.
        logs: scalar diagnostics (floats), e.g. ``{"counterfactual/loss": 0.3}``.
    """

    weights: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class ForwardState:
    """One forward pass of the wrapped model, as every add-on hook sees it.

    Attributes:
        learner: the wrapped learner.
        pixel_values: ``(batch, 3, H, W)``.
        labels: ``(batch,)`` class indices, or None (prediction).
        batch: every key of the batch (``pixel_values``, ``labels`` and extra item keys such as ``groups``,
            ``index`` or the refiner's targets).
        stage: the training stage that runs (``"prompt"`` or an add-on's stage).
        training: whether the model is in training mode (add-ons' objectives apply only then).
        output: the learner's output, typed (set once the learner ran; ``adjust_output`` may replace it).
    """

    learner: nn.Module = field(repr=False)
    pixel_values: torch.Tensor
    labels: torch.Tensor | None
    batch: Mapping[str, Any]
    stage: str = "prompt"
    training: bool = False
    output: LearnerOutput | None = None
    _features: torch.Tensor | None = field(default=None, repr=False)
    _grad: bool = field(default_factory=torch.is_grad_enabled, repr=False)

    @classmethod
    def for_batch(
        cls,
        learner: nn.Module,
        batch: Mapping[str, Any],
        output: Any = None,
        *,
        stage: str = "prompt",
        training: bool = True,
    ) -> ForwardState:
        """The state the wrapped model builds for ``batch`` (``pixel_values``, optional ``labels``, extra keys)
        and the learner's ``output`` (a tensor of logits or a ``LearnerOutput``), e.g. to call an add-on's hooks
        directly in a test.

        Example:
            >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
            >>> from prompt_robust.learners import build_learner
            >>> learner = build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
            >>> x = torch.zeros(2, 3, 32, 32)
            >>> state = ForwardState.for_batch(learner, {"pixel_values": x, "labels": torch.tensor([0, 1])}, learner(x))
            >>> state.output.text_features.shape, state.image_features().shape
            (torch.Size([2, 32]), torch.Size([2, 32]))
        """
        return cls(
            learner=learner,
            pixel_values=batch["pixel_values"],
            labels=batch.get("labels"),
            batch=dict(batch),
            stage=stage,
            training=training,
            output=None if output is None else as_learner_output(output),
        )

    def image_features(self) -> torch.Tensor:
        """``learner.image_features(pixel_values)`` ``(batch, d)``, the features add-ons condition on, encoded at
        most once per forward (under the grad mode the forward started with) and shared by every add-on."""
        if self._features is None:
            with torch.set_grad_enabled(self._grad):
                self._features = self.learner.image_features(self.pixel_values)
        return self._features


def as_learner_output(raw: Any) -> LearnerOutput:
    """The learner's return value as a :class:`~prompt_robust.learners.base.LearnerOutput`: a tensor is its
    logits; any object with ``logits`` keeps its ``image_features``/``text_features`` when it has them."""
    if isinstance(raw, LearnerOutput):
        return raw
    if isinstance(raw, torch.Tensor):
        return LearnerOutput(logits=raw)
    logits = getattr(raw, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the learner returned a {type(raw).__name__}; the learner contract asks for a logits tensor or an "
            "object with a `logits` tensor (prompt_robust.learners.base.LearnerOutput)."
        )
    return LearnerOutput(
        logits=logits,
        image_features=getattr(raw, "image_features", None),
        text_features=getattr(raw, "text_features", None),
    )


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

    #: when ``RobustPromptModel.fit_addons`` fits the add-on: one of :data:`FIT_PHASES`, or None (nothing to fit)
    fit_phase: ClassVar[str | None] = None

    def prompt_override(self, state: ForwardState) -> dict[str, torch.Tensor] | None:
        """Per-sample prompts ``{site: (batch, n_tokens, dim)}`` passed to the learner, or None."""
        return None

    def adjust_output(self, state: ForwardState) -> LearnerOutput | None:
        """A replacement of ``state.output`` (e.g. other logits), or None for no change."""
        return None

    def loss_terms(self, state: ForwardState) -> LossTerms | None:
        """The add-on's part of the training loss for ``state`` (called in training mode, with labels)."""
        return None

    def stage_loss(self, state: ForwardState) -> tuple[torch.Tensor, dict[str, float]] | None:
        """In the add-on's own stage ``state.stage``: the loss that replaces the task loss (no logits are
        computed then) and logs; None to keep the task loss."""
        return None

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        """The add-on's tensors trained in ``stage`` (none by default)."""
        return []

    def trains_learner(self, stage: str) -> bool:
        """Whether the learner's own trainable tensors also train in this add-on's ``stage``."""
        return False

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

    @property
    def fitted(self) -> bool:
        """Whether what :meth:`fit` fits is in place (fitted, or loaded with an adapter); always True for an
        add-on with nothing to fit. ``fit_addons`` fits the add-ons that are not."""
        return True

    def fit(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> AddonFit:
        """Fit the add-on on ``dataset`` (called by :meth:`RobustPromptModel.fit_addons` in the add-on's
        ``fit_phase``): either directly (e.g. a generative model of the training features, a projection) or by
        returning training stages as data (:class:`StagePlan`), which the model runs with
        ``prompt_robust.training.fit``; an add-on never drives the training loop itself.

        Args:
            model: the wrapped model (e.g. for its initial predictions).
            dataset: the training set.
            seed: seed of the fit.
            cache_dir: where the add-on caches what it derives from the data.
            progress: show progress bars.
        """
        return AddonFit()

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
