"""The ICM benchmark on the embedded domain-generalisation task: zero-shot vs ICM zero-shot vs linear probe vs
ICM linear probe, on photo training shots and the unseen styles (``prompt-robust bench --suite icm``)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ... import _io
from ...addons.invariance.config import InvarianceConfig
from ...addons.invariance.features import interventional_features
from ...addons.invariance.icm import dims_from_fractions
from ...addons.invariance.interventions import text_deltas, text_pairs
from ...addons.invariance.predict import compare_predictors
from ...addons.invariance.selection import fit_from_config
from ...backbones.base import ClipBackbone
from ...learners.base import image_features_in_batches
from .base import SuiteRequest, register_suite

__all__ = ["format_icm", "format_icm_grid", "icm_dg_benchmark", "icm_grid_diagnostic"]

METHODS = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe")


class _DGSetup:
    """What every seed of the ICM suites shares: the zero-shot learner, its class text features, the unseen-style
    test features; and per seed the training shots' interventional features (cached, split saved)."""

    def __init__(self, backbone: ClipBackbone, config: InvarianceConfig, out_dir: Path, k: int, test_per_class: int):
        from ... import build_learner
        from ..tasks import WorldTasks

        self.backbone, self.config, self.out_dir, self.k = backbone, config, out_dir, k
        self.tasks = WorldTasks(
            backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=test_per_class
        )
        classes = list(self.tasks.dg_classes())
        self.learner = build_learner("zeroshot", backbone, classes)
        self.text = self.learner.fixed_text_features([f"a photo of a {c}." for c in classes])  # (n_cls, d)
        self.tests = {
            style: (image_features_in_batches(self.learner, data.pixel_values), data.labels)
            for style, data in self.tasks.dg_test().items()
        }
        # text pairs (config.text_interventions), combined with the image pairs by fit_from_config as in the add-on
        self.text_deltas = None
        if config.text_interventions and config.text_weight > 0:

            def encode(texts: list[str]) -> torch.Tensor:
                return backbone.encode_text(backbone.tokenize(texts))

            pairs = text_pairs(classes, config.text_base_template, config.text_templates)
            self.text_deltas = text_deltas(encode, pairs)

    def fit(self, feats, seed: int, **fixed: Any):
        """The projection and selection of the configured rule (``fixed``: ``lam``/``dim`` overriding the config),
        with the class text features and the text pairs."""
        config = dataclasses.replace(self.config, **fixed)
        return fit_from_config(feats, config, text_features=self.text, text_deltas=self.text_deltas, seed=seed)

    def features(self, seed: int):
        from ...data.fewshot import save_split

        train, indices = self.tasks.dg_train(self.k, seed)
        meta = {"task": "domain_generalization", "k": self.k, "seed": seed}
        split = self.out_dir / "splits" / f"domain_generalization_k{self.k}_seed{seed}.json"
        save_split(split, indices, meta=meta, overwrite=True)
        config = self.config
        return interventional_features(
            self.learner,
            train,
            config.interventions,
            mean=self.backbone.image_mean,
            std=self.backbone.image_std,
            pairs_per_image=config.pairs_per_image,
            seed=seed,
            batch_size=config.feature_batch_size,
            cache_dir=self.out_dir / "cache",
            progress=False,
            params=config.intervention_params,
        )


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
    from ..tasks import TARGET_STYLES

    config = config or InvarianceConfig()
    out_dir = Path(out_dir)
    setup = _DGSetup(backbone, config, out_dir, k, test_per_class)
    text, tests = setup.text, setup.tests
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in tqdm(list(seeds), desc="icm", disable=not progress):
        feats = setup.features(seed)
        icm, _ = setup.fit(feats, seed)
        scores = compare_predictors(feats.clean, feats.labels, icm, text, tests, probe_reg=config.probe_reg)
        for values in scores.values():
            values["avg"] = sum(values[s] for s in TARGET_STYLES) / len(TARGET_STYLES)
        per_seed[seed] = {"scores": scores, "lam": float(icm.lam_relative), "dim": int(icm.dim)}
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


