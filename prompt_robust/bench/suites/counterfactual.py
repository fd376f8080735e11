"""Counterfactual quality on the embedded world (``prompt-robust bench --suite counterfactual-quality``):
validity (a held-out linear probe assigns ``z'`` to ``y'``) and median proximity ratio
(``||z' - z|| / ||z - nearest real y' feature||``), per seed and mean ± std."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ... import _io
from ...addons.counterfactual.config import CounterfactualConfig
from ...addons.counterfactual.metrics import counterfactual_quality, fit_linear_probe
from ...backbones.base import ClipBackbone
from ...data.fewshot import unused_indices
from ...learners.base import image_features_in_batches
from .base import SuiteRequest, register_suite

__all__ = ["counterfactual_quality_benchmark", "format_quality"]


def counterfactual_quality_benchmark(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    k: int = 16,
    config: CounterfactualConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per seed: the feature flow is fitted (as ``fit_addons`` does) on ``k`` photo shots of the 24 classes
    (the benchmark's DG split); the probe is fitted on the *other* images of the training pool, which the flow
    never saw; counterfactuals of held-out photos target each one's most confusable class under the probe. The
    minimal-change search is judged by the zero-shot classifier (the learner being tuned, in training), never by
    the held-out probe that measures validity.
    """
    from ... import build_learner, wrap
    from ...config import RobustConfig
    from ..tasks import WorldTasks

    config = config or CounterfactualConfig()
    out_dir = Path(out_dir)
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std)
    per_seed: dict[str, dict[str, float]] = {}
    for seed in tqdm(list(seeds), desc="counterfactual quality", disable=not progress):
        torch.manual_seed(seed)
        classes = list(tasks.dg_classes())
        learner = build_learner("zeroshot", backbone, classes)
        model = wrap(learner, RobustConfig(counterfactual=config))
        train, indices = tasks.dg_train(k, seed)
        model.fit_addons(train, phase="before_prompt", seed=seed, cache_dir=out_dir / "cache", progress=False)
        addon = model.addons["counterfactual"]
        pool = tasks.dg_train(tasks.pool_per_class, seed)[0]  # the whole pool, in pool order
        held = unused_indices(len(pool), indices)
        probe = fit_linear_probe(
            image_features_in_batches(learner, pool.pixel_values[held]), pool.labels[held], len(classes)
        )
        test = tasks.dg_source_test()
        z, y = image_features_in_batches(learner, test.pixel_values), test.labels
        train_z = image_features_in_batches(learner, train.pixel_values)
        text = learner.text_features()  # the zero-shot classifier judges flips in the minimal-change search
        counterfactuals, targets = addon.counterfactuals(z, y, scores=probe(z), text_features=text)
        quality = counterfactual_quality(
            z, counterfactuals, targets, probe=probe, reference_features=train_z, reference_labels=train.labels
        )
        per_seed[str(seed)] = {
            "validity": quality.validity,
            "proximity": quality.proximity,
            "factual_validity": quality.factual_validity,
            "mean_proximity_weight": float(addon.last_proximity.float().mean()),
            "background_kept": background_kept(learner, z, counterfactuals),
        }
    keys = list(next(iter(per_seed.values())))
    mean = {key: statistics.fmean(run[key] for run in per_seed.values()) for key in keys}
    std = {key: statistics.stdev([run[key] for run in per_seed.values()]) if len(per_seed) > 1 else 0.0 for key in keys}
    result = {"config": config.to_dict(), "k": k, "per_seed": per_seed, "mean": mean, "std": std}
    _io.write_json(out_dir / "quality.json", result)
    (out_dir / "quality.md").write_text(format_quality(result) + "\n")
    return result


def background_kept(learner: Any, factual: torch.Tensor, counterfactuals: torch.Tensor) -> float:
    """Share of counterfactuals that keep their factual's background (a non-causal factor), both read by the
    zero-shot attribute classifier over the world's backgrounds (no annotation needed).

    Args:
        learner: a learner with ``fixed_text_features`` (the classifier's prompts are encoded by it).
        factual: ``(n, d)`` unit-norm factual features.
        counterfactuals: ``(n, K, d)`` their counterfactuals.
    """
    from ...addons.counterfactual.config import CounterfactualConfig
    from ...attributes import attribute_text_features, classify_attributes
    from .. import world

    text = attribute_text_features(learner, list(world.BACKGROUNDS), CounterfactualConfig().attribute_templates)
    read = classify_attributes(factual, text)[0]  # (n,)
    n, k, d = counterfactuals.shape
    twins = classify_attributes(counterfactuals.reshape(n * k, d), text)[0].reshape(n, k)
    return float((twins == read.unsqueeze(1)).float().mean())


def format_quality(result: dict[str, Any]) -> str:
    """Markdown table of a counterfactual quality run."""
    header = "| seed | validity | median proximity ratio | factual z already assigned to y' | background kept |"
    lines = [header, "|---|---|---|---|---|"]
    for seed, run in result["per_seed"].items():
        kept = f"{100 * run['background_kept']:.1f}%" if "background_kept" in run else ""
        lines.append(
            f"| {seed} | {100 * run['validity']:.1f}% | {run['proximity']:.3f} | {100 * run['factual_validity']:.1f}% "
            f"| {kept} |"
        )
    m, s = result["mean"], result["std"]
    kept = f"{100 * m['background_kept']:.1f} ± {100 * s['background_kept']:.1f}%" if "background_kept" in m else ""
    lines.append(
        f"| mean ± std | {100 * m['validity']:.1f} ± {100 * s['validity']:.1f}% | {m['proximity']:.3f} ± "
        f"{s['proximity']:.3f} | {100 * m['factual_validity']:.1f} ± {100 * s['factual_validity']:.1f}% | {kept} |"
    )
    return "\n".join(lines)


@register_suite(
    "counterfactual-quality", outputs=("quality.json", "quality.md"), help="validity and proximity of counterfactuals"
)
def _quality_suite(request: SuiteRequest) -> str:
    started = time.time()
    result = counterfactual_quality_benchmark(
        request.load_backbone(),
        request.out,
        seeds=request.seeds,
        config=CounterfactualConfig(**request.addons.get("counterfactual", {})),
        progress=request.progress,
    )
    return f"{format_quality(result)}\n\n" + request.wrote(["quality.json", "quality.md"], started)
