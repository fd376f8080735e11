"""The standard benchmark: every task of :mod:`prompt_robust.bench.runner` for a list of methods, mean ± std
over seeds (``prompt-robust bench --suite quick`` / ``--suite full``, and ``prompt-robust demo``)."""

from __future__ import annotations

import time
from pathlib import Path

from .base import SuiteRequest, register_suite

__all__ = ["DEMO_METHODS", "OUTPUTS", "demo", "demo_config", "full_methods", "quick_methods", "run_standard"]

#: what the standard benchmark writes into its output directory
OUTPUTS = ("results.json", "results_seeds.json", "report.md", "base_to_new.png", "spurious_groups.png")
#: the baselines every quick run (and the demo) compares the add-ons with
DEMO_METHODS = ["zeroshot", "coop"]


def quick_methods() -> list[str]:
    """Zero-shot, CoOp and CoOp with each available add-on."""
    from ...addons import ADDONS

    return DEMO_METHODS + [f"coop+{name}" for name in sorted(ADDONS)]


def full_methods() -> list[str]:
    """Zero-shot, every learner, and every learner with each available add-on."""
    from ...addons import ADDONS

    learners = ["coop", "cocoop", "vpt", "maple"]
    return ["zeroshot"] + learners + [f"{lr}+{a}" for lr in learners for a in sorted(ADDONS)]


def run_standard(request: SuiteRequest, config, title: str) -> str:
    """Run the benchmark of ``config`` (a :class:`~prompt_robust.bench.runner.BenchConfig`) into ``request.out``
    and write its report, titled ``title``; returns the tables and sanity checks to print."""
    # imported here, at call time, so that a test's stand-in for run_benchmark is the one called
    from ..report import format_table, sanity_checks, seed_count, write_outputs
    from ..runner import TASKS, run_benchmark, summarize

    started = time.time()
    backbone = request.load_backbone()
    out = Path(request.out)
    settings = {**config.to_dict(), "backbone": backbone.fingerprint()}
    request.claim(settings)
    raw = run_benchmark(backbone, config, out, progress=request.progress)
    means, stds = summarize(raw)
    header = (
        f"# {title}\n\nCommand: `{request.command}`  \nBackbone: `{backbone.name}`  \nSeeds: {config.seeds} "
        f"({'mean ± std' if len(config.seeds) > 1 else 'one seed'}, %)  \nWall time: {time.time() - started:.0f} s"
    )
    files = write_outputs(out, raw, means, stds, header=header, settings=settings)
    seeds = seed_count(raw)
    lines = [f"\n{task}\n" + format_table(task, means, stds, seeds=seeds) for task in TASKS if task in means]
    checks = sanity_checks(means)
    if checks:
        lines.append("\nsanity checks\n" + "\n".join(f"- {c}" for c in checks))
    lines.append(f"\nwrote {', '.join(str(out / f) for f in files)} ({time.time() - started:.0f} s)")
    return "\n".join(lines)


def _standard(request: SuiteRequest, name: str, methods: list[str]) -> str:
    # --methods, when given, wins over the suite's list
    config = request.bench_config(methods=methods, seeds=request.seeds, refiner=request.refiner, **request.addons)
    return run_standard(request, config, f"prompt_robust benchmark ({name} suite)")


@register_suite("quick", outputs=OUTPUTS, help="zero-shot, CoOp, CoOp+each add-on", saves_runs=True, resumes=True)
def _quick(request: SuiteRequest) -> str:
    return _standard(request, "quick", quick_methods())


@register_suite("full", outputs=OUTPUTS, help="every learner x add-on", saves_runs=True, resumes=True)
def _full(request: SuiteRequest) -> str:
    return _standard(request, "full", full_methods())


def demo_config():
    """The demo's :class:`~prompt_robust.bench.runner.BenchConfig`: the quick methods on reduced settings.

    Example:
        >>> demo_config().steps
        100
    """
    from ..runner import BenchConfig

    # the three shift tasks (base-to-new on `textures`, the dataset where zero-shot is weakest), 100 AdamW steps
    # instead of the papers' schedules and small test sets keep the demo within 3 minutes on 2 cores; `bench`
    # runs every task and dataset with the papers' schedules
    return BenchConfig(
        methods=quick_methods(),
        seeds=[1],
        datasets=["textures"],
        steps=100,
        optimizer="adamw",
        lr=0.002,
        batch_size=32,
        test_per_class=10,
        tasks=["base_to_new", "spurious", "domain_generalization"],
        refiner={"train_steps": 150, "inner_steps": 2},
        counterfactual={"train_steps": 100, "proximity_search": 0, "proximity_weight": 0.5},
    )


def demo(request: SuiteRequest) -> str:
    """``prompt-robust demo``: the quick suite's protocol on :func:`demo_config` (``request.claim`` is called
    with its settings, so a rerun resumes)."""
    return run_standard(request, demo_config(), "prompt_robust demo on the embedded world")
