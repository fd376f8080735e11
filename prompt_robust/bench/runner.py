"""The benchmark protocol on the embedded world: every method x task x seed, aggregated as mean ± std.

A *method* is a learner name with optional add-ons joined by ``+`` (``coop``, ``maple+debias``). For each seed
and method the runner trains three prompt sets (base classes; all 24 classes in the photo style; the spurious
task) with :func:`prompt_robust.training.fit` and evaluates:

* ``base_to_new``: ``base``, ``new``, ``hm`` (harmonic mean);
* ``domain_generalization``: one key per unseen style and ``avg`` (prompts from the all-class photo training);
* ``cross_dataset``: ``acc`` on the 12 disjoint classes (same prompts);
* ``spurious``: ``avg``, ``worst_group``, ``gap``;
* ``retrieval``: ``i2t_r1/5/10`` and ``t2i_r1/5/10``. Image features are the learner's (visual prompts
  included); captions are encoded by the backbone as they are, since a class-name prompt does not define how
  to encode a free caption. Text-only learners therefore retrieve exactly like zero-shot CLIP.

The few-shot indices of every seed are written to ``splits/`` so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import _io
from ..backbones.base import ClipBackbone
from ..config import ConfigMixin, RobustConfig, _check, help_field, unknown_name_error
from ..data.fewshot import save_split
from ..eval.metrics import accuracy, accuracy_gap, harmonic_mean, per_group_accuracy, worst_group_accuracy
from ..learners import build_learner
from ..methods import addon_config, parse_method
from ..model import RobustPromptModel, wrap
from ..training import FitConfig, fit
from . import world
from .tasks import (
    SPURIOUS_BACKGROUNDS,
    TARGET_STYLES,
    TASKS_VERSION,
    TaskData,
    WorldTasks,
)

__all__ = ["TASKS", "BenchConfig", "parse_method", "run_benchmark", "summarize"]

TASKS: tuple[str, ...] = ("base_to_new", "domain_generalization", "spurious", "retrieval", "cross_dataset")

#: learner settings used by the benchmark (one setting for every task and seed; not tuned per task)
LEARNER_SETTINGS: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "coop": {"ctx_init": "a photo of a"},
    "cocoop": {"ctx_init": "a photo of a"},
    "vpt": {"n_tokens": 4, "deep": True},
    # ctx_layout "all": the 4 learned tokens the embedded world was calibrated and benchmarked with
    "maple": {"ctx_init": "a photo of a", "depth": 3, "ctx_layout": "all"},
}

#: each learner's training schedule, from its paper's few-shot configuration (SGD with momentum 0.9, one epoch of
#: constant warm-up at 1e-5, cosine decay; epochs over the k-shot set): CoOp's base-to-new config
#: (``vit_b16_ctxv1``: lr 0.002, batch 32, 200 epochs), CoCoOp's (``vit_b16_c4_ep10_batch1_ctxv1``: lr 0.002,
#: batch 1, 10 epochs), MaPLe's (lr 0.0035, batch 4, 5 epochs), used for VPT too as MaPLe's repository does.
#: BenchConfig's ``steps``, ``lr``, ``optimizer`` and ``batch_size`` override them for every learner.
LEARNER_TRAINING: dict[str, dict[str, Any]] = {
    "coop": {"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 200},
    "cocoop": {"optimizer": "sgd", "lr": 0.002, "batch_size": 1, "epochs": 10},
    "vpt": {"optimizer": "sgd", "lr": 0.0035, "batch_size": 4, "epochs": 5},
    "maple": {"optimizer": "sgd", "lr": 0.0035, "batch_size": 4, "epochs": 5},
}
_DEFAULT_TRAINING: dict[str, Any] = {"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 200}


def _addon_configs() -> dict[str, type]:
    """The registered add-ons the benchmark can run: those with a settings field in :class:`BenchConfig`."""
    settings = {f.name for f in dataclasses.fields(BenchConfig)}
    return {name: cls for name, cls in RobustConfig.addon_configs().items() if name in settings}


@dataclass
class BenchConfig(ConfigMixin):
    """What a benchmark run covers and how prompts are trained."""

    methods: list[str] = help_field(["zeroshot", "coop"], "Methods: a learner name, optionally +add-ons.")
    seeds: list[int] = help_field([1], "Seeds (few-shot draws and initialisations); results are mean ± std.")
    world_version: int = help_field(2, "World the tasks are drawn from (2: five datasets; 1: the first world).")
    datasets: list[str] | None = help_field(
        None, "World 2: the datasets base-to-new runs on and averages over (None: all of them)."
    )
    k: int = help_field(16, "Shots per class for base-to-new and domain generalisation.")
    steps: int | None = help_field(
        None, "Optimizer steps per training, for every learner (None: each learner's paper schedule in epochs)."
    )
    batch_size: int | None = help_field(None, "Training batch size for every learner (None: the learner's own).")
    lr: float | None = help_field(None, "Peak learning rate for every learner (None: the learner's own).")
    optimizer: str | None = help_field(None, "adamw or sgd for every learner (None: the learner's own, SGD).")
    spurious_per_class: int = help_field(64, "Training images per class of the spurious task.")
    pool_per_class: int = help_field(32, "Rendered training pool per class (k shots are drawn from it).")
    test_per_class: int = help_field(50, "Evaluation images per class (per style, per group).")
    retrieval_size: int = help_field(1000, "Captioned images of the retrieval task.")
    tasks: list[str] = help_field(list(TASKS), "Tasks to run.")
    refiner: dict[str, Any] = help_field({}, "RefinerConfig fields of the +refiner methods (others: defaults).")
    counterfactual: dict[str, Any] = help_field({}, "CounterfactualConfig fields of the +counterfactual methods.")
    invariance: dict[str, Any] = help_field({}, "InvarianceConfig fields of the +invariance methods.")
    debias: dict[str, Any] = help_field(
        {}, "DebiasConfig fields of the +debias methods (attribute_values default to each task's backgrounds)."
    )

    def __post_init__(self) -> None:
        _check(len(self.methods) > 0, "methods must name at least one method.")
        for method in self.methods:
            parse_method(method)
        _check(len(self.seeds) > 0, "seeds must list at least one seed.")
        for task in self.tasks:
            if task not in TASKS:
                raise unknown_name_error("task", task, TASKS)
        _check(self.k >= 1 and self.k <= self.pool_per_class, f"k must be in 1..pool_per_class; got {self.k!r}.")
        for name in _addon_configs():  # unknown fields or bad values fail here
            _addon_configs()[name](**self.addon_settings(name))
        for name in ("spurious_per_class", "test_per_class", "retrieval_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)!r}.")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or None; got {value!r}.")
        _check(self.lr is None or self.lr > 0, f"lr must be > 0 or None; got {self.lr!r}.")
        _check(self.world_version in (1, 2), f"world_version must be 1 or 2; got {self.world_version!r}.")
        if self.datasets is not None:
            from .world_v2 import DATASETS

            _check(len(self.datasets) > 0, "datasets must name at least one dataset (or be None: all).")
            _check(self.world_version == 2, "datasets selects world 2's datasets; world 1 has one dataset.")
            for name in self.datasets:
                if name not in DATASETS:
                    raise unknown_name_error("dataset", name, list(DATASETS))

    def training(self, learner: str) -> dict[str, Any]:
        """The schedule a learner trains with: its paper's (:data:`LEARNER_TRAINING`) with this config's
        ``steps`` / ``lr`` / ``optimizer`` / ``batch_size`` overriding where set."""
        schedule = dict(LEARNER_TRAINING.get(learner, _DEFAULT_TRAINING))
        for name in ("steps", "lr", "optimizer", "batch_size"):
            if getattr(self, name) is not None:
                schedule[name] = getattr(self, name)
        return schedule

    def addon_settings(self, name: str, attribute_values: Sequence[str] = world.BACKGROUNDS) -> dict[str, Any]:
        """The settings of add-on ``name``; the debias add-on, and the counterfactual add-on unless its twins are
        ``"class"`` twins, name the nuisance attribute with ``attribute_values`` (the task's backgrounds; empty:
        the task has none, and the counterfactual add-on uses class twins, the debias add-on the world's
        backgrounds) unless their settings do."""
        settings = dict(getattr(self, name))
        if name == "debias":  # its pseudo-labels need words even where the label is the background (scenes)
            settings = {"attribute_values": list(attribute_values or world.BACKGROUNDS), **settings}
        elif name == "counterfactual" and settings.get("twin", "auto") != "class" and attribute_values:
            settings = {"attribute_values": list(attribute_values), **settings}
        return settings


@torch.no_grad()
def _outputs(model: RobustPromptModel, data: TaskData, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and prompted image features of a whole set."""
    was_training = model.training
    model.eval()
    predictions, features = [], []
    for start in range(0, len(data), batch_size):
        out = model(data.pixel_values[start : start + batch_size])
        predictions.append(out.logits.argmax(-1))
        features.append(out.learner_output.image_features)
    model.train(was_training)
    return torch.cat(predictions), torch.cat(features)


