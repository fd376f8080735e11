"""Refiner benchmarks: the sampler steps sweep on the embedded world and the cost profile on a real-size
architecture. Run through ``prompt-robust bench --suite refiner-sweep`` / ``--suite refiner-cost``."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ... import _io
from ...addons.refiner.config import RefinerConfig
from ...backbones.base import ClipBackbone
from ...config import RobustConfig
from ...flows import SOLVER_ORDERS
from .base import SuiteRequest, register_suite

__all__ = ["cost_profile", "steps_sweep"]

logger = logging.getLogger(__name__)

SWEEP_STEPS: tuple[int, ...] = (1, 2, 5, 10, 20, 50)


@torch.no_grad()
def _accuracy_and_time(model, data, batch_size: int = 250) -> tuple[float, float]:
    model.eval()
    correct, started = 0, time.perf_counter()
    for start in range(0, len(data), batch_size):
        logits = model(data.pixel_values[start : start + batch_size]).logits
        correct += int((logits.argmax(-1) == data.labels[start : start + batch_size]).sum())
    return correct / len(data), (time.perf_counter() - started) / len(data)


def steps_sweep(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    learner: str = "coop",
    seeds: Sequence[int] = (1, 2, 3),
    steps: Sequence[int] = SWEEP_STEPS,
    methods: Sequence[str] = tuple(SOLVER_ORDERS),
    bench_config: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Base-to-new accuracy and wall time per image of ``learner+refiner`` for every (solver, steps) pair.

    One refiner is trained per seed (the benchmark's base-to-new protocol); only the test-time sampler changes.

    Returns:
        ``{"rows": [{method, steps, evaluations, base, new, hm, ms_per_image (mean over seeds), *_std}], ...}``.
    """
    from ...eval.metrics import harmonic_mean
    from ..runner import BenchConfig, _Runner

    config = bench_config or BenchConfig(methods=[f"{learner}+refiner"], seeds=list(seeds), tasks=["base_to_new"])
    out_dir = Path(out_dir)
    runner = _Runner(backbone, config, out_dir)
    datasets = config.datasets or runner.tasks.datasets()
    per_seed: dict[tuple[str, int], list[dict[str, float]]] = {}
    for seed in tqdm(list(seeds), desc="refiner sweep", disable=not progress):
        # {(solver, steps): {metric: [value per dataset]}}: base-to-new is averaged over the datasets
        scores: dict[tuple[str, int], dict[str, list[float]]] = {}
        for dataset in datasets:
            model = runner.base_to_new_model(learner, ["refiner"], dataset, seed)
            refiner = model.addons["refiner"]
            base_test, new_test = runner.tasks.base_to_new_test(dataset)
            for method in methods:
                for n in steps:
                    refiner.set_sampler(n, method)
                    model.learner.set_classnames(runner.tasks.base_classes(dataset))
                    base, t_base = _accuracy_and_time(model, base_test)
                    model.learner.set_classnames(runner.tasks.new_classes(dataset))
                    new, t_new = _accuracy_and_time(model, new_test)
                    entry = scores.setdefault((method, n), {"base": [], "new": [], "seconds": []})
                    entry["base"].append(base)
                    entry["new"].append(new)
                    entry["seconds"].append(t_base + t_new)
        for key, entry in scores.items():
            base, new = statistics.fmean(entry["base"]), statistics.fmean(entry["new"])
            ms = 500 * statistics.fmean(entry["seconds"])
            per_seed.setdefault(key, []).append(
                {"base": base, "new": new, "hm": harmonic_mean(base, new), "ms_per_image": ms}
            )
    rows = []
    for (method, n), runs in per_seed.items():
        row: dict[str, Any] = {"method": method, "steps": n, "evaluations": n * SOLVER_ORDERS[method][1]}
        for key in runs[0]:
            values = [r[key] for r in runs]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    result = {"learner": learner, "seeds": list(seeds), "bench_config": config.to_dict(), "rows": rows}
    _io.write_json(out_dir / "sweep.json", result)
    (out_dir / "sweep.md").write_text(format_sweep(result) + "\n")
    _plot_sweep(result, out_dir / "sweep.png")
    return result


def format_sweep(result: dict[str, Any]) -> str:
    """Markdown table of a steps sweep (accuracies in %, mean ± std over seeds)."""
    lines = [
        "| solver | steps | velocity evals | base | new | HM | ms / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc = [f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}" for k in ("base", "new", "hm")]
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['evaluations']} | "
            + " | ".join(acc)
            + f" | {r['ms_per_image']:.2f} |"
        )
    return "\n".join(lines)


