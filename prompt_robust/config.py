"""Dataclass configuration shared by learners, add-ons and the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}`` and whose ``__post_init__``
validates values; ``to_dict``/``from_dict`` round-trip through JSON and reject unknown keys by name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import numbers
import types
import typing
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union

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
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kwargs)
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
        """Build the config from a dict (e.g. parsed JSON): unknown keys and values of the wrong type (``"abc"``
        for an int field) raise a ValueError naming the field; the dataclass then validates the values.

        Example:
            >>> RefinerConfig.from_dict({"num_steps": "5"})
            Traceback (most recent call last):
            ...
            ValueError: RefinerConfig.num_steps must be an integer; got '5' (str). Fix the value, or leave the field out to use its default.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict; got {type(data).__name__}.")
        names = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(names)}. "
                "The file may come from a newer prompt_robust version."
            )
        hints = _field_types(cls)
        kwargs = {}
        for key, value in data.items():
            hint = hints.get(key, Any)
            if not _matches_type(value, hint):
                raise ValueError(
                    f"{cls.__name__}.{key} must be {_describe_type(hint)}; got {_short_repr(value)} "
                    f"({type(value).__name__}). Fix the value, or leave the field out to use its default."
                )
            sub = cls.nested.get(key)
            kwargs[key] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (``{}`` when they cannot be resolved: nothing is checked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something unimportable: leave the checks to __post_init__
        return {}


def _matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from JSON or keyword arguments) has the type a field is annotated with.

    Lenient where Python callers are: an int is a float, a tuple a list, numpy scalars are numbers; annotations
    this check does not know are accepted (their ``__post_init__`` validates them).
    """
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_matches_type(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and (
            not args or all(_matches_type(k, args[0]) and _matches_type(v, args[1]) for k, v in value.items())
        )
    if isinstance(hint, type) and issubclass(hint, ConfigMixin):
        return isinstance(value, (hint, dict))
    return True


def _describe_type(hint: Any) -> str:
    """``int | None`` -> ``"an integer or null"``: the JSON a field accepts, for error messages."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe_type(arg) for arg in typing.get_args(hint))
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return "a list" + (f" of {_describe_type(args[0]).split(' ', 1)[-1]}s" if args and args[0] is not Any else "")
    if hint is dict or origin is dict:
        return "a JSON object"
    if isinstance(hint, type) and issubclass(hint, ConfigMixin):
        return f"a JSON object (of {hint.__name__} fields)"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    Targets (``targets``): ``inner_steps`` normalised gradient steps, each of length ``inner_lr`` times the RMS of
    the learned prompt, of one prompt per training sample on its own loss (``"overfit"``, the paper's) or of one
    prompt per label-free group of training images (``"group"``, ``num_groups`` k-means groups of the image
    features minus their class mean) or of one prompt per training sample on the marginal entropy of its
    ``entropy_keep`` most confident of ``entropy_views`` augmented views (``"entropy"``, test-time prompt tuning's
    label-free rule, which means the same on a test image). Generator training: ``train_steps`` of flow matching,
    then optionally ``joint_steps`` with the task loss through the sampler (plus ``fm_weight`` x flow matching).
    """

    num_steps: int = help_field(5, "ODE steps of the sampler at test time.")
    method: str = help_field("euler", "Fixed-grid ODE solver: euler, midpoint or rk4.")
    num_samples: int = help_field(1, "Prompts sampled per image and averaged (K).")
    noise_seed: int | None = help_field(0, "Fixed noise seed for deterministic sampling (None: fresh noise).")
    noise_scale: float = help_field(
        1.0, "Std of the starting noise when sampling (0: one deterministic prompt per image, from the origin)."
    )
    hidden_dim: int = help_field(128, "Width of the velocity network.")
    layers: int = help_field(2, "Transformer blocks of the velocity network.")
    heads: int = help_field(4, "Attention heads of the velocity network.")
    targets: str = help_field(
        "overfit",
        "How a training sample's target prompt is made: overfit (its own prompt, steps on its own loss: the "
        "paper's), group (one prompt per label-free group of similar-looking training images) or entropy (its own "
        "prompt, steps on the marginal entropy of its augmented views, without its label, as test-time prompt tuning).",
    )
    num_groups: int = help_field(4, "Groups of training images of targets='group' (k-means, seeded).")
    entropy_views: int = help_field(64, "Augmented views per image of targets='entropy' (the first is the image).")
    entropy_keep: float = help_field(0.1, "Fraction of the views, the most confident, targets='entropy' keeps.")
    inner_steps: int = help_field(5, "Gradient steps of each target prompt (per sample or per group).")
    inner_lr: float = help_field(0.05, "Length of each target-prompt step, relative to the prompt's RMS.")
    target_batch_size: int = help_field(32, "Samples per batch when computing the overfitted targets.")
    train_steps: int = help_field(2000, "Flow-matching steps of the generator.")
    train_lr: float = help_field(3e-3, "AdamW learning rate of the generator.")
    train_batch_size: int = help_field(64, "Batch size of the generator training.")
    joint_steps: int = help_field(0, "Steps of task-loss training through the sampler after flow matching.")
    joint_lr: float = help_field(2e-4, "Learning rate of the joint stage.")
    joint_train_prompt: bool = help_field(False, "Also update the learner's prompt in the joint stage.")
    fm_weight: float = help_field(1.0, "Weight of the flow-matching term in the joint stage.")

    SOLVERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "rk4")
    TARGETS: ClassVar[tuple[str, ...]] = ("overfit", "group", "entropy")

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool) and self.num_steps >= 1,
            f"num_steps must be an integer >= 1; got {self.num_steps!r}. The paper's sampler uses 5.",
        )
        if self.method not in self.SOLVERS:
            raise unknown_name_error("ODE method", self.method, self.SOLVERS)
        if self.targets not in self.TARGETS:
            raise unknown_name_error("refiner target rule", self.targets, self.TARGETS)
        for name in ("num_samples", "hidden_dim", "layers", "heads", "inner_steps", "target_batch_size", "num_groups"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)!r}.")
        _check(
            self.entropy_views >= 2, f"entropy_views must be >= 2 (the image and a view); got {self.entropy_views!r}."
        )
        _check(0 < self.entropy_keep <= 1, f"entropy_keep must be a fraction in (0, 1]; got {self.entropy_keep!r}.")
        _check(self.hidden_dim % self.heads == 0, f"hidden_dim ({self.hidden_dim}) must be a multiple of heads.")
        for name in ("train_steps", "joint_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)!r}.")
        _check(self.train_steps + self.joint_steps >= 1, "train_steps + joint_steps must be >= 1.")
        _check(self.train_batch_size >= 1, f"train_batch_size must be >= 1; got {self.train_batch_size!r}.")
        for name in ("inner_lr", "train_lr", "joint_lr"):
            _positive(name, getattr(self, name))
        _positive("fm_weight", self.fm_weight, allow_zero=True)
        _positive("noise_scale", self.noise_scale, allow_zero=True)


@dataclass
class CounterfactualConfig(ConfigMixin):
    """Counterfactual contrastive regularizer (DiCap, "Causality-aligned Prompt Learning via Diffusion-based
    Counterfactual Generation", https://arxiv.org/abs/2507.19882).

    Before prompt tuning (``model.prepare_addons(train_data)``) a class-conditional flow-matching model of the
    frozen image features is trained (``hidden_dim``, ``depth``, ``train_*``, ``cond_dropout``). During prompt
    tuning every factual feature ``z`` of class ``y`` gets ``num_counterfactuals`` counterfactuals ``z'`` towards
    ``target`` classes: ``z`` is inverted to ``t_0 = 1 - noise_level`` along the class-``y`` ODE, then integrated
    back to ``t = 1`` with ``v_∅ + guidance_scale (v_y' - v_∅) - negative_guidance (v_y - v_∅)`` blended with
    the straight path back to ``z`` with share ``λ``, ``num_steps`` steps of ``method`` each way. ``λ`` is found
    per sample by ``proximity_search`` bisection steps in ``[proximity_weight, proximity_max]``: the largest
    ``λ`` (smallest change) whose ``z'`` the current prompt's classifier still assigns to ``y'`` by
    ``validity_margin`` (minimal sufficiency); with ``proximity_search=0`` it is ``proximity_weight``. The
    loss adds ``weight x`` InfoNCE of the prompt's true-class text feature against ``z`` (positive) and the
    ``z'`` (negatives) at ``temperature``. See ``docs/counterfactual.md``.

    Example:
        >>> CounterfactualConfig(num_counterfactuals=2, target="random").num_counterfactuals
        2
    """

    twin: str = help_field(
        "auto",
        "What a counterfactual changes: class (another class, the rest kept, generated by the feature flow; the "
        "prompt is contrasted against it: the paper's), attribute (the nuisance attribute named by "
        "attribute_values, the class kept; the prompt must still classify it as the factual class) or auto "
        "(attribute when attribute_values is set, else class).",
    )
    attribute_values: list[str] = help_field(
        [],
        "twin='attribute': words naming the nuisance attribute's values, e.g. ['grass', 'water'] (>= 2); images are "
        "pseudo-labelled with them by zero-shot CLIP.",
    )
    attribute_templates: list[str] = help_field(
        ["a photo with a {}.", "a photo of something on a {}.", "an image showing a {}."],
        "twin='attribute': zero-shot prompts naming an attribute value ('{}'), averaged.",
    )
    weight: float = help_field(1.0, "Weight of the counterfactual term added to the task loss.")
    temperature: float = help_field(0.07, "InfoNCE temperature (> 0).")
    num_counterfactuals: int = help_field(1, "Counterfactuals generated per factual feature (K hard negatives).")
    noise_level: float = help_field(
        0.5, "How far back (diffusion time, in (0, 1]) a factual feature is inverted: larger allows bigger changes."
    )
    guidance_scale: float = help_field(3.0, "Weight w of the guidance towards the target class (>= 0).")
    negative_guidance: float = help_field(1.0, "Weight w_neg of the guidance away from the factual class (>= 0).")
    proximity_weight: float = help_field(
        0.0,
        "Share λ in [0, 1) of the straight path back to the factual feature: the fixed λ without the search, the "
        "lower end of the search interval with it.",
    )
    proximity_search: int = help_field(
        3,
        "Bisection steps of the per-sample minimal-change search over λ in [proximity_weight, proximity_max] "
        "(0: fixed λ = proximity_weight).",
    )
    proximity_max: float = help_field(0.8, "Upper end of the λ search interval, in (proximity_weight, 1).")
    validity_margin: float = help_field(
        0.01,
        "Cosine margin by which the current classifier must prefer the target class for the search to accept z'.",
    )
    num_steps: int = help_field(5, "Fixed ODE steps of the inversion and of the guided generation, each.")
    method: str = help_field("midpoint", "Fixed-grid ODE solver of counterfactual generation: euler or midpoint.")
    target: str = help_field(
        "confusable", "Target class of a counterfactual: confusable (highest other logit) or random (uniform)."
    )
    hidden_dim: int = help_field(256, "Width of the feature-flow velocity network.")
    depth: int = help_field(2, "Residual MLP blocks of the feature-flow velocity network.")
    train_steps: int = help_field(1000, "Flow-matching steps of the feature flow in prepare_addons().")
    train_lr: float = help_field(2e-3, "Peak AdamW learning rate of the feature flow (cosine decay to 10%).")
    train_batch_size: int = help_field(256, "Features per feature-flow training step.")
    cond_dropout: float = help_field(
        0.2, "Probability a training feature's class is replaced by the null label (trains the marginal field)."
    )
    feature_batch_size: int = help_field(64, "Images per batch when computing the training features.")

    METHODS: ClassVar[tuple[str, ...]] = ("euler", "midpoint")
    TARGETS: ClassVar[tuple[str, ...]] = ("confusable", "random")
    TWINS: ClassVar[tuple[str, ...]] = ("auto", "class", "attribute")

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        for name in ("weight", "temperature", "noise_level", "guidance_scale", "negative_guidance"):
            value = getattr(self, name)
            _check(is_number(value) and abs(value) != float("inf"), f"{name} must be a finite number; got {value!r}.")
        for name in ("proximity_weight", "train_lr", "cond_dropout"):
            value = getattr(self, name)
            _check(is_number(value), f"{name} must be a number; got {value!r}.")
        _positive("weight", self.weight, allow_zero=True)
        _check(
            self.temperature > 0,
            f"temperature must be > 0; got {self.temperature!r}. CLIP-style contrastive losses use about 0.07.",
        )
        _check(
            0 < self.noise_level <= 1,
            f"noise_level must be in (0, 1] (the factual feature is inverted to t_0 = 1 - noise_level; 1: all the "
            f"way to noise); got {self.noise_level!r}.",
        )
        _positive("guidance_scale", self.guidance_scale, allow_zero=True)
        _positive("negative_guidance", self.negative_guidance, allow_zero=True)
        _check(
            0 <= self.proximity_weight < 1,
            f"proximity_weight must be in [0, 1) (0: no pull back to the factual feature; 1 would return it "
            f"unchanged); got {self.proximity_weight!r}.",
        )
        for name in ("num_counterfactuals", "num_steps", "hidden_dim", "train_steps", "train_batch_size"):
            value = getattr(self, name)
            _check(is_int(value) and value >= 1, f"{name} must be an integer >= 1; got {value!r}.")
        _check(
            is_int(self.proximity_search) and self.proximity_search >= 0,
            f"proximity_search must be an integer >= 0 (bisection steps; 0: fixed λ); got {self.proximity_search!r}.",
        )
        _check(
            is_number(self.proximity_max)
            and self.proximity_max < 1
            and (self.proximity_search == 0 or self.proximity_weight < self.proximity_max),
            f"proximity_max must be in (proximity_weight={self.proximity_weight}, 1): the search interval of λ; "
            f"got {self.proximity_max!r}.",
        )
        _check(
            is_number(self.validity_margin) and self.validity_margin >= 0,
            f"validity_margin must be a number >= 0 (a cosine margin); got {self.validity_margin!r}.",
        )
        _check(is_int(self.depth) and self.depth >= 0, f"depth must be an integer >= 0; got {self.depth!r}.")
        _check(
            is_int(self.feature_batch_size) and self.feature_batch_size >= 1,
            f"feature_batch_size must be an integer >= 1; got {self.feature_batch_size!r}.",
        )
        if self.method not in self.METHODS:
            raise unknown_name_error("counterfactual ODE method", self.method, self.METHODS)
        if self.target not in self.TARGETS:
            raise unknown_name_error("counterfactual target", self.target, self.TARGETS)
        if self.twin not in self.TWINS:
            raise unknown_name_error("counterfactual twin", self.twin, self.TWINS)
        if self.twin == "attribute" or (self.twin == "auto" and self.attribute_values):
            values = [str(v).strip() for v in self.attribute_values]
            _check(
                len(values) >= 2 and len(set(values)) == len(values) and all(values),
                "twin='attribute' needs attribute_values: at least 2 distinct words naming the nuisance attribute's "
                f"values, e.g. ['grass', 'water']; got {self.attribute_values!r}.",
            )
            for template in self.attribute_templates:
                _check(
                    isinstance(template, str) and template.count("{}") == 1,
                    f"attribute template {template!r} must contain exactly one '{{}}' placeholder for the value.",
                )
        _positive("train_lr", self.train_lr)
        _check(
            0 <= self.cond_dropout < 1,
            f"cond_dropout must be in [0, 1) (the share of training features that train the marginal field; "
            f"0 leaves the null label untrained, so guidance needs > 0); got {self.cond_dropout!r}.",
        )
        _check(
            self.cond_dropout > 0 or (self.guidance_scale == 1 and self.negative_guidance == 0),
            "cond_dropout=0 never trains the marginal (null-label) field that guidance uses; set cond_dropout > 0 "
            "(e.g. 0.2), or guidance_scale=1 and negative_guidance=0 (plain target-class sampling).",
        )


@dataclass
class InvarianceConfig(ConfigMixin):
    """Invariant causal mechanism projection (CLIP-ICM, https://arxiv.org/abs/2405.15289).

    Before prompt training, every training image is paired with single-factor interventions of itself
    (``interventions``); with image features ``Z`` and differences ``Δ = f(x) - f(do(x))`` the projection keeps
    the top-``dim`` eigenvectors of ``M = ZᵀZ/n - λ·ΔᵀΔ/m`` (the directions with much feature variance that the
    interventions do not move). ``λ = lam · tr(ZᵀZ/n) / tr(ΔᵀΔ/m)``: ``lam`` is scale-free. ``lam`` or ``dim``
    left at None are chosen on a held-out part of the *training* images (``val_fraction``) by the accuracy on
    their intervened copies over ``lam_grid`` x ``dim_fractions`` (ties: larger dim, then smaller lam); see
    ``docs/invariance.md``.

    Example:
        >>> InvarianceConfig(lam=1.0, dim=256, interventions=["grayscale", "invert"]).dim
        256
    """

    lam: float | None = help_field(
        None,
        "Weight of the intervention term in units of tr(ZᵀZ/n)/tr(ΔᵀΔ/m) (1: both terms equal in total "
        "variance); None: chosen on held-out training data.",
    )
    dim: int | None = help_field(None, "Kept dimension k of the projection; None: chosen on held-out training data.")
    interventions: list[str] = help_field(
        ["color_jitter", "gaussian_blur", "posterize"],
        "Image interventions used to build pairs (default: those that keep the class, measured by bench --suite "
        "calibration; grayscale, invert, solarize and equalize are available but change what the world's classes "
        "look like).",
    )
    intervention_params: dict[str, dict[str, Any]] = help_field(
        {},
        'Strength overrides per intervention, e.g. {"color_jitter": {"brightness": 0.2}}: the keyword '
        "arguments of its function in prompt_robust.invariance.interventions (unset: that function's defaults).",
    )
    pairs_per_image: int = help_field(
        1, "Draws per training image of every random intervention (color_jitter, gaussian_blur); others: one."
    )
    text_interventions: bool = help_field(
        False, "Also use text pairs (text_base_template vs each of text_templates, for every class)."
    )
    text_base_template: str = help_field("a photo of a {}.", "Base template of the text pairs and of selection.")
    text_templates: list[str] = help_field(
        [
            "an image of a {}.",
            "a picture of a {}.",
            "a sketch of a {}.",
            "a painting of a {}.",
            "a drawing of a {}.",
            "a blurry photo of a {}.",
            "a black and white photo of a {}.",
            "a dark photo of a {}.",
            "a bright photo of a {}.",
        ],
        "Templates swapped for the base one to build text pairs (style swaps and attribute words).",
    )
    text_weight: float = help_field(0.5, "Share of the text pairs in the intervention term, in [0, 1].")
    lam_grid: list[float] = help_field([0.0, 0.5, 1.0, 2.0, 5.0, 10.0], "Values of lam tried when lam is None.")
    dim_fractions: list[float] = help_field(
        [0.125, 0.25, 0.5, 0.75, 1.0], "Fractions of the feature size tried as dim when dim is None."
    )
    val_fraction: float = help_field(0.25, "Share of each class's training images held out to choose lam/dim.")
    selection: str = help_field(
        "zero_shot", "Predictor scored when choosing lam/dim: zero_shot (base template) or linear_probe."
    )
    probe_reg: float = help_field(1e-3, "L2 strength of the linear probe (selection='linear_probe').")
    feature_batch_size: int = help_field(64, "Images per batch when computing interventional features.")

    INTERVENTIONS: ClassVar[tuple[str, ...]] = (
        "color_jitter",
        "grayscale",
        "gaussian_blur",
        "invert",
        "posterize",
        "solarize",
        "equalize",
    )
    SELECTIONS: ClassVar[tuple[str, ...]] = ("zero_shot", "linear_probe")

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        if self.lam is not None:
            _check(is_number(self.lam), f"lam must be a number >= 0 or None; got {self.lam!r}.")
            _positive("lam", self.lam, allow_zero=True)
        if self.dim is not None:
            _check(
                is_int(self.dim) and self.dim >= 1,
                f"dim must be an integer >= 1 or None (chosen on held-out data); got {self.dim!r}.",
            )
        _check(
            isinstance(self.interventions, (list, tuple)) and len(self.interventions) > 0,
            f"interventions must name at least one of {', '.join(self.INTERVENTIONS)}; got {self.interventions!r}.",
        )
        for name in self.interventions:
            if name not in self.INTERVENTIONS:
                raise unknown_name_error("intervention", name, self.INTERVENTIONS)
        repeated = sorted(n for n, count in Counter(self.interventions).items() if count > 1)
        _check(not repeated, f"interventions must be distinct; repeated: {repeated}. Use pairs_per_image for more.")
        _check(
            isinstance(self.intervention_params, dict)
            and all(isinstance(v, dict) for v in self.intervention_params.values()),
            "intervention_params must map intervention names to dicts of keyword arguments, e.g. "
            f'{{"posterize": {{"bits": 5}}}}; got {self.intervention_params!r}.',
        )
        unused = sorted(set(self.intervention_params) - set(self.interventions))
        _check(
            not unused,
            f"intervention_params names {unused}, which are not in interventions {list(self.interventions)}: "
            "add them to interventions or remove their parameters.",
        )
        from .invariance.interventions import IMAGE_INTERVENTIONS  # a lazy import: that module imports this one

        for name, params in self.intervention_params.items():
            accepted = [
                p.name
                for p in inspect.signature(IMAGE_INTERVENTIONS[name].fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            ]
            bad = sorted(set(params) - set(accepted))
            _check(
                not bad,
                f"intervention_params[{name!r}] has unknown parameters {bad}; {name} accepts "
                f"{accepted or 'no parameters'}.",
            )
        _check(
            is_int(self.pairs_per_image) and self.pairs_per_image >= 1,
            f"pairs_per_image must be an integer >= 1; got {self.pairs_per_image!r}.",
        )
        for template in [self.text_base_template, *self.text_templates]:
            _check(
                isinstance(template, str) and template.count("{}") == 1,
                f"text template {template!r} must contain exactly one '{{}}' placeholder for the class name.",
            )
        _check(
            not self.text_interventions or len(self.text_templates) > 0,
            "text_interventions=True needs at least one entry in text_templates (or set text_interventions=False).",
        )
        _check(
            self.text_base_template not in self.text_templates,
            f"text_templates must not repeat the base template {self.text_base_template!r} (a pair would be empty).",
        )
        _check(
            is_number(self.text_weight) and 0 <= self.text_weight <= 1,
            f"text_weight must be in [0, 1]; got {self.text_weight!r}.",
        )
        _check(
            len(self.lam_grid) > 0 and all(is_number(v) and 0 <= v < float("inf") for v in self.lam_grid),
            f"lam_grid must hold at least one finite value >= 0; got {self.lam_grid!r}.",
        )
        _check(
            len(self.dim_fractions) > 0 and all(is_number(v) and 0 < v <= 1 for v in self.dim_fractions),
            f"dim_fractions must hold at least one value in (0, 1], e.g. [0.25, 0.5, 1.0]; got {self.dim_fractions!r}.",
        )
        _check(
            is_number(self.val_fraction) and 0 < self.val_fraction < 1,
            f"val_fraction must be in (0, 1); got {self.val_fraction!r}.",
        )
        if self.selection not in self.SELECTIONS:
            raise unknown_name_error("selection predictor", self.selection, self.SELECTIONS)
        _check(is_number(self.probe_reg), f"probe_reg must be a number >= 0; got {self.probe_reg!r}.")
        _positive("probe_reg", self.probe_reg, allow_zero=True)
        _check(
            is_int(self.feature_batch_size) and self.feature_batch_size >= 1,
            f"feature_batch_size must be an integer >= 1; got {self.feature_batch_size!r}.",
        )


@dataclass
class DebiasConfig(ConfigMixin):
    """Group reweighting against spurious correlations: annotation-free DPT ("Debiased Prompt Tuning in
    Vision-Language Model without Annotations", https://arxiv.org/abs/2503.08368) and the baselines it is judged
    against. Implemented by :class:`prompt_robust.debias.DebiasReweighting` (see ``docs/debias.md``).

    ``mode`` says where the groups come from and how they are weighted:

    * ``"pseudo"`` (default, needs no annotation): groups are (class, pseudo-attribute); zero-shot CLIP assigns
      every image one of ``attribute_values`` with the prompts ``templates``; group weights
      ``w_g ∝ (1/N_g)·exp[eta·(1 − p̄_{y|g})]``, the mean true-class probability ``p̄`` EMA-smoothed with ``ema``;
    * ``"oracle"``: the true groups in the batch key ``groups_key``, ``w_g ∝ 1/N_g``;
    * ``"groupdro"``: the true groups, online group DRO (Sagawa et al., https://arxiv.org/abs/1911.08731) with
      step size ``groupdro_step``;
    * ``"jtt"``: Just Train Twice (Liu et al., https://arxiv.org/abs/2107.09044): the error set of an earlier ERM
      run is upweighted by ``jtt_upweight``.

    Example:
        >>> DebiasConfig(attribute_values=["land background", "water background"]).mode
        'pseudo'
        >>> DebiasConfig(mode="oracle").attribute_values
        []
    """

    attribute_values: list[str] = help_field(
        [],
        "Words naming the spurious attribute's values, e.g. ['land background', 'water background'] (>= 2, "
        "distinct; required by mode 'pseudo', ignored by the others).",
    )
    eta: float = help_field(1.0, "Sharpness of the difficulty term exp[eta (1 - p_y|g)] (mode 'pseudo'; 0: 1/N_g).")
    ema: float = help_field(0.9, "EMA factor of the groups' mean true-class probability, in [0, 1) (mode 'pseudo').")
    mode: str = help_field("pseudo", "Where groups come from: pseudo (annotation-free), oracle, groupdro or jtt.")
    templates: list[str] = help_field(
        ["a photo with a {}.", "a photo of something on a {}.", "an image showing a {}."],
        "Zero-shot prompts naming an attribute value ('{}'); text features are averaged over them (mode 'pseudo').",
    )
    groups_key: str = help_field("groups", "Batch key holding the true group ids (modes 'oracle' and 'groupdro').")
    groupdro_step: float = help_field(0.01, "Step size of group DRO's exponentiated-gradient group weights.")
    jtt_upweight: float = help_field(20.0, "JTT's lambda_up: loss weight of the ERM run's misclassified examples.")
    batch_size: int = help_field(64, "Images per forward pass when prepare() pseudo-labels the training set.")
    log_every: int = help_field(50, "Log the group weights every this many training batches (0: never).")

    MODES: ClassVar[tuple[str, ...]] = ("pseudo", "oracle", "groupdro", "jtt")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise unknown_name_error("debias mode", self.mode, self.MODES)
        example = "e.g. ['land background', 'water background']"
        values = self.attribute_values
        _check(
            isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values),
            f"attribute_values must be a list of strings, {example}; got {values!r}.",
        )
        if self.mode == "pseudo" or values:
            names = [v.strip() for v in values]
            unused = "" if self.mode == "pseudo" else f" (mode {self.mode!r} ignores them; pass [] instead)"
            if not names:
                raise ValueError(
                    "attribute_values must name at least two values of the spurious attribute for mode 'pseudo' "
                    f"(zero-shot CLIP pseudo-labels every training image with one of them), {example}; got []. "
                    "With group labels use mode='oracle', 'groupdro' or 'jtt' instead."
                )
            blank = [i for i, name in enumerate(names) if not name]
            _check(
                not blank,
                f"attribute_values must name at least two non-empty values of the spurious attribute, {example}; "
                f"got {list(values)!r} (entry {blank[0] if blank else 0} is blank){unused}.",
            )
            _check(
                len(names) >= 2,
                f"attribute_values must name at least two values of the spurious attribute (one value cannot "
                f"split a class into groups), {example}; got {list(values)!r}{unused}.",
            )
            lowered = [name.lower() for name in names]
            repeated = sorted(name for name, count in Counter(lowered).items() if count > 1)
            _check(
                not repeated,
                f"attribute_values must be distinct (CLIP lowercases text); repeated: {repeated}; got "
                f"{list(values)!r}{unused}.",
            )
        _check(
            isinstance(self.templates, (list, tuple)) and len(self.templates) > 0,
            f"templates must be a non-empty list of prompts with a '{{}}' placeholder; got {self.templates!r}.",
        )
        for template in self.templates:
            ok = isinstance(template, str) and template.count("{}") == 1
            if ok:
                try:
                    template.format("x")
                except (IndexError, KeyError, ValueError):
                    ok = False
            _check(
                ok,
                f"template {template!r} must contain exactly one '{{}}' placeholder for the attribute value (and "
                "no other braces), e.g. 'a photo with a {}.'.",
            )
        _check(
            isinstance(self.groups_key, str) and bool(self.groups_key),
            f"groups_key must be a non-empty string; got {self.groups_key!r}.",
        )
        _positive("eta", self.eta, allow_zero=True)
        _check(0 <= self.ema < 1, f"ema must be in [0, 1); got {self.ema!r}.")
        _positive("groupdro_step", self.groupdro_step)
        _check(
            self.jtt_upweight >= 1,
            f"jtt_upweight must be >= 1 (the error set is upweighted; 1 is plain ERM); got {self.jtt_upweight!r}.",
        )
        _check(
            isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1; got {self.batch_size!r}.",
        )
        _check(
            isinstance(self.log_every, int) and not isinstance(self.log_every, bool) and self.log_every >= 0,
            f"log_every must be an integer >= 0 (0: never); got {self.log_every!r}.",
        )


class RobustConfig:
    """Which robustness add-ons ``wrap()`` attaches to a learner: one keyword per registered add-on (None: off).

    The keywords are the names of the registered add-ons (:func:`prompt_robust.addons.register_addon`): the
    built-in ``refiner``, ``counterfactual``, ``invariance`` and ``debias``, and any add-on registered by your own
    code, whose config class the registration supplies. Unset add-ons read as None.

    Example:
        >>> RobustConfig()  # no add-on: the wrapped model behaves exactly like the learner
        RobustConfig(refiner=None, counterfactual=None, invariance=None, debias=None)
        >>> RobustConfig(refiner=RefinerConfig(num_steps=5)).enabled()
        ['refiner']
    """

    def __init__(self, **addons: Any) -> None:
        object.__setattr__(self, "_addons", {})
        for name, value in addons.items():
            setattr(self, name, value)

    @staticmethod
    def addon_configs() -> dict[str, type]:
        """``{add-on name: its config class}`` of every registered add-on, in the order the model runs them."""
        from .addons import addon_configs

        return addon_configs()

    def __setattr__(self, name: str, value: Any) -> None:
        known = self.addon_configs()
        if name not in known:
            if isinstance(value, ConfigMixin):  # an add-on's config under a name nothing registered: a typo
                raise unknown_name_error("add-on", name, list(known))
            # other attributes stay possible, as on a dataclass: integrations set their own (Trainer: use_cache)
            object.__setattr__(self, name, value)
            return
        if value is not None and not isinstance(value, known[name]):
            raise TypeError(
                f"RobustConfig.{name} must be a {known[name].__name__} or None; got {type(value).__name__}."
            )
        if value is None:
            self._addons.pop(name, None)
        else:
            self._addons[name] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        known = self.addon_configs()
        if name in known:
            return self._addons.get(name)
        raise AttributeError(f"RobustConfig has no add-on {name!r}; registered add-ons: {', '.join(known)}.")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RobustConfig) and self._addons == other._addons

    __hash__ = None  # mutable, like the dataclass configs

    def __repr__(self) -> str:
        return "RobustConfig(" + ", ".join(f"{n}={self._addons.get(n)!r}" for n in self.addon_configs()) + ")"

    def enabled(self) -> list[str]:
        """Names of the add-ons that are switched on, in the order the model runs them."""
        return [name for name in self.addon_configs() if name in self._addons]

    def to_dict(self) -> dict[str, Any]:
        """``{name: config dict or None}`` of every registered add-on (JSON-ready)."""
        return {n: (self._addons[n].to_dict() if n in self._addons else None) for n in self.addon_configs()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RobustConfig:
        """Build it from :meth:`to_dict`'s output. A key naming an add-on that is not registered in this process
        is refused when it is enabled (import the module that registers it first) and skipped when it is None.

        Example:
            >>> RobustConfig.from_dict({"refiner": {"num_steps": 3}, "debias": None}).enabled()
            ['refiner']
        """
        if not isinstance(data, dict):
            raise TypeError(f"RobustConfig.from_dict expects a dict; got {type(data).__name__}.")
        known = cls.addon_configs()
        addons = {}
        for name, value in data.items():
            if name not in known:
                if value is None:
                    continue
                raise ValueError(
                    f"the config enables add-on {name!r}, which is not registered in this process (registered: "
                    f"{', '.join(known)}). Import the module that registers it (register_addon) before loading."
                )
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    f"RobustConfig.{name} must be a JSON object of {known[name].__name__} fields or null; got "
                    f"{_short_repr(value)} ({type(value).__name__})."
                )
            addons[name] = None if value is None else known[name].from_dict(value)
        return cls(**addons)
