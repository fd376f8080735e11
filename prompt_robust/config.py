"""Dataclass configuration shared by learners, add-ons and the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}`` and whose ``__post_init__``
validates values; ``to_dict``/``from_dict`` round-trip through JSON and reject unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

__all__ = [
    "ConfigMixin",
    "CounterfactualConfig",
    "DebiasConfig",
    "InvarianceConfig",
    "RefinerConfig",
    "RobustConfig",
    "help_field",
]

T = TypeVar("T", bound="ConfigMixin")


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A dataclass field with a help text (used by the docs and the CLI)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def unknown_name_error(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    """A ValueError for an unknown name that lists the valid ones and suggests the closest."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}.{hint}")


class ConfigMixin:
    """JSON round trip for config dataclasses (nested configs included)."""

    #: nested config fields -> their classes, for from_dict
    nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigMixin) else value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict; got {type(data).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(names)}. "
                "The file may come from a newer prompt_robust version."
            )
        kwargs = {}
        for key, value in data.items():
            sub = cls.nested.get(key)
            kwargs[key] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value!r}.")


@dataclass
class RefinerConfig(ConfigMixin):
    """Prompt-space diffusion refiner ("Prompt Diffusion Robustifies Any-Modality Prompt Learning",
    https://arxiv.org/abs/2410.20164): per-sample prompts sampled from noise, conditioned on the image.

    Sampling: ``num_steps`` fixed-grid steps of ``method``; ``noise_seed`` fixes the starting noise (the same
    for every image, so a prompt depends on its image only); ``num_samples`` prompts are averaged.
    Targets: ``inner_steps`` normalised gradient steps per training sample, each of length ``inner_lr`` times
    the RMS of the learned prompt. Generator training: ``train_steps`` of flow matching, then optionally
    ``joint_steps`` with the task loss through the sampler (plus ``fm_weight`` x flow matching).
    """

    num_steps: int = help_field(5, "ODE steps of the sampler at test time.")
    method: str = help_field("euler", "Fixed-grid ODE solver: euler, midpoint or rk4.")
    num_samples: int = help_field(1, "Prompts sampled per image and averaged (K).")
    noise_seed: int | None = help_field(0, "Fixed noise seed for deterministic sampling (None: fresh noise).")
    hidden_dim: int = help_field(128, "Width of the velocity network.")
    layers: int = help_field(2, "Transformer blocks of the velocity network.")
    heads: int = help_field(4, "Attention heads of the velocity network.")
    inner_steps: int = help_field(5, "Gradient steps used to overfit one prompt per training sample.")
    inner_lr: float = help_field(0.05, "Length of each overfitting step, relative to the prompt's RMS.")
    target_batch_size: int = help_field(32, "Samples per batch when computing the overfitted targets.")
    train_steps: int = help_field(1000, "Flow-matching steps of the generator.")
    train_lr: float = help_field(1e-3, "AdamW learning rate of the generator.")
    train_batch_size: int = help_field(64, "Batch size of the generator training.")
    joint_steps: int = help_field(0, "Steps of task-loss training through the sampler after flow matching.")
    joint_lr: float = help_field(2e-4, "Learning rate of the joint stage.")
    joint_train_prompt: bool = help_field(False, "Also update the learner's prompt in the joint stage.")
    fm_weight: float = help_field(1.0, "Weight of the flow-matching term in the joint stage.")

    SOLVERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "rk4")

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool) and self.num_steps >= 1,
            f"num_steps must be an integer >= 1; got {self.num_steps!r}. The paper's sampler uses 5.",
        )
        if self.method not in self.SOLVERS:
            raise unknown_name_error("ODE method", self.method, self.SOLVERS)
        for name in ("num_samples", "hidden_dim", "layers", "heads", "inner_steps", "target_batch_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)!r}.")
        _check(self.hidden_dim % self.heads == 0, f"hidden_dim ({self.hidden_dim}) must be a multiple of heads.")
        for name in ("train_steps", "joint_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)!r}.")
        _check(self.train_steps + self.joint_steps >= 1, "train_steps + joint_steps must be >= 1.")
        _check(self.train_batch_size >= 1, f"train_batch_size must be >= 1; got {self.train_batch_size!r}.")
        for name in ("inner_lr", "train_lr", "joint_lr"):
            _positive(name, getattr(self, name))
        _positive("fm_weight", self.fm_weight, allow_zero=True)


