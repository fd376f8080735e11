"""Benchmark outputs: ``results.json``, ``results_seeds.json``, ``report.md`` and PNG plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import _io
from .runner import TASKS

__all__ = ["METRIC_NOTES", "format_table", "recorded_settings", "sanity_checks", "write_outputs"]

logger = logging.getLogger(__name__)

_METRIC_ORDER = {
    "base_to_new": ["base", "new", "hm"],
    "domain_generalization": ["sketch", "painting", "pixel", "avg", "source_photo"],
    "spurious": ["avg", "worst_group", "gap"],
    "retrieval": ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"],
    "cross_dataset": ["acc"],
}


#: what each task's metrics mean, one line per task (printed under its table)
METRIC_NOTES = {
    "base_to_new": "base: accuracy on the classes the prompt was tuned on; new: on held-out classes of the same "
    "datasets, never seen in training; hm: their harmonic mean (high only when both are).",
    "domain_generalization": "trained on photos; source_photo: accuracy on held-out photos; sketch, painting, "
    "pixel: on styles never seen in training; avg: mean over those unseen styles.",
    "spurious": "avg: accuracy over all test images; worst_group: the lowest accuracy of any (class, background) "
    "group, where the background misleads; gap: avg - worst_group (smaller is more robust).",
    "retrieval": "i2t / t2i R@k: share of image (text) queries whose matching text (image) is among the top k.",
    "cross_dataset": "acc: accuracy on datasets the prompt was not trained on.",
}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def seed_count(raw: dict) -> int:
    """The most seeds any method ran (``raw``: ``{method: {seed: results}}``)."""
    return max((len(seeds) for seeds in raw.values()), default=0)


def format_table(task: str, means: dict, stds: dict, *, seeds: int = 2) -> str:
    """A markdown table of one task: methods x metrics in percent, ``mean ± std`` (the mean alone for one seed,
    whose std says nothing), with the task's metric note under it."""
    methods = list(means[task])
    metrics = [m for m in _METRIC_ORDER.get(task, []) if m in means[task][methods[0]]]
    metrics += [m for m in means[task][methods[0]] if m not in metrics]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in methods:
        cells = [
            _pct(means[task][method][m]) + (f" ± {_pct(stds[task][method][m])}" if seeds > 1 else "") for m in metrics
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if task in METRIC_NOTES:
        lines += ["", METRIC_NOTES[task]]
    return "\n".join(lines)


def _value_range(values: list[float], errors: list[float]) -> tuple[float, float]:
    """Y limits that show the differences: the bars' range (with error bars) plus a margin, not 0-100."""
    low = min(v - e for v, e in zip(values, errors, strict=True))
    high = max(v + e for v, e in zip(values, errors, strict=True))
    margin = max(1.0, 0.15 * (high - low))
    return max(0.0, low - margin), min(100.0, high + margin)


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


def _plots(out_dir: Path, means: dict, stds: dict, *, seeds: int = 2) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'prompt_robust[plots]').")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grouped_bars(name: str, ticks: list[str], series: dict[str, list[tuple[float, float]]], **style) -> None:
        """One bar per (series, tick): ``series[label][tick] = (mean, std)`` as fractions; written to ``name``."""
        fig, ax = plt.subplots(figsize=style["figsize"])
        width = style["width"]
        values, errors = [], []
        for i, (label, points) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(ticks))]
            ys = [100 * mean for mean, _ in points]
            es = [100 * std if seeds > 1 else 0.0 for _, std in points]
            values, errors = values + ys, errors + es
            ax.bar(xs, ys, width, yerr=es if seeds > 1 else None, capsize=2, label=label)
        ax.set_xticks(range(len(ticks)), ticks, rotation=style["rotation"], ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(*_value_range(values, errors))
        ax.set_title(style["title"] + ("" if seeds > 1 else " (one seed)"))
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)

    written: list[str] = []
    if "base_to_new" in means:
        methods = list(means["base_to_new"])
        table, spread = means["base_to_new"], stds["base_to_new"]
        series = {
            metric.upper() if metric == "hm" else metric: [(table[m][metric], spread[m][metric]) for m in methods]
            for metric in ("base", "new", "hm")
        }
        grouped_bars(
            "base_to_new.png",
            methods,
            series,
            figsize=(2.4 + 1.4 * len(methods), 3.4),
            width=0.26,
            rotation=20,
            title="Base-to-new generalisation",
        )
    if "spurious_groups" in means:
        table, spread = means["spurious_groups"], stds["spurious_groups"]
        methods = list(table)
        groups = list(table[methods[0]])
        series = {method: [(table[method][g], spread[method][g]) for g in groups] for method in methods}
        grouped_bars(
            "spurious_groups.png",
            groups,
            series,
            figsize=(3.4 + 0.9 * len(groups), 3.6),
            width=0.8 / len(methods),
            rotation=30,
            title="Accuracy per (class, background) group",
        )
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
    seeds = seed_count(raw)
    lines = [header, ""]
    for task in TASKS:
        if task in means:
            lines += [f"## {task}", "", format_table(task, means, stds, seeds=seeds), ""]
        if task == "base_to_new" and "base_to_new_datasets" in means:
            table = format_table("base_to_new_datasets", means, stds, seeds=seeds)
            lines += ["### base_to_new per dataset", "", table, ""]
    if "spurious_groups" in means:
        lines += ["### spurious: accuracy per group", "", format_table("spurious_groups", means, stds, seeds=seeds), ""]
    checks = sanity_checks(means)
    if checks:
        lines += ["## Sanity checks", ""] + [f"- {check}" for check in checks] + [""]
    plots = _plots(out_dir, means, stds, seeds=seeds)
    lines += [f"![{name}]({name})" for name in plots]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return ["results.json", "results_seeds.json", "report.md", *plots]