def _accuracy(model: RobustPromptModel, data: TaskData) -> float:
    return accuracy(_outputs(model, data)[0], data.labels)


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k of a square similarity matrix whose diagonal holds the matching pairs."""
    ranks = (similarity > similarity.diagonal().unsqueeze(1)).sum(1)  # (n,) items ranked above the match
    return {k: float((ranks < k).float().mean()) for k in ks}


def check_world(backbone: ClipBackbone, world_version: int) -> None:
    """Refuse to benchmark a mini-CLIP on a world other than the one it was pretrained on (its numbers would mean
    nothing); backbones without a pretraining record (real CLIPs) run on any world."""
    from .pretrain import pretrained_world

    trained_on = pretrained_world(backbone)
    if trained_on is not None and trained_on != world_version:
        raise ValueError(
            f"the backbone {backbone.name!r} was pretrained on world {trained_on}, but the benchmark runs on world "
            f"{world_version}: its numbers would mean nothing. Pass --world-version {trained_on} "
            f"(world_version={trained_on}), or a backbone pretrained on world {world_version} (the shipped ones: "
            "'embedded' is world 2, 'embedded-v1' world 1)."
        )


def world_tasks(backbone: ClipBackbone, config: BenchConfig) -> WorldTasks:
    """The tasks of ``config``'s world, rendered for ``backbone`` (its image size and normalisation)."""
    return WorldTasks(
        backbone.image_size,
        backbone.image_mean,
        backbone.image_std,
        pool_per_class=config.pool_per_class,
        test_per_class=config.test_per_class,
        retrieval_size=config.retrieval_size,
        version=config.world_version,
    )


