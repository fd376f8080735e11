"""InvarianceConfig: the settings of the invariant causal mechanism projection (``RobustConfig(invariance=...)``)."""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import ConfigMixin, _check, _positive, help_field, unknown_name_error

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
        "arguments of its function in prompt_robust.addons.invariance.interventions (unset: that function's defaults).",
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