@dataclass
class CounterfactualConfig(ConfigMixin):
    """Counterfactual contrastive regularizer (DiCap, https://arxiv.org/abs/2507.19882)."""

    weight: float = help_field(1.0, "Weight of the contrastive term added to the task loss.")
    temperature: float = help_field(0.07, "InfoNCE temperature.")
    num_counterfactuals: int = help_field(1, "Counterfactuals generated per factual feature.")
    noise_level: float = help_field(0.5, "How far (diffusion time in (0, 1]) a factual feature is noised.")
    guidance_scale: float = help_field(2.0, "Strength of the class guidance towards the target class.")
    proximity_weight: float = help_field(1.0, "Strength of the pull back to the factual feature (minimality).")
    num_steps: int = help_field(5, "ODE steps of counterfactual generation.")

    def __post_init__(self) -> None:
        _positive("weight", self.weight, allow_zero=True)
        _positive("temperature", self.temperature)
        _check(self.num_counterfactuals >= 1, f"num_counterfactuals must be >= 1; got {self.num_counterfactuals!r}.")
        _check(0 < self.noise_level <= 1, f"noise_level must be in (0, 1]; got {self.noise_level!r}.")
        _positive("guidance_scale", self.guidance_scale, allow_zero=True)
        _positive("proximity_weight", self.proximity_weight, allow_zero=True)
        _check(self.num_steps >= 1, f"num_steps must be >= 1; got {self.num_steps!r}.")


@dataclass
class InvarianceConfig(ConfigMixin):
    """Invariant causal mechanism projection (CLIP-ICM, https://arxiv.org/abs/2405.15289)."""

    lam: float | None = help_field(None, "Weight of the intervention term; None: chosen on held-out data.")
    dim: int | None = help_field(None, "Kept dimension; None: chosen on held-out data.")
    interventions: list[str] = help_field(
        ["color_jitter", "grayscale", "gaussian_blur", "invert", "posterize", "solarize", "equalize"],
        "Image interventions used to build pairs.",
    )

    INTERVENTIONS: ClassVar[tuple[str, ...]] = (
        "color_jitter",
        "grayscale",
        "gaussian_blur",
        "invert",
        "posterize",
        "solarize",
        "equalize",
    )

    def __post_init__(self) -> None:
        if self.lam is not None:
            _positive("lam", self.lam, allow_zero=True)
        if self.dim is not None:
            _check(self.dim >= 1, f"dim must be >= 1; got {self.dim!r}.")
        _check(len(self.interventions) > 0, "interventions must name at least one intervention.")
        for name in self.interventions:
            if name not in self.INTERVENTIONS:
                raise unknown_name_error("intervention", name, self.INTERVENTIONS)


@dataclass
class DebiasConfig(ConfigMixin):
    """Annotation-free debiasing with group reweighting (https://arxiv.org/abs/2503.08368)."""

    attribute_values: list[str] = help_field([], "Words naming the spurious attribute's values, >= 2.")
    eta: float = help_field(1.0, "Sharpness of the difficulty term exp[eta (1 - p_y|g)].")
    ema: float = help_field(0.9, "EMA factor of the group weights, in [0, 1).")

    def __post_init__(self) -> None:
        values = [str(v).strip() for v in self.attribute_values]
        _check(
            len(values) >= 2 and all(values),
            "attribute_values must name at least two non-empty values of the spurious attribute, e.g. "
            f"['land background', 'water background']; got {self.attribute_values!r}.",
        )
        _check(len(set(values)) == len(values), f"attribute_values must be distinct; got {self.attribute_values!r}.")
        _positive("eta", self.eta, allow_zero=True)
        _check(0 <= self.ema < 1, f"ema must be in [0, 1); got {self.ema!r}.")


@dataclass
class RobustConfig(ConfigMixin):
    """Which robustness add-ons ``wrap()`` attaches to a learner (None: off).

    Example:
        >>> RobustConfig()  # no add-on: the wrapped model behaves exactly like the learner
        RobustConfig(refiner=None, counterfactual=None, invariance=None, debias=None)
    """

    refiner: RefinerConfig | None = help_field(None, "Prompt-space diffusion refiner.")
    counterfactual: CounterfactualConfig | None = help_field(None, "Counterfactual contrastive regularizer.")
    invariance: InvarianceConfig | None = help_field(None, "Invariant causal mechanism projection.")
    debias: DebiasConfig | None = help_field(None, "Annotation-free debiasing with group reweighting.")

    nested: ClassVar[dict[str, type]] = {
        "refiner": RefinerConfig,
        "counterfactual": CounterfactualConfig,
        "invariance": InvarianceConfig,
        "debias": DebiasConfig,
    }

    def __post_init__(self) -> None:
        for name, cls in self.nested.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"RobustConfig.{name} must be a {cls.__name__} or None; got {type(value).__name__}.")

    def enabled(self) -> list[str]:
        """Names of the add-ons that are switched on, in a fixed order."""
        return [name for name in self.nested if getattr(self, name) is not None]
