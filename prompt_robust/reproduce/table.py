"""The results of a protocol as the papers lay them out, in Markdown and JSON (accuracies in percent).

* base-to-new: the average over the datasets first (mean base and new accuracy, the HM of the two means, as
  CoCoOp's Table 1), then one block per dataset; methods are rows, Base / New / HM columns; an HM is always the HM
  of the mean base and new accuracies (its ``±``: the spread of the per-seed HMs);
* cross-dataset and domain generalisation: one row per method, the source (ImageNet) then each target, and the
  average over the targets (CoCoOp's Tables 2 and 3);
* spurious: one row per method, worst-group accuracy, average accuracy and their gap per dataset.

Each number is the mean over the seeds, ``± std`` when there are several. When the backbone has CLIP ViT-B/16's
architecture, the papers' numbers found in stored sources (:mod:`prompt_robust.reproduce.paper`) stand beside ours,
with their source; cells whose paper number was not found stay empty.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _io
from ..eval.metrics import harmonic_mean
from .datasets import DATASETS
from .paper import is_paper_backbone, paper_numbers
from .protocols import Protocol

__all__ = ["build_table", "write_table"]

_LABELS = {"base": "Base", "new": "New", "hm": "HM", "acc": "Acc", "worst_group": "Worst", "avg": "Avg", "gap": "Gap"}
Results = Mapping[tuple[str, str, int], Mapping[str, Any]]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    percent = [100 * v for v in values]
    return {
        "mean": statistics.fmean(percent),
        "std": statistics.stdev(percent) if len(percent) > 1 else 0.0,
        "n": len(percent),
    }


def _cell(stats: Mapping[str, Any] | None) -> str:
    if not stats:
        return "—"
    text = f"{stats['mean']:.2f}"
    return text + (f" ± {stats['std']:.2f}" if stats["n"] > 1 else "")


def _paper(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(columns: Sequence[str]) -> list[str]:
    return [_row(columns), _row(["---"] * len(columns))]


def _per_dataset(
    protocol: Protocol, results: Results, methods: Sequence[str], seeds: Sequence[int], datasets: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{dataset: {method: {metric: stats, "seeds": [...]}}}`` over the seeds that finished."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in datasets:
        for method in methods:
            runs = [(s, results[(dataset, method, s)]) for s in seeds if (dataset, method, s) in results]
            if not runs:
                continue
            cell: dict[str, Any] = {m: _stats([r[m] for _, r in runs]) for m in protocol.metrics}
            if "hm" in cell:  # as CoCoOp's table: the HM of the mean base and new accuracies (spread: per seed)
                cell["hm"]["mean"] = harmonic_mean(cell["base"]["mean"], cell["new"]["mean"])
            cell["seeds"] = [s for s, _ in runs]
            out.setdefault(dataset, {})[method] = cell
    return out


def _average(
    protocol: Protocol, results: Results, method: str, seeds: Sequence[int], datasets: Sequence[str]
) -> dict[str, Any] | None:
    """The average row of ``method`` over ``datasets`` (those it has for every seed), per seed, then over seeds."""
    complete = [s for s in seeds if all((d, method, s) in results for d in datasets)]
    if not datasets or not complete:
        return None
    if protocol.name == "base2new":
        base = [statistics.fmean(results[(d, method, s)]["base"] for d in datasets) for s in complete]
        new = [statistics.fmean(results[(d, method, s)]["new"] for d in datasets) for s in complete]
        out = {"base": _stats(base), "new": _stats(new)}
        # CoCoOp's average row: the HM of the mean base and new accuracies (its spread: the HM's over seeds)
        hm = _stats([harmonic_mean(b, n) for b, n in zip(base, new, strict=True)])
        hm["mean"] = harmonic_mean(out["base"]["mean"], out["new"]["mean"])
        out["hm"] = hm
    else:
        out = {"acc": _stats([statistics.fmean(results[(d, method, s)]["acc"] for d in datasets) for s in complete])}
    out["seeds"] = complete
    out["datasets"] = list(datasets)
    return out


def _describe(settings: Mapping[str, Any], seeds: Sequence[int], backbone: Any) -> str:
    shots = settings.get("shots")
    return (
        f"Backbone {getattr(backbone, 'name', '') or type(backbone).__name__} (fingerprint {backbone.fingerprint()}); "
        f"preset `{settings.get('preset')}`; {shots or 'all'} shots per class; seeds {', '.join(map(str, seeds))} "
        f"(mean ± std over seeds); {settings.get('device')}, {settings.get('precision')}. Accuracy in %."
    )


def build_table(
    protocol: Protocol,
    results: Results,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    datasets: Sequence[str],
    backbone: Any,
    missing: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The table of ``protocol`` as (Markdown, JSON-ready data).

    Args:
        protocol: the protocol.
        results: ``{(dataset, method, seed): metrics}`` (accuracies as fractions).
        methods / seeds / datasets: what the table covers, in order (datasets: the tested ones).
        backbone: the backbone (its name and fingerprint are printed; the papers' numbers need ViT-B/16).
        missing: one line per missing dataset (listed under the table).
        settings: preset, shots, device and precision (printed).

    Example:
        >>> from prompt_robust.reproduce.protocols import PROTOCOLS
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> results = {("dtd", "coop", 1): {"base": 0.5, "new": 0.25, "hm": 1 / 3}}
        >>> text, data = build_table(PROTOCOLS["base2new"], results, methods=["coop"], seeds=[1], datasets=["dtd"],
        ...                          backbone=tiny_clip_backbone(layers=1))
        >>> round(data["average"]["coop"]["hm"]["mean"], 2)
        33.33
    """
    settings = dict(settings or {})
    paper_backbone = is_paper_backbone(backbone)
    cells = _per_dataset(protocol, results, methods, seeds, datasets)
    targets = [d for d in datasets if d not in protocol.sources] if protocol.targets else list(datasets)
    average = {}
    if protocol.name != "spurious":
        for method in methods:
            row = _average(protocol, results, method, seeds, targets)
            if row is not None:
                average[method] = row
    sources: set[str] = set()
    papers: dict[str, dict[str, Any]] = {}
    for method in methods:
        found = paper_numbers(protocol.name, "average", method) if paper_backbone else None
        if found:
            papers[method] = found
            sources.add(found["source"])

    lines = [f"## {protocol.title}", "", _describe(settings, seeds, backbone), ""]
    notes: list[str] = []
    if protocol.name == "base2new":
        expected = len(protocol.sources)
        lines += [f"### Average over {len(targets)} of {expected} datasets", ""]
        columns = ["Method", "Base", "New", "HM"] + (["Paper Base", "Paper New", "Paper HM"] if paper_backbone else [])
        lines += _header(columns)
        for method in methods:
            row = average.get(method)
            paper = papers.get(method, {}).get("values", {})
            extra = [_paper(paper.get(m)) for m in ("base", "new", "hm")] if paper_backbone else []
            lines.append(_row([method, *[_cell(row and row[m]) for m in ("base", "new", "hm")], *extra]))
        if paper_backbone and len(targets) < expected:
            notes.append(
                f"Our average covers {len(targets)} of the {expected} datasets; the papers' averages cover all "
                f"{expected}, so the two are not directly comparable."
            )
        for dataset in datasets:
            lines += ["", f"### {DATASETS[dataset].title}", ""]
            lines += _header(["Method", "Base", "New", "HM"])
            for method in methods:
                cell = cells.get(dataset, {}).get(method)
                lines.append(_row([method, *[_cell(cell and cell[m]) for m in ("base", "new", "hm")]]))
        if paper_backbone:
            notes.append("Per-dataset paper numbers were not found in the stored sources; those blocks have none.")
    elif protocol.name == "spurious":
        columns = ["Method"] + [f"{DATASETS[d].title} {_LABELS[m]}" for d in datasets for m in protocol.metrics]
        lines += _header(columns)
        for method in methods:
            row = [_cell(cells.get(d, {}).get(method, {}).get(m)) for d in datasets for m in protocol.metrics]
            lines.append(_row([method, *row]))
        if paper_backbone:
            notes.append("Paper numbers for this table were not found in the stored sources; none are shown.")
    else:
        # the papers' headers: "ImageNet (source)", then the targets (ImageNet's variants as "-V2", "-Sketch", ...)
        source_titles = [
            f"{DATASETS[d].title} (source)" if d in protocol.sources else DATASETS[d].title.replace("ImageNet-", "-")
            for d in datasets
        ]
        lines += _header(["Method", *source_titles, "Average (targets)"])
        for method in methods:
            row = [_cell(cells.get(d, {}).get(method, {}).get("acc")) for d in datasets]
            lines.append(_row([method, *row, _cell(average.get(method, {}).get("acc"))]))
        if paper_backbone:
            notes.append("Paper numbers for this table were not found in the stored sources; none are shown.")
    if not paper_backbone:
        notes.append("No paper numbers: the backbone does not have CLIP ViT-B/16's architecture, the papers' backbone.")
    for source in sorted(sources):
        notes.append(f"Paper numbers: {source}. Empty paper cells: no number found in the stored sources.")
    if paper_backbone and sources:
        notes.append("The papers used OpenAI's CLIP ViT-B/16 weights; only the architecture of ours is checked.")
    for line in missing:
        notes.append(f"Not run, missing: {line}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    data = {
        "protocol": protocol.name,
        "title": protocol.title,
        "unit": "percent",
        "metrics": list(protocol.metrics),
        "methods": list(methods),
        "seeds": list(seeds),
        "datasets": list(datasets),
        "settings": settings,
        "backbone": {"name": str(getattr(backbone, "name", "")), "fingerprint": backbone.fingerprint()},
        "paper_backbone": paper_backbone,
        "cells": cells,
        "average": average,
        "paper": {method: found for method, found in papers.items()},
        "missing": list(missing),
        "notes": notes,
    }
    return "\n".join(lines) + "\n", data


def write_table(directory: str | Path, name: str, markdown: str, data: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``<directory>/<name>.md`` and ``<name>.json`` atomically; returns their paths."""
    directory = Path(directory)
    paths = {"markdown": directory / f"{name}.md", "json": directory / f"{name}.json"}
    _io.atomic_write(paths["markdown"], lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    _io.write_json(paths["json"], data)
    return paths
