"""Run a protocol over every present dataset, method and seed, resumably, and write its table.

Layout of the output folder (``out``)::

    train/<group>/<dataset>/<method>/seed<k>/   one training: train.json (its settings, "running" or "done"),
                                                 adapter/ (the tuned prompt and add-ons), checkpoints/ while it runs,
                                                 cache/ (what add-ons derive from the data)
    splits/<group>/<dataset>_k<shots>_seed<k>.json   the few-shot indices of every training (with the classes)
    results/<protocol>/<dataset>/<method>/seed<k>.json   one finished unit: its settings and metrics
    tables/<protocol>.md, tables/<protocol>.json          the table in the papers' layout

A unit is one (dataset, method, seed) of a protocol. It is written atomically when it finishes and skipped by a
rerun with the same settings; a rerun with other settings is refused before anything runs (``overwrite=True``
moves the results and trainings of other settings into ``out/replaced-<UTC time>/``). A training interrupted
midway resumes from its last checkpoint (:func:`prompt_robust.training.fit`), and a finished training is reused
by every unit that tests it (cross-dataset and domain generalisation share the ImageNet trainings).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__, _io
from ..backbones.base import ClipBackbone
from ..config import RobustConfig, unknown_name_error
from ..data.fewshot import sample_few_shot, save_split
from ..data.items import collate_items
from ..data.loaders import ImageListDataset, transform_for
from ..eval.metrics import accuracy, accuracy_gap, harmonic_mean, per_group_accuracy, worst_group_accuracy
from ..learners import build_learner
from ..methods import parse_method
from ..model import RobustPromptModel, wrap
from ..training import fit
from .augment import RandomResizedCropFlip
from .datasets import DATASETS, DatasetSpec
from .presets import PRESETS, LearnerPreset, resolve_preset
from .protocols import Protocol, get_protocol
from .table import build_table, write_table

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "ReproduceConfig",
    "ReproduceConflictError",
    "ReproduceReport",
    "dataset_status",
    "run_reproduce",
]

logger = logging.getLogger(__name__)

#: the version of the protocol code; results of another version are not reused
FORMAT = 1
DEVICES = ("auto", "cpu", "cuda")
#: ``auto``: bf16 autocast on a GPU that supports it (else fp16), fp32 on the CPU
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ReproduceConflictError(ValueError):
    """``out`` holds results or trainings made with other settings; they are never mixed into one table.

    Example:
        >>> issubclass(ReproduceConflictError, ValueError)
        True
    """


@dataclass
class ReproduceConfig:
    """What ``prompt-robust reproduce`` runs.

    Attributes:
        protocol: ``base2new``, ``cross_dataset``, ``domain_generalization`` or ``spurious``.
        data_root: the folder holding the datasets in CoOp's layout (``docs/datasets.md``).
        methods: learner names with optional add-ons (``coop``, ``coop+refiner``, ``maple+debias:oracle``).
        seeds: one few-shot draw, initialisation and training per seed; tables show mean ± std.
        shots: training images per class (0: the whole training split).
        preset: the learners' recipes (``paper``: the reference configs; ``quick``: one epoch of each).
        overrides: recipe or learner-config fields to change, ``{"lr": 0.01, "maple.depth": 3, "steps": 2}``.
        addons: config fields of the add-ons, ``{"refiner": {"num_steps": 5}}``.
        datasets: run only these datasets of the protocol (None: every present one).
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda`` (``cuda:1`` ...).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (``torch.autocast``; fp32 runs without it).
        augment: train with the references' random resized crop and flip (else CLIP's centre crop).
        num_workers: data-loading processes for training and testing (None: 8 or the cores available on a GPU
            run, 0 on the CPU).
        eval_batch_size: test images per forward pass (the references' ``TEST.BATCH_SIZE``: 100).

    Example:
        >>> ReproduceConfig("base2new", "data", ["coop", "coop+refiner"]).seeds
        [1, 2, 3]
    """

    protocol: str
    data_root: str
    methods: list[str] = field(default_factory=lambda: ["zeroshot", "coop"])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    shots: int = 16
    preset: str = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    addons: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasets: list[str] | None = None
    device: str = "auto"
    precision: str = "auto"
    augment: bool = True
    num_workers: int | None = None
    eval_batch_size: int = 100

    def __post_init__(self) -> None:
        protocol = get_protocol(self.protocol)
        if not self.methods:
            raise ValueError("methods must name at least one method (e.g. coop or coop+refiner).")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct; got {self.methods}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one; got {self.seeds}.")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ValueError(f"seeds must be integers in 0..2**32-1; got {seed!r}.")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ValueError(f"shots must be an integer >= 0 (0: the whole training split); got {self.shots!r}.")
        if self.preset not in PRESETS:
            raise unknown_name_error("preset", self.preset, list(PRESETS))
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise unknown_name_error("device", self.device, DEVICES)
        if self.precision not in PRECISIONS:
            raise unknown_name_error("precision", self.precision, PRECISIONS)
        for name in ("num_workers", "eval_batch_size"):
            value = getattr(self, name)
            if value is None and name == "num_workers":
                continue
            low = 0 if name == "num_workers" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        configs = RobustConfig.addon_configs()
        for name in self.addons:
            if name not in configs:
                raise unknown_name_error("add-on", name, list(configs))
        if self.datasets is not None:
            allowed = [*protocol.sources, *protocol.targets]
            for name in self.datasets:
                if name not in allowed:
                    raise unknown_name_error(f"dataset of the {protocol.name} protocol", name, allowed)


@dataclass
class ReproduceReport:
    """What :func:`run_reproduce` did.

    Attributes:
        protocol: the protocol's name.
        missing: one line per dataset of the protocol that is not under the data root (what was looked for).
        ran / reused: the units (``dataset/method/seed``) computed now / read from an earlier run.
        moved_to: where results and trainings of other settings went (``overwrite=True``), or None.
        table_markdown: the table in the papers' layout.
        table: the same as data (what ``tables/<protocol>.json`` holds).
        paths: the written table files.
        device / precision: where and how it ran.
    """

    protocol: str
    missing: list[str]
    ran: list[str]
    reused: list[str]
    moved_to: Path | None
    table_markdown: str
    table: dict[str, Any]
    paths: dict[str, Path]
    device: str
    precision: str


# ---------------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Training:
    dataset: str
    method: str
    learner: str
    addons: list[str]
    seed: int
    preset: LearnerPreset
    steps: int | None
    addon_configs: dict[str, Any]
    settings: dict[str, Any]
    directory: Path

    @property
    def trains(self) -> bool:
        """Whether anything is learned (zero-shot CLIP without add-ons learns nothing)."""
        return self.learner != "zeroshot" or bool(self.addons)


@dataclass
class _Unit:
    dataset: str
    training: _Training
    settings: dict[str, Any]
    path: Path

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.training.method}/seed{self.training.seed}"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}); use device 'cpu' or 'auto', or install a CUDA build of torch."
        )
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU with bf16 support, fp16 on other GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``precision`` on ``device`` (a null context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def _variant(dataset: str) -> str:
    return "imagenet" if dataset == "imagenet" else "default"


def _addon_configs(
    addons: Sequence[str], spec: DatasetSpec, user: Mapping[str, Mapping[str, Any]], method: str
) -> dict[str, Any]:
    """Each add-on's config: the user's fields, the dataset's nuisance words where the add-on names the spurious
    attribute (as ``prompt-robust bench`` does), the ``:mode`` of the method."""
    configs = RobustConfig.addon_configs()
    out = {}
    for addon in addons:
        name, _, mode = addon.partition(":")
        fields = dict(user.get(name, {}))
        if mode:
            fields["mode"] = mode
        words = list(spec.attribute_values)
        if name == "debias" and words:
            fields.setdefault("attribute_values", words)
        elif name == "counterfactual" and words and fields.get("twin", "auto") != "class":
            fields.setdefault("attribute_values", words)
        if name == "debias" and fields.get("mode", "pseudo") == "pseudo" and not fields.get("attribute_values"):
            raise ValueError(
                f"{method} on {spec.name}: the debias add-on needs words for the spurious attribute it pseudo-labels; "
                f"{spec.title} names none (the spurious datasets do). Give them with addons={{'debias': "
                "{'attribute_values': [...]}} (--debias-config) or leave debias out of this protocol."
            )
        out[addon] = configs[name](**fields)
    return out


def _plan(
    protocol: Protocol,
    config: ReproduceConfig,
    sources: Sequence[str],
    tested: Sequence[str],
    methods: Sequence[tuple[str, str, list[str]]],
    backbone: ClipBackbone,
    precision: str,
    out: Path,
) -> list[_Unit]:
    units = []
    for source in sources:
        spec = DATASETS[source]
        for method, learner, addons in methods:
            preset, steps = resolve_preset(config.preset, learner, _variant(source), config.overrides)
            addon_configs = _addon_configs(addons, spec, config.addons, method)
            for seed in config.seeds:
                directory = out / "train" / protocol.train_group / source / method / f"seed{seed}"
                settings = {  # through JSON: what a rerun reads back compares equal
                    "format": FORMAT,
                    "train_on": {"dataset": source, "classes": protocol.classes, "shots": config.shots},
                    "method": method,
                    "seed": seed,
                    "preset": config.preset,
                    "recipe": {**preset.to_dict(), "steps": steps},
                    "addons": {name: cfg.to_dict() for name, cfg in addon_configs.items()},
                    "augment": config.augment,
                    "precision": precision,
                    "backbone": backbone.fingerprint(),
                }
                settings = json.loads(json.dumps(settings))
                training = _Training(
                    source, method, learner, addons, seed, preset, steps, addon_configs, settings, directory
                )
                for dataset in tested if protocol.targets else (source,):
                    unit_settings = {"protocol": protocol.name, "dataset": dataset, "training": settings}
                    path = out / "results" / protocol.name / dataset / method / f"seed{seed}.json"
                    units.append(_Unit(dataset, training, unit_settings, path))
    return units


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 30 else text[:27] + "..."

    shown = [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in keys[:3]]
    return "; ".join(shown) + ("; ..." if len(keys) > 3 else "")


def _conflicts(units: Sequence[_Unit]) -> list[tuple[Path, str]]:
    """``(path, what differs)`` for every saved result or training made with other settings."""
    found: dict[Path, str] = {}
    for unit in units:
        if unit.path.is_file():
            saved = _io.read_json(unit.path, "reproduce result")
            if saved.get("settings") != unit.settings:
                found[unit.path] = _difference(saved.get("settings", {}), unit.settings)
        record = unit.training.directory / "train.json"
        if record.is_file() and unit.training.directory not in found:
            saved = _io.read_json(record, "reproduce training record")
            if saved.get("settings") != unit.training.settings:
                found[unit.training.directory] = _difference(saved.get("settings", {}), unit.training.settings)
    return list(found.items())


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def _readable(names: Sequence[str]) -> list[str]:
    """Class names as the references prompt them (``name.replace("_", " ")`` in every trainer)."""
    return [name.replace("_", " ") for name in names]


def _class_halves(n: int) -> tuple[range, range]:
    """CoCoOp's ``subsample_classes``: base = the first ``ceil(n / 2)`` labels, new = the rest."""
    m = math.ceil(n / 2)
    return range(m), range(m, n)


def _with_classes(data: ImageListDataset, classes: range, indices: Sequence[int] | None = None) -> ImageListDataset:
    """The examples (of ``indices``, else all) whose label lies in ``classes``, relabelled ``0..len(classes)-1``
    over those classes' names (CoCoOp's relabelling of the base and new halves)."""
    keep = [i for i in (range(len(data)) if indices is None else indices) if data.labels[i] in classes]
    if not keep:
        raise ValueError(f"{data.source} has no example of classes {classes.start}..{classes.stop - 1}.")

    def take(values: list[int] | None) -> list[int] | None:
        return None if values is None else [values[i] for i in keep]

    return ImageListDataset(
        [data.paths[i] for i in keep],
        [data.labels[i] - classes.start for i in keep],
        data.classnames[classes.start : classes.stop],
        transform=data.transform,
        root=data.root,
        source=data.source,
        groups=take(data.groups),
        group_names=data.group_names,
        attributes=take(data.attributes),
        attribute_names=data.attribute_names,
    )


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------
class _Runner:
    def __init__(
        self,
        protocol: Protocol,
        config: ReproduceConfig,
        backbone: ClipBackbone,
        out: Path,
        device: torch.device,
        precision: str,
        progress: bool,
    ) -> None:
        self.protocol = protocol
        self.config = config
        self.backbone = backbone
        self.out = out
        self.device = device
        self.precision = precision
        self.progress = progress
        self.root = Path(config.data_root)
        self.workers = config.num_workers
        if self.workers is None:  # decoding JPEGs keeps a GPU waiting; on the CPU the model is the bottleneck
            self.workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
            self.workers = self.workers if device.type == "cuda" else 0
        self.plain = transform_for(backbone)
        self.augmented = RandomResizedCropFlip(backbone.image_size, backbone.image_mean, backbone.image_std)
        self._tests: dict[str, ImageListDataset] = {}
        self._train: dict[str, ImageListDataset] = {}

    # -- training ----------------------------------------------------------------------------------------------
    def _training_sets(self, training: _Training) -> tuple[ImageListDataset, ImageListDataset, dict[str, Any]]:
        """(augmented, plain) few-shot training sets of ``training`` and the split's record (saved)."""
        if training.dataset not in self._train:  # keep one file list (ImageNet's has 1.28M entries)
            self._train = {training.dataset: DATASETS[training.dataset].load(self.root, "train", self.plain)}
        full = self._train[training.dataset]
        classes = range(len(full.classnames))
        if self.protocol.classes == "base":
            classes = _class_halves(len(full.classnames))[0]
        shots = self.config.shots
        if shots:
            indices = sample_few_shot(full.labels, shots, training.seed, classes=list(classes), allow_fewer=True)
        else:
            indices = [i for i, label in enumerate(full.labels) if label in classes]
        digest = hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]
        meta = {
            "dataset": training.dataset,
            "k": shots,
            "seed": training.seed,
            "classes": [classes.start, classes.stop],
            "n_total": len(full),
            "sha256": digest,
        }
        split_path = (
            self.out / "splits" / self.protocol.train_group / f"{training.dataset}_k{shots}_seed{training.seed}.json"
        )
        save_split(split_path, indices, meta=meta, overwrite=True)
        plain = _with_classes(full, classes, indices)
        augmented = plain.subset(range(len(plain)))
        augmented.transform = self.augmented if self.config.augment else self.plain
        return augmented, plain, {"path": str(split_path.relative_to(self.out)), **meta}

    def _build(self, training: _Training, classnames: Sequence[str], template: str) -> RobustPromptModel:
        settings = dict(training.preset.learner_config)
        if training.learner == "zeroshot":
            settings = {"templates": [template]}
        if training.learner == "vpt" and settings.get("depth"):
            # the references prompt all 12 layers of ViT-B/16; a smaller backbone has fewer
            settings["depth"] = min(int(settings["depth"]), self.backbone.num_vision_layers)
        torch.manual_seed(training.seed)
        learner = build_learner(training.learner, self.backbone, _readable(classnames), **settings)
        model = wrap(learner, RobustConfig(**{a.partition(":")[0]: c for a, c in training.addon_configs.items()}))
        return model.to(self.device)

    def trained(self, training: _Training) -> RobustPromptModel | None:
        """The model of ``training``: loaded when it finished earlier, else trained now (None: nothing to train)."""
        if not training.trains:
            return None
        directory = training.directory
        record, adapter = directory / "train.json", directory / "adapter"
        if record.is_file() and (adapter / "adapter_config.json").is_file():
            saved = _io.read_json(record, "reproduce training record")
            if saved.get("status") == "done" and saved.get("settings") == training.settings:
                model = RobustPromptModel.from_pretrained(adapter, backbone=self.backbone)
                return model.to(self.device)
        _io.write_json(record, {"settings": training.settings, "status": "running"})
        started = time.monotonic()
        augmented, plain, split = self._training_sets(training)
        model = self._build(training, plain.classnames, DATASETS[training.dataset].template)
        cache, checkpoints = directory / "cache", directory / "checkpoints"
        progress = self.progress
        summary: dict[str, Any] = {}
        with autocast(self.device, self.precision):
            model.fit_addons(plain, phase="before_prompt", seed=training.seed, cache_dir=cache, progress=progress)
            if any(p.requires_grad for p in model.parameters()):
                fit_config = training.preset.fit_config(
                    len(augmented),
                    seed=training.seed,
                    steps=training.steps,
                    progress=progress,
                    num_workers=self.workers,
                )
                fit_config.checkpoint_every = max(1, math.ceil(fit_config.steps / 20))
                result = fit(model, augmented, fit_config, checkpoint_dir=checkpoints)
                summary = {"steps": result.steps, "final_loss": result.final_loss, "resumed_from": result.resumed_from}
            logs = model.fit_addons(
                plain,
                phase="after_prompt",
                seed=training.seed,
                cache_dir=cache,
                checkpoint_dir=checkpoints,
                progress=progress,
            )
        model.save_pretrained(adapter, overwrite=True)
        _io.write_json(
            record,
            {
                "settings": training.settings,
                "status": "done",
                "split": split,
                "n_train": len(plain),
                "fit": summary,
                "addon_logs": {k: float(v) for k, v in logs.items()},
                "seconds": round(time.monotonic() - started, 3),
                "device": str(self.device),
                "prompt_robust_version": __version__,
            },
        )
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is the finished training
        return model

    # -- testing -----------------------------------------------------------------------------------------------
    def _test_set(self, dataset: str) -> ImageListDataset:
        if dataset not in self._tests:
            self._tests = {dataset: DATASETS[dataset].load(self.root, "test", self.plain)}  # keep one list
        return self._tests[dataset]

    @torch.no_grad()
    def _predictions(self, model: RobustPromptModel, data: ImageListDataset) -> torch.Tensor:
        loader = DataLoader(
            data,
            batch_size=self.config.eval_batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=functools.partial(collate_items, keys=("pixel_values",)),
        )
        was_training = model.training
        model.eval()
        predictions = []
        try:
            with autocast(self.device, self.precision):
                for batch in tqdm(loader, desc=f"test {data.source}", disable=not self.progress, leave=False):
                    logits = model(batch["pixel_values"].to(self.device)).logits  # (b, n_classes)
                    if not bool(torch.isfinite(logits).all()):
                        raise FloatingPointError(
                            f"the model gave non-finite logits on {data.source}; its training diverged (lower lr "
                            "with an override such as lr=0.001, or run with precision fp32)."
                        )
                    predictions.append(logits.argmax(-1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(predictions)

    def _model_for(
        self, trained: RobustPromptModel | None, training: _Training, classnames: Sequence[str], dataset: str
    ) -> RobustPromptModel:
        """The trained model predicting over ``classnames`` (zero-shot CLIP with ``dataset``'s prompt)."""
        template = DATASETS[dataset].template
        if trained is None:
            return self._build(training, classnames, template)
        if training.learner == "zeroshot":
            trained.learner.config.templates = [template]
        trained.learner.set_classnames(_readable(classnames))
        return trained

    def evaluate(self, unit: _Unit, trained: RobustPromptModel | None) -> dict[str, Any]:
        test = self._test_set(unit.dataset)
        if self.protocol.name == "base2new":
            base, new = _class_halves(len(test.classnames))
            metrics = {}
            for name, classes in (("base", base), ("new", new)):
                part = _with_classes(test, classes)
                model = self._model_for(trained, unit.training, part.classnames, unit.dataset)
                metrics[name] = accuracy(self._predictions(model, part), part.labels)
            metrics["hm"] = harmonic_mean(metrics["base"], metrics["new"])
            n_base = sum(label in base for label in test.labels)
            return {"metrics": metrics, "n_test": {"base": n_base, "new": len(test) - n_base}}
        model = self._model_for(trained, unit.training, test.classnames, unit.dataset)
        predictions = self._predictions(model, test)
        if self.protocol.name == "spurious":
            groups = per_group_accuracy(predictions, test.labels, test.groups)
            avg, worst = accuracy(predictions, test.labels), worst_group_accuracy(groups)
            names = test.group_names or []
            per_group = {names[g] if g < len(names) else str(g): acc for g, acc in groups.items()}
            metrics = {"worst_group": worst, "avg": avg, "gap": accuracy_gap(avg, worst), "per_group": per_group}
            return {"metrics": metrics, "n_test": len(test)}
        return {"metrics": {"acc": accuracy(predictions, test.labels)}, "n_test": len(test)}


def dataset_status(config: ReproduceConfig) -> tuple[list[str], list[str], list[str]]:
    """(sources to train on, datasets to test, one line per missing dataset) under ``config.data_root``.
    Protocols with targets always train on their source; ``config.datasets`` then selects the tested sets.

    Example:
        >>> dataset_status(ReproduceConfig("spurious", "/nowhere"))[2][0]  # doctest: +ELLIPSIS
        'waterbirds (Waterbirds): no /nowhere/waterbird_complete95_forest2water2/metadata.csv or ...'
    """
    protocol = get_protocol(config.protocol)
    wanted = set(config.datasets) if config.datasets is not None else None
    reasons: dict[str, str | None] = {}

    def present(name: str) -> bool:
        if name not in reasons:
            reasons[name] = DATASETS[name].missing(config.data_root)
        return reasons[name] is None

    if protocol.targets:
        sources = [name for name in protocol.sources if present(name)]
        tested = [
            name
            for name in (*protocol.sources, *protocol.targets)
            if (wanted is None or name in wanted) and present(name)
        ]
    else:
        sources = [name for name in protocol.sources if (wanted is None or name in wanted) and present(name)]
        tested = sources
    return sources, tested, [reason for reason in reasons.values() if reason is not None]


def run_reproduce(
    config: ReproduceConfig,
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_unit: Callable[[str, dict[str, Any]], None] | None = None,
) -> ReproduceReport:
    """Run ``config.protocol`` for every present dataset, method and seed; write the results and the table.

    Args:
        config: the protocol, data, methods, seeds and recipes.
        backbone: the CLIP backbone (``load_backbone("hf:/path/to/clip-vit-base-patch16")``); moved to the device.
        out_dir: the output folder (see the module docstring); reruns resume there.
        overwrite: move results and trainings of other settings into ``out_dir/replaced-<UTC time>/`` instead of
            refusing them.
        progress: tqdm bars (units, training steps, test batches).
        on_unit: called with (``dataset/method/seed``, the written result) after each computed unit.

    Returns:
        A :class:`ReproduceReport`.

    Raises:
        FileNotFoundError: no dataset of the protocol is under ``config.data_root`` (every missing one is named).
        ReproduceConflictError: ``out_dir`` holds results or trainings of other settings and ``overwrite`` is
            False.
        ValueError: an unknown method, preset, override or device.

    Example:
        >>> backbone = load_backbone("hf:/models/clip-vit-base-patch16")  # doctest: +SKIP
        >>> config = ReproduceConfig("base2new", "/data", ["coop", "coop+refiner"], seeds=[1, 2, 3])  # doctest: +SKIP
        >>> print(run_reproduce(config, backbone, "runs/b2n").table_markdown)  # doctest: +SKIP
    """
    protocol = get_protocol(config.protocol)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output folder {str(out)!r} is a file; give a folder.")
    methods = []
    for method in config.methods:
        learner, addons = parse_method(method)
        methods.append((method, learner, addons))
    if not Path(config.data_root).is_dir():
        raise FileNotFoundError(f"the data root {config.data_root!r} is not a folder (see docs/datasets.md).")
    sources, tested, missing = dataset_status(config)
    if not sources or not tested:
        raise FileNotFoundError(
            f"{config.data_root!r} holds no dataset the {protocol.name} protocol can run; missing: "
            + "; ".join(missing)
        )
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    backbone.to(device)
    units = _plan(protocol, config, sources, tested, methods, backbone, precision, out)
    conflicts = _conflicts(units)
    moved_to = None
    if conflicts:
        if not overwrite:
            shown = "; ".join(f"{path.relative_to(out)} ({why})" for path, why in conflicts[:2])
            more = f" and {len(conflicts) - 2} more" if len(conflicts) > 2 else ""
            raise ReproduceConflictError(
                f"{out} holds results or trainings made with other settings: {shown}{more}. Pass overwrite=True to "
                f"move them into {out}/replaced-<UTC time>/ and run them again, or choose another output folder."
            )
        moved_to = _io.move_aside(out, [path for path, _ in conflicts])
        logger.info("moved %d results/trainings of other settings to %s", len(conflicts), moved_to)
    runner = _Runner(protocol, config, backbone, out, device, precision, progress)
    ran, reused = [], []
    by_training: dict[int, list[_Unit]] = {}
    for unit in units:
        by_training.setdefault(id(unit.training), []).append(unit)
    bar = tqdm(total=len(units), desc=f"reproduce {protocol.name}", disable=not progress)
    try:
        for group in by_training.values():
            todo = [u for u in group if not u.path.is_file()]
            reused += [u.key for u in group if u.path.is_file()]
            bar.update(len(group) - len(todo))
            if not todo:
                continue
            trained = runner.trained(group[0].training)
            for unit in todo:
                started = time.monotonic()
                evaluated = runner.evaluate(unit, trained)
                result = {
                    "protocol": protocol.name,
                    "dataset": unit.dataset,
                    "method": unit.training.method,
                    "seed": unit.training.seed,
                    "settings": unit.settings,
                    **evaluated,
                    "test_seconds": round(time.monotonic() - started, 3),
                    "device": str(device),
                    "prompt_robust_version": __version__,
                }
                _io.write_json(unit.path, result)
                ran.append(unit.key)
                bar.update(1)
                if on_unit is not None:
                    on_unit(unit.key, result)
    finally:
        bar.close()
    results = {}
    for unit in units:
        saved = _io.read_json(unit.path, "reproduce result")
        results[(unit.dataset, unit.training.method, unit.training.seed)] = saved["metrics"]
    markdown, table = build_table(
        protocol,
        results,
        methods=[m for m, _, _ in methods],
        seeds=list(config.seeds),
        datasets=tested,
        backbone=backbone,
        missing=missing,
        settings={"preset": config.preset, "shots": config.shots, "precision": precision, "device": str(device)},
    )
    paths = write_table(out / "tables", protocol.name, markdown, table)
    return ReproduceReport(
        protocol.name, missing, ran, reused, moved_to, markdown, table, paths, str(device), precision
    )