def _plot_sweep(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no sweep plot (pip install 'prompt_robust[plots]').")
        return
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == method]
        steps = [r["steps"] for r in rows]
        ax_acc.errorbar(
            steps, [100 * r["hm"] for r in rows], [100 * r["hm_std"] for r in rows], label=method, capsize=2
        )
        ax_time.plot(steps, [r["ms_per_image"] for r in rows], marker="o", label=method)
    for ax, label in ((ax_acc, "base-to-new HM (%)"), (ax_time, "ms per test image")):
        ax.set_xscale("log")
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{result['learner']}+refiner: sampler steps sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_profile(
    backbone: ClipBackbone,
    out_dir: str | Path,
    *,
    num_classes: int = 10,
    batch_size: int = 8,
    repeats: int = 3,
    text_chunk_size: int | None = None,
    refiner: RefinerConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Inference throughput of CoOp, CoOp+refiner and CoCoOp, measured side by side on one backbone, and the
    share of the refiner's time spent in its sampler.

    The weights may be random (cost does not depend on them); the refiner is marked trained so it runs.

    Returns:
        ``{"rows": [{method, images_per_s, ms_per_batch, sampler_ms_per_batch, sampler_share}], ...}``.
    """
    from ... import build_learner, wrap

    refiner = refiner or RefinerConfig()
    names = [f"class{i}" for i in range(num_classes)]
    generator = torch.Generator().manual_seed(0)
    size = backbone.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(backbone.device)
    chunk = {"text_chunk_size": text_chunk_size}
    setups = {
        "coop": (build_learner("coop", backbone, names, ctx_init="a photo of a", **chunk), None),
        "coop+refiner": (build_learner("coop", backbone, names, ctx_init="a photo of a", **chunk), refiner),
        "cocoop": (build_learner("cocoop", backbone, names, **chunk), None),
    }
    rows = []
    for method, (learner, ref_config) in tqdm(setups.items(), desc="cost", disable=not progress):
        model = wrap(learner, RobustConfig(refiner=ref_config)).eval()
        sampler_time = [0.0]
        if ref_config is not None:
            addon = model.addons["refiner"]
            addon.trained_steps.fill_(1)
            sample = addon.sampler.sample

            def timed(velocity, x0, _sample=sample, _total=sampler_time):
                started = time.perf_counter()
                out = _sample(velocity, x0)
                _total[0] += time.perf_counter() - started
                return out

            addon.sampler.sample = timed
        with torch.no_grad():
            model(pixel_values)  # warm-up
            sampler_time[0] = 0.0
            started = time.perf_counter()
            for _ in range(repeats):
                model(pixel_values)
            elapsed = (time.perf_counter() - started) / repeats
        rows.append(
            {
                "method": method,
                "images_per_s": batch_size / elapsed,
                "ms_per_batch": 1000 * elapsed,
                "sampler_ms_per_batch": 1000 * sampler_time[0] / repeats,
                "sampler_share": sampler_time[0] / repeats / elapsed,
            }
        )
    result = {
        "backbone": backbone.name,
        "num_classes": num_classes,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "refiner": refiner.to_dict(),
        "rows": rows,
    }
    _io.write_json(Path(out_dir) / "cost.json", result)
    (Path(out_dir) / "cost.md").write_text(format_cost(result) + "\n")
    return result


def format_cost(result: dict[str, Any]) -> str:
    """Markdown table of a cost profile."""
    lines = [
        f"Backbone `{result['backbone']}`, {result['num_classes']} classes, batch {result['batch_size']}, "
        f"{result['threads']} CPU thread(s), mean of {result['repeats']} batches after a warm-up.",
        "",
        "| method | images / s | ms / batch | sampler ms / batch | sampler share |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        share = f"{100 * r['sampler_share']:.1f}%" if r["sampler_ms_per_batch"] else "-"
        sampler = f"{r['sampler_ms_per_batch']:.1f}" if r["sampler_ms_per_batch"] else "-"
        lines.append(f"| {r['method']} | {r['images_per_s']:.2f} | {r['ms_per_batch']:.0f} | {sampler} | {share} |")
    return "\n".join(lines)


@register_suite(
    "refiner-sweep",
    outputs=("sweep.json", "sweep.md", "sweep.png"),
    help="sampler steps x solver for LEARNER+refiner",
)
def _sweep_suite(request: SuiteRequest) -> str:
    started = time.time()
    out = Path(request.out)
    config = request.bench_config(
        methods=[f"{request.learner}+refiner"], seeds=request.seeds, refiner=request.refiner, tasks=["base_to_new"]
    )
    result = steps_sweep(
        request.load_backbone(),
        out,
        learner=request.learner,
        seeds=request.seeds,
        bench_config=config,
        progress=request.progress,
    )
    return f"{format_sweep(result)}\n\n" + request.wrote(["sweep.json", "sweep.md", "sweep.png"], started, out)


@register_suite(
    "refiner-cost",
    outputs=("cost.json", "cost.md"),
    help="images/s of CoOp, CoOp+refiner, CoCoOp on a real-size architecture (default backbone "
    "open_clip:ViT-B-16, random weights)",
)
def _cost_suite(request: SuiteRequest) -> str:
    started = time.time()
    out = Path(request.out)
    backbone = request.load_backbone("open_clip:ViT-B-16")
    result = cost_profile(backbone, out, refiner=RefinerConfig(**request.refiner), progress=request.progress)
    return f"{format_cost(result)}\n\n" + request.wrote(["cost.json", "cost.md"], started, out)
