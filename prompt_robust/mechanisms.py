"""Mechanism suites (``prompt-robust bench --suite mechanisms``): does an add-on work where its premise holds?

A broad benchmark can miss an add-on's effect for two reasons: the task gives the mechanism nothing to gain, or
the design fails. Each suite here first measures the **headroom** with an oracle, on a task built so that the
add-on's premise holds, then the learner and learner + add-on on the same data:

* refiner: the premise is that the best prompt depends on the image. Task: the domain-generalisation classes
  in all four styles, in training and test (``WorldTasks.styled_train`` / ``styled_test``). Oracle: the learner's
  prompt trained further on each style's training images, applied by the test image's true style. Recovery =
  (learner + refiner − learner) / (oracle − learner), on the test images; the target rule of the refiner is
  chosen on validation images (the pool's unused images), never on the test set.

Every run also reports diagnostics computed from what the add-on learned (the targets' label decodability, the
agreement of generated offsets with the learner's own predictions, how well the label-free groups match the true
ones).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _io
from .backbones.base import ClipBackbone
from .benchmark import BenchConfig, _accuracy, _outputs, _Runner
from .config import RefinerConfig, RobustConfig
from .data.tasks import TaskData
from .model import wrap

__all__ = ["REFINER_RULES", "format_mechanisms", "group_purity", "mechanisms_benchmark", "refiner_mechanism"]

#: the refiner target rules compared by the suite
REFINER_RULES: tuple[str, ...] = ("overfit", "group")


def group_purity(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of samples whose found group's most common true group is their own (1.0: every found group lies
    inside one true group; ``max share of a true group``: the found groups ignore the true ones).

    Example:
        >>> group_purity(torch.tensor([0, 0, 1, 1]), torch.tensor([2, 2, 3, 3]))
        1.0
        >>> group_purity(torch.tensor([0, 0, 0, 0]), torch.tensor([2, 2, 3, 3]))
        0.5
    """
    if found.shape != truth.shape:
        raise ValueError(
            f"found and truth must have the same shape; got {tuple(found.shape)} and {tuple(truth.shape)}."
        )
    hits = 0
    for g in found.unique():
        members = truth[found == g]
        hits += int(torch.bincount(members).max())
    return hits / len(found)


def _per_group(model, data: TaskData) -> dict[str, float]:
    predictions = _outputs(model, data)[0]
    out = {}
    for g, name in enumerate(data.group_names or []):
        members = data.groups == g
        out[name] = float((predictions[members] == data.labels[members]).float().mean())
    return out


def _validation(tasks, train_indices: Sequence[int], per_class_style: int, seed: int) -> TaskData:
    """Unused pool images (the validation set): up to ``per_class_style`` per class and style, seeded."""
    pool = tasks.styled_pool()
    unused = sorted(set(range(len(pool))) - set(train_indices))
    generator = torch.Generator().manual_seed(10_000 + seed)
    order = [unused[i] for i in torch.randperm(len(unused), generator=generator).tolist()]
    taken: dict[tuple[int, int], int] = {}
    chosen = []
    for index in order:
        key = (int(pool.labels[index]), int(pool.groups[index]))
        if taken.get(key, 0) < per_class_style:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(index)
    return pool.subset(sorted(chosen))


