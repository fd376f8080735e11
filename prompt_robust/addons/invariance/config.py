"""InvarianceConfig: the settings of the invariant causal mechanism projection (``RobustConfig(invariance=...)``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import ConfigMixin, _check, help_field

__all__ = ["InvarianceConfig"]


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
        ge=0,
    )
    dim: int | None = help_field(
        None, "Kept dimension k of the projection; None: chosen on held-out training data.", ge=1
    )
    interventions: list[str] = help_field(
        ["color_jitter", "gaussian_blur", "posterize"],
        "Image interventions used to build pairs (default: those that keep the class, measured by bench --suite "
        "calibration; grayscale, invert, solarize and equalize are available but change what the world's classes "
        "look like).",
        choices="INTERVENTIONS",
        kind="intervention",
        min_len=1,
        unique=True,
    )
    intervention_params: dict[str, dict[str, Any]] = help_field(
        {},
        'Strength overrides per intervention, e.g. {"color_jitter": {"brightness": 0.2}}: the keyword '
        "arguments of its function in prompt_robust.addons.invariance.interventions (unset: that function's defaults).",
        hint='It must map intervention names to dicts of keyword arguments, e.g. {"posterize": {"bits": 5}}.',
    )
    pairs_per_image: int = help_field(
        1, "Draws per training image of every random intervention (color_jitter, gaussian_blur); others: one.", ge=1
    )
    text_interventions: bool = help_field(
        False, "Also use text pairs (text_base_template vs each of text_templates, for every class)."
    )
    text_base_template: str = help_field(
        "a photo of a {}.", "Base template of the text pairs and of selection.", placeholder="the class name"
    )
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
        placeholder="the class name",
    )
    text_weight: float = help_field(0.5, "Share of the text pairs in the intervention term, in [0, 1].", ge=0, le=1)
    lam_grid: list[float] = help_field(
        [0.0, 0.5, 1.0, 2.0, 5.0, 10.0], "Values of lam tried when lam is None.", ge=0, min_len=1
    )
    dim_fractions: list[float] = help_field(
        [0.125, 0.25, 0.5, 0.75, 1.0],
        "Fractions of the feature size tried as dim when dim is None.",
        gt=0,
        le=1,
        min_len=1,
        hint="E.g. [0.25, 0.5, 1.0].",
    )
    val_fraction: float = help_field(
        0.25, "Share of each class's training images held out to choose lam/dim.", gt=0, lt=1
    )
    selection: str = help_field(
        "zero_shot",
        "Predictor scored when choosing lam/dim: zero_shot (base template) or linear_probe.",
        choices="SELECTIONS",
        kind="selection predictor",
    )
    probe_reg: float = help_field(1e-3, "L2 strength of the linear probe (selection='linear_probe').", ge=0)
    feature_batch_size: int = help_field(64, "Images per batch when computing interventional features.", ge=1)

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
        super().__post_init__()
        unused = sorted(set(self.intervention_params) - set(self.interventions))
        _check(
            not unused,
            f"InvarianceConfig.intervention_params names {unused}, which are not in interventions "
            f"{list(self.interventions)}: add them to interventions or remove their parameters.",
        )
        from .interventions import IMAGE_INTERVENTIONS  # a lazy import: that module imports this one

        for name, params in self.intervention_params.items():
            accepted = [
                p.name
                for p in inspect.signature(IMAGE_INTERVENTIONS[name].fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            ]
            bad = sorted(set(params) - set(accepted))
            _check(
                not bad,
                f"InvarianceConfig.intervention_params[{name!r}] has unknown parameters {bad}; {name} accepts "
                f"{accepted or 'no parameters'}.",
            )
        _check(
            not self.text_interventions or len(self.text_templates) > 0,
            "InvarianceConfig: text_interventions=True needs at least one entry in text_templates (or set "
            "text_interventions=False).",
        )
        _check(
            self.text_base_template not in self.text_templates,
            f"InvarianceConfig.text_templates must not repeat the base template {self.text_base_template!r} (a pair "
            "would be empty).",
        )
