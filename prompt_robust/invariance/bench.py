"""The ICM benchmark on the embedded domain-generalisation task: zero-shot vs ICM zero-shot vs linear probe vs
ICM linear probe, on photo training shots and the unseen styles (``prompt-robust bench --suite icm``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import _io
from ..backbones.base import ClipBackbone
from ..config import InvarianceConfig
from ..learners.base import image_features_in_batches
from .features import interventional_features
from .icm import ICMProjection
from .predict import compare_predictors
from .selection import choose_lam_dim

__all__ = ["format_icm", "icm_dg_benchmark"]

METHODS = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe")


def icm_dg_benchmark(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    k: int = 16,
    config: InvarianceConfig | None = None,
    test_per_class: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Per seed: ``k`` photo shots of the 24 classes (the benchmark's DG split), interventional pairs, λ and k
    chosen on held-out training images only (``InvarianceConfig`` rule), then the four predictors on each unseen
    style. Returns and writes ``icm.json`` / ``icm.md`` (mean ± std over seeds).
    """
    from .. import build_learner
    from ..data import world
    from ..data.fewshot import save_split
    from ..data.tasks import TARGET_STYLES, WorldTasks

    config = config or InvarianceConfig()
    out_dir = Path(out_dir)
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=test_per_class)
    learner = build_learner("zeroshot", backbone, list(world.CLASSES))
    text = learner.fixed_text_features([f"a photo of a {c}." for c in world.CLASSES])  # (24, d)
    tests = {
        style: (image_features_in_batches(learner, data.pixel_values), data.labels)
        for style, data in tasks.dg_test().items()
    }
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in tqdm(list(seeds), desc="icm", disable=not progress):
        train, indices = tasks.dg_train(k, seed)
        meta = {"task": "domain_generalization", "k": k, "seed": seed}
        save_split(
            out_dir / "splits" / f"domain_generalization_k{k}_seed{seed}.json", indices, meta=meta, overwrite=True
        )
        feats = interventional_features(
            learner,
            train,
            config.interventions,
            mean=backbone.image_mean,
            std=backbone.image_std,
            pairs_per_image=config.pairs_per_image,
            seed=seed,
            batch_size=config.feature_batch_size,
            cache_dir=out_dir / "cache",
            progress=False,
        )
        selection = choose_lam_dim(
            feats,
            lam=config.lam,
            dim=config.dim,
            lam_grid=config.lam_grid,
            dim_fractions=config.dim_fractions,
            val_fraction=config.val_fraction,
            predictor=config.selection,
            text_features=text,
            probe_reg=config.probe_reg,
            seed=seed,
        )
        icm = ICMProjection.fit(feats.clean, feats.deltas(), lam=selection.lam, dim=selection.dim)
        scores = compare_predictors(feats.clean, feats.labels, icm, text, tests, probe_reg=config.probe_reg)
        for values in scores.values():
            values["avg"] = sum(values[s] for s in TARGET_STYLES) / len(TARGET_STYLES)
        per_seed[seed] = {"scores": scores, "lam": float(selection.lam), "dim": int(icm.dim)}
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    for method in METHODS:
        for key in [*TARGET_STYLES, "avg"]:
            values = [run["scores"][method][key] for run in per_seed.values()]
            means.setdefault(method, {})[key] = statistics.fmean(values)
            stds.setdefault(method, {})[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    result = {
        "config": config.to_dict(),
        "k": k,
        "seeds": list(seeds),
        "backbone": backbone.fingerprint(),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "mean": means,
        "std": stds,
    }
    _io.write_json(out_dir / "icm.json", result)
    (out_dir / "icm.md").write_text(format_icm(result) + "\n")
    return result


def format_icm(result: dict[str, Any]) -> str:
    """Markdown table: the four predictors x unseen styles (accuracy %, mean ± std over seeds)."""
    keys = list(next(iter(result["mean"].values())))
    lines = ["| predictor | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, values in result["mean"].items():
        cells = [f"{100 * values[k]:.1f} ± {100 * result['std'][method][k]:.1f}" for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    chosen = ", ".join(f"seed {s}: λ {r['lam']:g}, k {r['dim']}" for s, r in result["per_seed"].items())
    return "\n".join(lines) + f"\n\nChosen on held-out training images: {chosen}."