def icm_grid_diagnostic(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    k: int = 16,
    config: InvarianceConfig | None = None,
    test_per_class: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """A diagnostic, **not a method**: every ``(λ, k)`` of the selection rule's grid (``lam_grid`` x
    ``dim_fractions``) scored directly on the unseen styles. It answers whether any projection the rule could
    pick would raise the unseen-style average, i.e. whether a failure lies in the rule or in the interventions.
    Writes ``icm_grid.json`` / ``icm_grid.md``.
    """
    from ..tasks import TARGET_STYLES

    config = config or InvarianceConfig()
    out_dir = Path(out_dir)
    setup = _DGSetup(backbone, config, out_dir, k, test_per_class)
    per_seed: dict[str, Any] = {}
    for seed in tqdm(list(seeds), desc="icm grid", disable=not progress):
        feats = setup.features(seed)
        grid = []
        for lam in config.lam_grid:
            for dim in dims_from_fractions(feats.dim, config.dim_fractions):
                icm, _ = setup.fit(feats, seed, lam=lam, dim=dim)
                scores = compare_predictors(
                    feats.clean, feats.labels, icm, setup.text, setup.tests, probe_reg=config.probe_reg
                )
                avg = {m: sum(v[s] for s in TARGET_STYLES) / len(TARGET_STYLES) for m, v in scores.items()}
                grid.append({"lam": float(lam), "dim": dim, **avg})
        proper = [r for r in grid if r["dim"] < feats.dim]
        per_seed[str(seed)] = {
            "grid": grid,
            "zero_shot": grid[0]["zero_shot"],
            "linear_probe": grid[0]["linear_probe"],
            # k = d is a rotation (no dimension removed): the best *proper* projection is the question
            "best_icm_zero_shot": max(proper, key=lambda r: r["icm_zero_shot"]),
            "best_icm_linear_probe": max(proper, key=lambda r: r["icm_linear_probe"]),
        }
    result = {"config": config.to_dict(), "k": k, "seeds": list(seeds), "per_seed": per_seed}
    _io.write_json(out_dir / "icm_grid.json", result)
    (out_dir / "icm_grid.md").write_text(format_icm_grid(result) + "\n")
    return result


def format_icm_grid(result: dict[str, Any]) -> str:
    """Markdown table of :func:`icm_grid_diagnostic`: per seed, the non-ICM predictors and the best grid point."""
    lines = [
        "| seed | zero-shot | best ICM zero-shot (λ, k) | linear probe | best ICM probe (λ, k) |",
        "|---|---|---|---|---|",
    ]
    for seed, run in result["per_seed"].items():
        zs, pr = run["best_icm_zero_shot"], run["best_icm_linear_probe"]
        lines.append(
            f"| {seed} | {100 * run['zero_shot']:.1f} | {100 * zs['icm_zero_shot']:.1f} ({zs['lam']:g}, {zs['dim']}) | "
            f"{100 * run['linear_probe']:.1f} | {100 * pr['icm_linear_probe']:.1f} ({pr['lam']:g}, {pr['dim']}) |"
        )
    return "\n".join(lines) + (
        "\n\nUnseen-style average accuracy, %. Every grid point with k < d is scored on the test styles (a "
        "diagnostic of what the rule could reach, not a result)."
    )


def _run_icm(request: SuiteRequest, benchmark: Any, formatter: Any, files: list[str]) -> str:
    """Run one ICM benchmark function with the command line's invariance settings; its table and closing line."""
    started = time.time()
    result = benchmark(
        request.load_backbone(),
        request.out,
        seeds=request.seeds,
        config=InvarianceConfig(**request.addons.get("invariance", {})),
        progress=request.progress,
    )
    return f"{formatter(result)}\n\n" + request.wrote(files, started)


@register_suite(
    "icm",
    outputs=("icm.json", "icm.md"),
    help="zero-shot / ICM zero-shot / linear probe / ICM linear probe on the DG task",
)
def _icm_suite(request: SuiteRequest) -> str:
    return _run_icm(request, icm_dg_benchmark, format_icm, ["icm.json", "icm.md"])


@register_suite(
    "icm-grid",
    outputs=("icm_grid.json", "icm_grid.md"),
    help="every (λ, k) of the ICM rule's grid scored on the test styles (a diagnostic)",
)
def _icm_grid_suite(request: SuiteRequest) -> str:
    return _run_icm(request, icm_grid_diagnostic, format_icm_grid, ["icm_grid.json", "icm_grid.md"])
