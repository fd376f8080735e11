"""DebiasConfig: the settings of the group reweighting add-on (``RobustConfig(debias=...)``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from ...attributes import DEFAULT_TEMPLATES
from ...config import ConfigMixin, _check, help_field

__all__ = ["DebiasConfig"]


@dataclass
class DebiasConfig(ConfigMixin):
    """Group reweighting against spurious correlations: annotation-free DPT ("Debiased Prompt Tuning in
    Vision-Language Model without Annotations", https://arxiv.org/abs/2503.08368) and the baselines it is judged
    against. Implemented by :class:`prompt_robust.addons.debias.DebiasReweighting` (see ``docs/debias.md``).

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
        hint="E.g. ['land background', 'water background'].",
    )
    eta: float = help_field(
        1.0, "Sharpness of the difficulty term exp[eta (1 - p_y|g)] (mode 'pseudo'; 0: 1/N_g).", ge=0
    )
    ema: float = help_field(
        0.9, "EMA factor of the groups' mean true-class probability, in [0, 1) (mode 'pseudo').", ge=0, lt=1
    )
    mode: str = help_field(
        "pseudo",
        "Where groups come from: pseudo (annotation-free), oracle, groupdro or jtt.",
        choices="MODES",
        kind="debias mode",
    )
    templates: list[str] = help_field(
        list(DEFAULT_TEMPLATES),
        "Zero-shot prompts naming an attribute value ('{}'); text features are averaged over them (mode 'pseudo').",
        min_len=1,
        placeholder="the attribute value",
    )
    groups_key: str = help_field(
        "groups", "Batch key holding the true group ids (modes 'oracle' and 'groupdro').", min_len=1
    )
    groupdro_step: float = help_field(0.01, "Step size of group DRO's exponentiated-gradient group weights.", gt=0)
    jtt_upweight: float = help_field(
        20.0,
        "JTT's lambda_up: loss weight of the ERM run's misclassified examples.",
        ge=1,
        hint="The error set is upweighted; 1 is plain ERM.",
    )
    batch_size: int = help_field(64, "Images per forward pass when fit_addons() pseudo-labels the training set.", ge=1)
    log_every: int = help_field(50, "Log the group weights every this many training batches (0: never).", ge=0)

    MODES: ClassVar[tuple[str, ...]] = ("pseudo", "oracle", "groupdro", "jtt")

    def __post_init__(self) -> None:
        super().__post_init__()
        example = "e.g. ['land background', 'water background']"
        values = self.attribute_values
        if self.mode == "pseudo" or values:
            names = [v.strip() for v in values]
            unused = "" if self.mode == "pseudo" else f" (mode {self.mode!r} ignores them; pass [] instead)"
            if not names:
                raise ValueError(
                    "DebiasConfig.attribute_values must name at least two values of the spurious attribute for mode "
                    f"'pseudo' (zero-shot CLIP pseudo-labels every training image with one of them), {example}; got []. "
                    "With group labels use mode='oracle', 'groupdro' or 'jtt' instead."
                )
            blank = [i for i, name in enumerate(names) if not name]
            _check(
                not blank,
                f"DebiasConfig.attribute_values must name at least two non-empty values of the spurious attribute, "
                f"{example}; got {list(values)!r} (entry {blank[0] if blank else 0} is blank){unused}.",
            )
            _check(
                len(names) >= 2,
                f"DebiasConfig.attribute_values must name at least two values of the spurious attribute (one value "
                f"cannot split a class into groups), {example}; got {list(values)!r}{unused}.",
            )
            lowered = [name.lower() for name in names]
            repeated = sorted(name for name, count in Counter(lowered).items() if count > 1)
            _check(
                not repeated,
                f"DebiasConfig.attribute_values must be distinct (CLIP lowercases text); repeated: {repeated}; got "
                f"{list(values)!r}{unused}.",
            )