def refiner_mechanism(
    runner: _Runner,
    seed: int,
    *,
    learner: str = "coop",
    k: int = 4,
    refiner: dict[str, Any] | None = None,
    val_per_class: int = 4,
) -> dict[str, Any]:
    """One seed of the refiner's mechanism suite (see the module docstring).

    Args:
        runner: the benchmark runner (backbone, tasks, cache folder, learner schedules).
        seed: few-shot draw and initialisation.
        learner: the prompt learner.
        k: shots per class *and style*.
        refiner: RefinerConfig overrides shared by every rule (``targets`` is set per rule).
        val_per_class: validation images per class and style.

    Returns:
        ``{"learner", "oracle", "refiner:<rule>" (each ``{"val", "test", "groups": {style: acc}}``),
        "diagnostics": {rule: {...}}}``.
    """
    from .refiner.diagnostics import label_decodability, prediction_agreement

    tasks = runner.tasks
    train, indices = tasks.styled_train(k, seed)
    runner._save_split("styled", seed, indices)
    val = _validation(tasks, indices, val_per_class, seed)
    test = tasks.styled_test()
    classes = tasks.dg_classes()

    base = runner._model(learner, [], classes, seed)
    runner._train(base, train, seed)
    out: dict[str, Any] = {
        "learner": {"val": _accuracy(base, val), "test": _accuracy(base, test), "groups": _per_group(base, test)}
    }

    # oracle: the learned prompt trained further on each style's images, used on that style's images
    correct = {"val": 0, "test": 0}
    groups: dict[str, float] = {}
    for g, style in enumerate(test.group_names or []):
        oracle = copy.deepcopy(base)
        subset = train.subset((train.groups == g).nonzero().flatten().tolist())
        runner._train(oracle, subset, seed)
        for split, data in (("val", val), ("test", test)):
            members = (data.groups == g).nonzero().flatten().tolist()
            part = data.subset(members)
            correct[split] += round(_accuracy(oracle, part) * len(part))
            if split == "test":
                groups[style] = _accuracy(oracle, part)
    out["oracle"] = {"val": correct["val"] / len(val), "test": correct["test"] / len(test), "groups": groups}

    out["diagnostics"] = {}
    for rule in REFINER_RULES:
        config = RefinerConfig(**{**(refiner or {}), "targets": rule, "num_groups": len(test.group_names or [])})
        model = wrap(copy.deepcopy(base.learner), RobustConfig(refiner=config))
        cache = runner.out_dir / "cache"
        model.fit_addons(train, seed=seed, cache_dir=cache, progress=False)
        name = f"refiner:{rule}"
        out[name] = {"val": _accuracy(model, val), "test": _accuracy(model, test), "groups": _per_group(model, test)}
        addon = model.addons["refiner"]
        targets = addon.build_targets(train, cache_dir=cache, progress=False, seed=seed)  # cached: no recompute
        flat = torch.cat([targets.deltas[s].flatten(1) for s in addon.sites], dim=1)  # (N, D)
        with torch.no_grad():
            model.eval()
            cond = base.learner.image_features(test.pixel_values)
            generated = addon.sample_offsets(cond)
            generated = torch.cat([(addon.scale(s) * generated[s]).flatten(1) for s in addon.sites], dim=1)
        predictions = _outputs(base, test)[0]
        diagnostics = {
            "label_decodability": label_decodability(flat, train.labels),
            "prediction_agreement": prediction_agreement(flat, train.labels, generated, predictions),
            "chance": 1 / len(classes),
        }
        if targets.groups is not None:
            diagnostics["group_purity"] = group_purity(targets.groups, train.groups)
        out["diagnostics"][rule] = diagnostics
    return out


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def mechanisms_benchmark(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    bench: BenchConfig | None = None,
    learner: str = "coop",
    k: int = 4,
    refiner: dict[str, Any] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the mechanism suites over seeds and write ``mechanisms.json`` and ``mechanisms.md``.

    Every seed's result is saved as ``runs/mechanisms_refiner_seed<seed>.json`` and reused by a rerun with the same
    settings (a changed setting is refused: delete the file or pick another ``out_dir``).

    Returns:
        ``{"refiner": {"seeds": {seed: result}, "summary": {method: {"val", "test"}}, "recovery", "choice"}}``.
    """
    from tqdm.auto import tqdm

    started = time.time()
    out_dir = Path(out_dir)
    config = bench or BenchConfig()
    runner = _Runner(backbone, config, out_dir)
    settings = {"learner": learner, "k": k, "refiner": refiner or {}, "bench": config.to_dict()}
    per_seed = {}
    for seed in tqdm(list(seeds), desc="refiner mechanism", disable=not progress):
        path = out_dir / "runs" / f"mechanisms_refiner_seed{seed}.json"
        if path.is_file():
            saved = _io.read_json(path)
            if saved.get("settings") != settings:
                raise ValueError(
                    f"{path} was run with other settings ({saved.get('settings')}); delete it or choose another "
                    "--out to rerun."
                )
            per_seed[seed] = saved["result"]
            continue
        result = refiner_mechanism(runner, seed, learner=learner, k=k, refiner=refiner)
        _io.write_json(path, {"settings": settings, "result": result})
        per_seed[seed] = result
    methods = ["learner", "oracle", *(f"refiner:{r}" for r in REFINER_RULES)]
    summary = {
        m: {split: _mean_std([per_seed[s][m][split] for s in seeds]) for split in ("val", "test")} for m in methods
    }
    # the rule is chosen on validation images; recovery is then read on the test images
    choice = max(REFINER_RULES, key=lambda r: summary[f"refiner:{r}"]["val"]["mean"])
    recovery = {}
    for rule in REFINER_RULES:
        gains = [per_seed[s][f"refiner:{rule}"]["test"] - per_seed[s]["learner"]["test"] for s in seeds]
        headroom = [per_seed[s]["oracle"]["test"] - per_seed[s]["learner"]["test"] for s in seeds]
        recovery[rule] = statistics.fmean(gains) / statistics.fmean(headroom) if statistics.fmean(headroom) else 0.0
    diagnostics = {
        rule: {
            key: _mean_std([per_seed[s]["diagnostics"][rule][key] for s in seeds])
            for key in per_seed[seeds[0]]["diagnostics"][rule]
        }
        for rule in REFINER_RULES
    }
    result = {
        "refiner": {
            "learner": learner,
            "k": k,
            "summary": summary,
            "recovery": recovery,
            "choice": choice,
            "diagnostics": diagnostics,
            "seeds": {str(s): per_seed[s] for s in seeds},
        },
        "command": command,
        "wall_seconds": round(time.time() - started),
        "backbone": backbone.name,
    }
    _io.write_json(out_dir / "mechanisms.json", result)
    (out_dir / "mechanisms.md").write_text(format_mechanisms(result) + "\n")
    return result


def format_mechanisms(result: dict[str, Any]) -> str:
    """Markdown tables of the mechanism suites: oracle / learner / learner + add-on (mean ± std over seeds), the
    recovered share of the oracle's gain, and the diagnostics."""
    lines = []
    if result.get("command"):
        lines += [f"Command: `{result['command']}`  ", f"Backbone: `{result.get('backbone', '')}`  "]
        lines += [f"Wall time: {result.get('wall_seconds', 0)} s", ""]
    ref = result["refiner"]
    lines += [
        f"### Refiner: mixed styles ({ref['learner']}, {ref['k']} shots per class and style)",
        "",
        "| method | validation | test | recovered share of the oracle's test gain |",
        "|---|---|---|---|",
    ]
    for method, row in ref["summary"].items():
        rule = method.partition(":")[2]
        share = f"{100 * ref['recovery'][rule]:.0f}%" if rule else ""
        cells = [f"{100 * row[s]['mean']:.1f} ± {100 * row[s]['std']:.1f}" for s in ("val", "test")]
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {share} |")
    lines += [
        "",
        f"Rule chosen on validation: `{ref['choice']}`.",
        "",
        "| diagnostic | " + " | ".join(ref["diagnostics"]) + " |",
    ]
    lines.append("|---" * (len(ref["diagnostics"]) + 1) + "|")
    keys = sorted({k for d in ref["diagnostics"].values() for k in d})
    for key in keys:
        cells = []
        for rule in ref["diagnostics"]:
            value = ref["diagnostics"][rule].get(key)
            cells.append("" if value is None else f"{value['mean']:.3f} ± {value['std']:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
