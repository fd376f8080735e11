"""Benchmark outputs: ``results.json``, ``results_seeds.json``, ``report.md`` and PNG plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import _io
from .runner import TASKS

__all__ = ["recorded_settings", "sanity_checks", "write_outputs"]

logger = logging.getLogger(__name__)

_METRIC_ORDER = {
    "base_to_new": ["base", "new", "hm"],
    "domain_generalization": ["sketch", "painting", "pixel", "avg", "source_photo"],
    "spurious": ["avg", "worst_group", "gap"],
    "retrieval": ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"],
    "cross_dataset": ["acc"],
}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def format_table(task: str, means: dict, stds: dict) -> str:
    """A markdown table of one task: methods x metrics, ``mean ± std`` in percent."""
    methods = list(means[task])
    metrics = [m for m in _METRIC_ORDER.get(task, []) if m in means[task][methods[0]]]
    metrics += [m for m in means[task][methods[0]] if m not in metrics]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in methods:
        cells = [f"{_pct(means[task][method][m])} ± {_pct(stds[task][method][m])}" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_checks(means: dict) -> list[str]:
    """The behaviours the literature leads one to expect, each reported as seen (not asserted)."""
    checks = []
    b2n = means.get("base_to_new", {})
    if "zeroshot" in b2n and "coop" in b2n:
        zs, coop = b2n["zeroshot"], b2n["coop"]
        checks.append(
            f"CoOp vs zero-shot on base classes: {_pct(coop['base'])} vs {_pct(zs['base'])} "
            f"({'gain' if coop['base'] > zs['base'] else 'NO gain'}, as expected: gain)"
        )
        checks.append(
            f"CoOp vs zero-shot on new classes: {_pct(coop['new'])} vs {_pct(zs['new'])} "
            f"({'loss' if coop['new'] < zs['new'] else 'NO loss'}, as expected: loss)"
        )
    spurious = means.get("spurious", {})
    if "zeroshot" in spurious:
        zs = spurious["zeroshot"]
        checks.append(
            f"Zero-shot on the spurious task: worst group {_pct(zs['worst_group'])} vs average {_pct(zs['avg'])} "
            f"(gap {_pct(zs['gap'])} points; expected: a drop on minority groups)"
        )
    return checks


def _plots(out_dir: Path, means: dict, stds: dict) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'prompt_robust[plots]').")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "base_to_new" in means:
        methods = list(means["base_to_new"])
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(methods), 3.4))
        width = 0.26
        for i, metric in enumerate(("base", "new", "hm")):
            xs = [j + (i - 1) * width for j in range(len(methods))]
            ys = [100 * means["base_to_new"][m][metric] for m in methods]
            es = [100 * stds["base_to_new"][m][metric] for m in methods]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=metric.upper() if metric == "hm" else metric)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Base-to-new generalisation")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "base_to_new.png", dpi=120)
        plt.close(fig)
        written.append("base_to_new.png")
    if "spurious_groups" in means:
        methods = list(means["spurious_groups"])
        groups = list(means["spurious_groups"][methods[0]])
        fig, ax = plt.subplots(figsize=(2 + 0.9 * len(groups), 3.6))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
            ys = [100 * means["spurious_groups"][method][g] for g in groups]
            es = [100 * stds["spurious_groups"][method][g] for g in groups]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=method)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Spurious correlation: accuracy per (class, background) group")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "spurious_groups.png", dpi=120)
        plt.close(fig)
        written.append("spurious_groups.png")
    return written


def recorded_settings(out_dir: str | Path) -> dict[str, Any] | None:
    """The settings :func:`write_outputs` recorded in ``out_dir/results_seeds.json`` (None: no readable record),
    so a caller can tell a rerun of the same benchmark from one that would replace results of other settings.

    Example:
        >>> recorded_settings("no/such/dir") is None
        True
    """
    path = Path(out_dir) / "results_seeds.json"
    try:
        settings = _io.read_json(path, "benchmark results").get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def write_outputs(
    out_dir: str | Path, raw: dict, means: dict, stds: dict, *, header: str, settings: dict[str, Any]
) -> list[str]:
    """Write every output file; returns their names.

    Args:
        out_dir: output directory.
        raw: ``{method: {seed: {task: {metric: value}}}}``.
        means / stds: from :func:`prompt_robust.bench.runner.summarize`.
        header: first lines of the report (what was run, with which command).
        settings: the configuration, recorded in ``results_seeds.json`` (read back by :func:`recorded_settings`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [key for key in ("base_to_new_datasets",) if key in means]
    _io.write_json(out_dir / "results.json", {task: means[task] for task in [*TASKS, *extra] if task in means})
    _io.write_json(
        out_dir / "results_seeds.json",
        {"settings": settings, "std": stds, "per_seed": {m: {str(s): r for s, r in v.items()} for m, v in raw.items()}},
    )
    lines = [header, ""]
    for task in TASKS:
        if task in means:
            lines += [f"## {task}", "", format_table(task, means, stds), ""]
        if task == "base_to_new" and "base_to_new_datasets" in means:
            lines += ["### base_to_new per dataset", "", format_table("base_to_new_datasets", means, stds), ""]
    if "spurious_groups" in means:
        lines += ["### spurious: accuracy per group", "", format_table("spurious_groups", means, stds), ""]
    checks = sanity_checks(means)
    if checks:
        lines += ["## Sanity checks", ""] + [f"- {check}" for check in checks] + [""]
    plots = _plots(out_dir, means, stds)
    lines += [f"![{name}]({name})" for name in plots]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return ["results.json", "results_seeds.json", "report.md", *plots]