class _Runner:
    def __init__(self, backbone: ClipBackbone, config: BenchConfig, out_dir: Path) -> None:
        check_world(backbone, config.world_version)
        self.backbone = backbone
        self.config = config
        self.out_dir = out_dir
        self.tasks = world_tasks(backbone, config)

    def _model(
        self,
        learner_name: str,
        addons: list[str],
        classnames: Sequence[str],
        seed: int,
        attribute_values: Sequence[str] = world.BACKGROUNDS,
        template: str = "a photo of a {}.",
    ) -> RobustPromptModel:
        """The wrapped learner; ``attribute_values``: the words the debias add-on names the task's spurious
        attribute with (the backgrounds: all of the world's, or the spurious task's two); ``template``: the
        dataset's hand-crafted prompt, which zero-shot CLIP uses (as CoOp's zero-shot baseline does)."""
        torch.manual_seed(seed)
        settings = dict(LEARNER_SETTINGS[learner_name])
        if learner_name == "zeroshot":
            settings["templates"] = [template]
        learner = build_learner(learner_name, self.backbone, list(classnames), **settings)
        configs = {}
        for addon in addons:
            name, _, mode = addon.partition(":")
            configs[name] = addon_config(name, mode, self.config.addon_settings(name, attribute_values))
        return wrap(learner, RobustConfig(**configs))

    def _fit_config(self, learner: str, n: int, seed: int) -> FitConfig:
        """The learner's schedule on ``n`` training images: epochs become steps, and the first epoch (at most a
        tenth of the steps) is a constant warm-up at 1e-5 (CoOp's), linear when the config sets AdamW."""
        schedule = self.config.training(learner)
        per_epoch = math.ceil(n / schedule["batch_size"])
        steps = schedule.get("steps") or schedule["epochs"] * per_epoch
        warmup = min(per_epoch, steps // 10)
        return FitConfig(
            steps=steps,
            batch_size=schedule["batch_size"],
            lr=schedule["lr"],
            optimizer=schedule["optimizer"],
            warmup_steps=warmup,
            warmup="constant" if schedule["optimizer"] == "sgd" else "linear",
            seed=seed,
            progress=False,
        )

    def _train(self, model: RobustPromptModel, data: TaskData, seed: int) -> None:
        cache = self.out_dir / "cache"
        model.fit_addons(data, phase="before_prompt", seed=seed, cache_dir=cache, progress=False)  # e.g. ICM's fit
        if not any(p.requires_grad for p in model.parameters()):
            return  # zero-shot CLIP: no prompt to train
        fit(model, data, self._fit_config(model.learner.learner_type, len(data), seed))
        # add-ons with their own training on the tuned prompt (the refiner's generator)
        model.fit_addons(data, phase="after_prompt", seed=seed, cache_dir=cache, progress=False)

    def _save_split(self, name: str, seed: int, indices: list[int]) -> None:
        path = self.out_dir / "splits" / f"{name}_k{self.config.k}_seed{seed}.json"
        save_split(path, indices, meta={"task": name, "k": self.config.k, "seed": seed}, overwrite=True)

    def base_to_new_model(self, learner_name: str, addons: list[str], dataset: str, seed: int) -> RobustPromptModel:
        """The model trained on ``dataset``'s base-class shots of ``seed`` (split saved under ``splits/``)."""
        train, indices = self.tasks.base_to_new_train(self.config.k, seed, dataset)
        self._save_split("base_to_new" if self.config.world_version == 1 else f"base_to_new_{dataset}", seed, indices)
        template = self.tasks.template(dataset)
        model = self._model(
            learner_name, addons, self.tasks.base_classes(dataset), seed, self.tasks.nuisance_values(dataset), template
        )
        self._train(model, train, seed)
        return model

    def run(self, method: str, seed: int) -> dict[str, dict[str, float]]:
        learner_name, addons = parse_method(method)
        tasks, results = self.config.tasks, {}
        if "base_to_new" in tasks:
            per_dataset = {}
            for dataset in self.config.datasets or self.tasks.datasets():
                model = self.base_to_new_model(learner_name, addons, dataset, seed)
                base_test, new_test = self.tasks.base_to_new_test(dataset)
                base = _accuracy(model, base_test)
                model.learner.set_classnames(self.tasks.new_classes(dataset))
                new = _accuracy(model, new_test)
                per_dataset[dataset] = {"base": base, "new": new, "hm": harmonic_mean(base, new)}
            # averages over the datasets, the HM of the average base and new accuracies (as CoCoOp reports)
            base = statistics.fmean(r["base"] for r in per_dataset.values())
            new = statistics.fmean(r["new"] for r in per_dataset.values())
            results["base_to_new"] = {"base": base, "new": new, "hm": harmonic_mean(base, new)}
            if len(per_dataset) > 1:
                results["base_to_new_datasets"] = {
                    f"{dataset}/{metric}": value
                    for dataset, row in per_dataset.items()
                    for metric, value in row.items()
                }
        if any(t in tasks for t in ("domain_generalization", "cross_dataset", "retrieval")):
            train, indices = self.tasks.dg_train(self.config.k, seed)
            self._save_split("domain_generalization", seed, indices)
            model = self._model(learner_name, addons, self.tasks.dg_classes(), seed)
            self._train(model, train, seed)
            if "domain_generalization" in tasks:
                per_style = {style: _accuracy(model, data) for style, data in self.tasks.dg_test().items()}
                per_style["source_photo"] = _accuracy(model, self.tasks.dg_source_test())
                per_style["avg"] = sum(per_style[s] for s in TARGET_STYLES) / len(TARGET_STYLES)
                results["domain_generalization"] = per_style
            if "retrieval" in tasks:
                results["retrieval"] = self._retrieval(model)
            if "cross_dataset" in tasks:
                accs = {}
                for dataset in self.tasks.cross_datasets():
                    test = self.tasks.cross_dataset_test(dataset)
                    model.learner.set_classnames(test.classnames)
                    if learner_name == "zeroshot":  # zero-shot CLIP prompts each dataset its own way
                        model.learner.config.templates = [self.tasks.template(dataset)]
                    accs[dataset] = _accuracy(model, test)
                results["cross_dataset"] = {"acc": statistics.fmean(accs.values())}
                if len(accs) > 1:
                    results["cross_dataset"].update(accs)
        if "spurious" in tasks:
            train = self.tasks.spurious_train(self.config.spurious_per_class, seed)
            model = self._model(learner_name, addons, train.classnames, seed, SPURIOUS_BACKGROUNDS)
            self._train(model, train, seed)
            test = self.tasks.spurious_test()
            predictions = _outputs(model, test)[0]
            groups = per_group_accuracy(predictions, test.labels, test.groups)
            avg, worst = accuracy(predictions, test.labels), worst_group_accuracy(groups)
            results["spurious"] = {"avg": avg, "worst_group": worst, "gap": accuracy_gap(avg, worst)}
            results["spurious_groups"] = {test.group_names[int(g)]: acc for g, acc in sorted(groups.items())}
        return results

    def _retrieval(self, model: RobustPromptModel) -> dict[str, float]:
        data = self.tasks.retrieval_test()
        _, image = _outputs(model, data)
        with torch.no_grad():
            ids = self.backbone.tokenize(data.captions, truncate=True)  # free captions: cut as CLIP does
            text = F.normalize(self.backbone.encode_text(ids), dim=-1)
        similarity = image @ text.t()  # (n_images, n_captions)
        i2t, t2i = recall_at_k(similarity), recall_at_k(similarity.t())
        return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def _run_settings(config: dict[str, Any], method: str) -> dict[str, Any]:
    """What one run's results depend on: the config without the method and seed lists it was part of, and without
    the settings of add-ons the method does not use (or that are left at their defaults)."""
    used = {addon.partition(":")[0] for addon in parse_method(method)[1]}
    return {
        key: value
        for key, value in config.items()
        if key not in ("methods", "seeds") and not (key in _addon_configs() and (key not in used or not value))
    }


def _addon_settings(config: BenchConfig, method: str) -> dict[str, Any]:
    """The full configs (defaults filled in) of the add-ons ``method`` uses, so a run saved before a default
    changed is not reused."""
    resolved = {}
    for addon in parse_method(method)[1]:
        name, _, mode = addon.partition(":")
        resolved[addon] = addon_config(name, mode, config.addon_settings(name)).to_dict()
    return resolved


def run_benchmark(
    backbone: ClipBackbone,
    config: BenchConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_result: Callable[[str, int, dict], None] | None = None,
) -> dict[str, dict[int, dict]]:
    """Run every method and seed of ``config``; returns ``{method: {seed: {task: {metric: value}}}}``.

    Per-(method, seed) results are saved to ``out_dir/runs/`` as they finish, and a rerun skips those already
    saved with the same settings (the config minus ``methods``/``seeds``, and the add-ons' full configs with their
    defaults), task version and backbone, so an
    interrupted benchmark resumes and runs done for another method list are reused.

    Args:
        backbone: the CLIP backbone (the embedded mini-CLIP by default in the CLI).
        config: methods, seeds, tasks and training settings.
        out_dir: output directory.
        progress: show a progress bar over (method, seed) runs.
        on_result: called with (method, seed, results) after each run.
    """
    out_dir = Path(out_dir)
    runner = _Runner(backbone, config, out_dir)
    raw: dict[str, dict[int, dict]] = {}
    jobs = [(method, seed) for method in config.methods for seed in config.seeds]
    for method, seed in tqdm(jobs, desc="benchmark", disable=not progress):
        path = out_dir / "runs" / f"{method}_seed{seed}.json"
        settings = {
            "config": _run_settings(config.to_dict(), method),
            "tasks_version": TASKS_VERSION,
            "backbone": backbone.fingerprint(),
        }
        if parse_method(method)[1]:
            settings["addon_configs"] = _addon_settings(config, method)
        saved = _io.read_json(path) if path.is_file() else None
        if saved is not None:
            saved = {**saved, "config": _run_settings(saved.get("config", {}), method)}
        if saved is not None and all(saved.get(key) == value for key, value in settings.items()):
            results = saved["results"]
        else:
            results = runner.run(method, seed)
            _io.write_json(path, {**settings, "method": method, "seed": seed, "results": results})
        raw.setdefault(method, {})[seed] = results
        if on_result is not None:
            on_result(method, seed, results)
    return raw


def summarize(raw: dict[str, dict[int, dict]]) -> tuple[dict, dict]:
    """Mean and std over seeds: ``({task: {method: {metric: mean}}}, same with std)`` (std 0 for one seed)."""
    means: dict[str, dict[str, dict[str, float]]] = {}
    stds: dict[str, dict[str, dict[str, float]]] = {}
    for method, per_seed in raw.items():
        runs = list(per_seed.values())
        for task in runs[0]:
            for metric in runs[0][task]:
                values = [run[task][metric] for run in runs]
                mean = sum(values) / len(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                means.setdefault(task, {}).setdefault(method, {})[metric] = mean
                stds.setdefault(task, {}).setdefault(method, {})[metric] = 0.0 if math.isnan(std) else std
    return means, stds
