"""Each learner's published training recipe as a named preset, with the file it was read from.

The values below were read from the reference repositories' configs (the files named in each preset's
``source``); nothing here is tuned. Shared defaults come from Dassl, the training framework of all four
repositories (``KaiyangZhou/Dassl.pytorch``, ``dassl/config/defaults.py``: ``OPTIM.WEIGHT_DECAY = 5e-4``,
``OPTIM.MOMENTUM = 0.9``), and every config sets ``LR_SCHEDULER: cosine``, ``WARMUP_EPOCH: 1``,
``WARMUP_TYPE: constant``, ``WARMUP_CONS_LR: 1e-5``.

* CoOp (https://arxiv.org/abs/2109.01134), ``KaiyangZhou/CoOp``:
  ``configs/trainers/CoOp/vit_b16_ctxv1.yaml``: SGD, lr 0.002, 200 epochs, batch 32, context initialised from
  "a photo of a"; ImageNet uses ``vit_b16_ep50_ctxv1.yaml`` (the same with 50 epochs; ``COOP.md``: "for ImageNet,
  we use ``*_ep50.yaml`` for all settings"); ``train.py`` ``extend_cfg``: ``COOP.N_CTX 16`` (replaced by the four
  words of ``CTX_INIT``), ``CSC False``, ``CLASS_TOKEN_POSITION end``, ``PREC fp16``. The CoCoOp paper compares
  with CoOp trained with this context (4 tokens from "a photo of a").
* CoCoOp (https://arxiv.org/abs/2203.05557), ``KaiyangZhou/CoOp``:
  ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml`` (the config of ``scripts/cocoop/base2new_train.sh``
  and ``xd_train.sh``): SGD, lr 0.002, 10 epochs, batch 1, ``N_CTX 4``, ``CTX_INIT "a photo of a"``, ``PREC fp16``.
* VPT, the "Deep Vision Prompting" baseline of ``muzairkhattak/multimodal-prompt-learning``:
  ``configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml`` (used by ``scripts/vpt/base2new_train_vpt.sh`` and
  ``xd_train_vpt.sh``): SGD, lr 0.0025, 5 epochs, batch 4, ``N_CTX_VISION 8``, ``PROMPT_DEPTH_VISION 12``,
  ``PREC fp16``; the text side is the fixed prompt "a photo of a {}." (``trainers/vpt.py``).
* MaPLe (https://arxiv.org/abs/2210.03117), ``muzairkhattak/multimodal-prompt-learning``:
  ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`` (base-to-new): SGD, lr 0.0035, 5 epochs, batch 4,
  ``N_CTX 2``, ``CTX_INIT "a photo of a"``, ``PROMPT_DEPTH 9``, ``PREC fp16``; trained on ImageNet for the
  cross-dataset and domain-generalisation tables with ``vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml``: lr 0.0026,
  2 epochs, ``PROMPT_DEPTH 3``.

Where the library's learners differ from the reference code, ``docs/reproduce.md`` says so (MaPLe's layout is the
reference's: with ``N_CTX 2`` and "a photo of a", "a photo" is learned and "of a" stays fixed text).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import unknown_name_error
from ..learners import LEARNERS
from ..training import FitConfig

__all__ = ["PRESETS", "PRESET_FIELDS", "LearnerPreset", "parse_overrides", "resolve_preset"]


@dataclass(frozen=True)
class LearnerPreset:
    """One learner's training recipe on one kind of training set.

    Attributes:
        learner: the learner's registry name (``coop``, ``cocoop``, ``vpt``, ``maple``, ``zeroshot``).
        source: the reference file(s) the values were read from.
        optimizer: ``sgd`` or ``adamw`` (all references: SGD with momentum).
        lr: peak learning rate.
        epochs: passes over the few-shot training set.
        batch_size: images per optimizer step.
        warmup_epochs: epochs held at ``warmup_lr`` before the cosine decay (Dassl's constant warm-up).
        warmup_type: ``constant`` (Dassl's) or ``linear``.
        warmup_lr: the learning rate of a constant warm-up.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        precision: the reference's precision (``PREC``), for the record; what runs is ``--precision``.
        learner_config: fields of the learner's config (``CoOpConfig`` ...).

    Example:
        >>> PRESETS["paper"]["coop"]["default"].lr
        0.002
    """

    learner: str
    source: str
    lr: float = 0.002
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    warmup_epochs: int = 1
    warmup_type: str = "constant"
    warmup_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    precision: str = "fp16"
    learner_config: Mapping[str, Any] = field(default_factory=dict)

    def fit_config(
        self, n_train: int, *, seed: int, steps: int | None = None, progress: bool = True, num_workers: int = 0
    ) -> FitConfig:
        """The :class:`~prompt_robust.training.FitConfig` of this recipe on ``n_train`` training images: epochs
        become steps (``ceil(n_train / batch_size)`` per epoch) and the warm-up lasts ``warmup_epochs`` epochs.
        ``steps`` (an override) replaces the epoch count; a warm-up longer than the run is cut to a tenth of it.

        Example:
            >>> PRESETS["paper"]["coop"]["default"].fit_config(64, seed=1).steps  # 2 batches x 200 epochs
            400
        """
        per_epoch = math.ceil(n_train / self.batch_size)
        total = steps if steps is not None else self.epochs * per_epoch
        warmup = self.warmup_epochs * per_epoch
        if warmup >= total:
            warmup = total // 10
        return FitConfig(
            steps=total,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            warmup_steps=warmup,
            warmup=self.warmup_type,
            warmup_lr=self.warmup_lr,
            seed=seed,
            progress=progress,
            num_workers=num_workers,
        )

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready data (recorded beside every result)."""
        out = dataclasses.asdict(self)
        out["learner_config"] = dict(self.learner_config)
        return out


_DASSL = "KaiyangZhou/Dassl.pytorch dassl/config/defaults.py (OPTIM.WEIGHT_DECAY 5e-4, OPTIM.MOMENTUM 0.9)"
_COOP_CFG = "KaiyangZhou/CoOp configs/trainers/CoOp/"
_MAPLE_CFG = "muzairkhattak/multimodal-prompt-learning configs/trainers/"

#: ``{preset name: {learner: {variant: LearnerPreset}}}``; the variant ``"imagenet"`` is used when the training set
#: is ImageNet (the cross-dataset and domain-generalisation source, and ImageNet in base-to-new), ``"default"``
#: otherwise.
PRESETS: dict[str, dict[str, dict[str, LearnerPreset]]] = {}

_COOP = LearnerPreset(
    learner="coop",
    source=f"{_COOP_CFG}vit_b16_ctxv1.yaml; KaiyangZhou/CoOp train.py (TRAINER.COOP defaults); {_DASSL}",
    lr=0.002,
    epochs=200,
    batch_size=32,
    learner_config={"n_ctx": 16, "ctx_init": "a photo of a", "class_specific": False, "class_token_position": "end"},
)
_COCOOP = LearnerPreset(
    learner="cocoop",
    source=f"KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml; {_DASSL}",
    lr=0.002,
    epochs=10,
    batch_size=1,
    # text_chunk_size is no hyperparameter (chunked text passes give identical features): it bounds the memory of
    # batch x classes per-image prompts (100 test images x 1000 ImageNet classes)
    learner_config={"n_ctx": 4, "ctx_init": "a photo of a", "text_chunk_size": 4096},
)
_VPT = LearnerPreset(
    learner="vpt",
    source=f"{_MAPLE_CFG}VPT/vit_b16_c2_ep5_batch4_4.yaml; muzairkhattak/multimodal-prompt-learning trainers/vpt.py "
    f"(fixed text prompt); {_DASSL}",
    lr=0.0025,
    epochs=5,
    batch_size=4,
    learner_config={"n_tokens": 8, "deep": True, "depth": 12, "template": "a photo of a {}."},
)
_MAPLE = LearnerPreset(
    learner="maple",
    source=f"{_MAPLE_CFG}MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml; {_DASSL}",
    lr=0.0035,
    epochs=5,
    batch_size=4,
    learner_config={"n_ctx": 2, "ctx_init": "a photo of a", "depth": 9},
)
_ZEROSHOT = LearnerPreset(
    learner="zeroshot",
    source="KaiyangZhou/CoOp trainers/zsclip.py (CUSTOM_TEMPLATES: one hand-written prompt per dataset)",
    epochs=0,
    precision="fp16",
)

PRESETS["paper"] = {
    "coop": {
        "default": _COOP,
        "imagenet": dataclasses.replace(
            _COOP, source=_COOP.source.replace("vit_b16_ctxv1.yaml", "vit_b16_ep50_ctxv1.yaml"), epochs=50
        ),
    },
    "cocoop": {"default": _COCOOP, "imagenet": _COCOOP},
    "vpt": {"default": _VPT, "imagenet": _VPT},
    "maple": {
        "default": _MAPLE,
        "imagenet": dataclasses.replace(
            _MAPLE,
            source=f"{_MAPLE_CFG}MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml; {_DASSL}",
            lr=0.0026,
            epochs=2,
            learner_config={"n_ctx": 2, "ctx_init": "a photo of a", "depth": 3},
        ),
    },
    "zeroshot": {"default": _ZEROSHOT, "imagenet": _ZEROSHOT},
}
# one epoch of every paper recipe: checks that a machine runs the whole pipeline; it reproduces nothing
PRESETS["quick"] = {
    learner: {variant: dataclasses.replace(p, epochs=min(p.epochs, 1)) for variant, p in variants.items()}
    for learner, variants in PRESETS["paper"].items()
}

#: the recipe fields ``--set`` may override (besides the learner config's fields and ``steps``)
PRESET_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(LearnerPreset)
    if f.name not in ("learner", "source", "learner_config", "precision")  # what runs: ReproduceConfig.precision
)
_TYPES = {"lr": float, "warmup_lr": float, "momentum": float, "weight_decay": float, "epochs": int}
_TYPES |= {"batch_size": int, "warmup_epochs": int, "steps": int}


def _parse_value(text: str) -> Any:
    """``0.01`` -> 0.01, ``true`` -> True, ``none`` -> None, ``[1, 2]`` -> a list; anything else stays a string."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.01", "maple.depth=3"]`` -> ``{"lr": 0.01, "maple.depth": 3}``, keys checked in
    :func:`resolve_preset`.

    Example:
        >>> parse_overrides(["lr=0.01", "coop.ctx_init=a photo of the", "steps=2"])
        {'lr': 0.01, 'coop.ctx_init': 'a photo of the', 'steps': 2}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"overrides are KEY=VALUE (e.g. lr=0.01 or maple.depth=3); got {item!r}.")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _learner_fields(learner: str) -> list[str]:
    return [f.name for f in dataclasses.fields(LEARNERS[learner].config_class)]


def resolve_preset(
    name: str, learner: str, variant: str, overrides: Mapping[str, Any] | None = None
) -> tuple[LearnerPreset, int | None]:
    """The recipe ``name`` of ``learner`` for a training set of kind ``variant`` (``default`` or ``imagenet``) with
    ``overrides`` applied: ``key=value`` for every learner, ``<learner>.key=value`` for one. Keys are recipe
    fields (:data:`PRESET_FIELDS`), fields of the learner's config, or ``steps`` (optimizer steps instead of
    epochs). Returns ``(preset, steps)``.

    Raises:
        ValueError: an unknown preset, learner or key (the closest valid one is suggested), or a value of the
            wrong type.

    Example:
        >>> preset, steps = resolve_preset("paper", "maple", "imagenet", {"lr": 0.01, "coop.lr": 1.0, "steps": 2})
        >>> preset.lr, preset.learner_config["depth"], steps
        (0.01, 3, 2)
    """
    if name not in PRESETS:
        raise unknown_name_error("preset", name, list(PRESETS))
    if learner not in PRESETS[name]:
        raise unknown_name_error("learner", learner, list(PRESETS[name]))
    preset = PRESETS[name][learner][variant]
    changes: dict[str, Any] = {}
    config = dict(preset.learner_config)
    steps = None
    learner_fields = _learner_fields(learner)
    every = sorted({*PRESET_FIELDS, "steps", *(f for lrn in LEARNERS for f in _learner_fields(lrn))})
    for key, value in (overrides or {}).items():
        scope, _, field_name = key.rpartition(".")
        if scope and scope not in LEARNERS:
            raise unknown_name_error(f"learner in override {key!r}", scope, list(LEARNERS))
        if field_name not in every:
            raise unknown_name_error("override key", field_name, every)
        if scope and scope != learner:
            continue
        if field_name in _TYPES and value is not None:
            wanted = _TYPES[field_name]
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (wanted is int and value != int(value))
            ):
                raise ValueError(f"override {key}={value!r}: {field_name} must be {wanted.__name__}.")
            value = wanted(value)
        if field_name == "steps":
            if value is not None and value < 1:
                raise ValueError(f"override {key}={value!r}: steps must be >= 1 (or none: the preset's epochs).")
            steps = value
        elif field_name in PRESET_FIELDS:
            changes[field_name] = value
        elif field_name in learner_fields:
            config[field_name] = value
        # a field of another learner's config, given for every learner: not this learner's concern
    resolved = dataclasses.replace(preset, learner_config=config, **changes)
    if resolved.epochs < 1 and learner != "zeroshot":
        raise ValueError(f"{learner}: epochs must be >= 1; got {resolved.epochs!r}.")
    return resolved, steps
