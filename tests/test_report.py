"""Benchmark reports a newcomer can read: one line per metric, no std for one seed, plots that show the gaps."""

from __future__ import annotations

import pytest

from prompt_robust.bench import report

MEANS = {
    "base_to_new": {
        "zeroshot": {"base": 0.70, "new": 0.74, "hm": 0.7195},
        "coop": {"base": 0.78, "new": 0.71, "hm": 0.7434},
    },
    "spurious": {"coop": {"avg": 0.80, "worst_group": 0.40, "gap": 0.40}},
    "spurious_groups": {"coop": {"a | land": 0.9, "a | water": 0.4}, "zeroshot": {"a | land": 0.88, "a | water": 0.5}},
}
STDS = {task: {m: {k: 0.01 for k in v} for m, v in methods.items()} for task, methods in MEANS.items()}


def test_one_seed_shows_means_only_and_several_show_the_std():
    one = report.format_table("base_to_new", MEANS, STDS, seeds=1)
    assert "| coop | 78.0 | 71.0 | 74.3 |" in one and "±" not in one
    three = report.format_table("base_to_new", MEANS, STDS, seeds=3)
    assert "| coop | 78.0 ± 1.0 | 71.0 ± 1.0 | 74.3 ± 1.0 |" in three


@pytest.mark.parametrize("task", ["base_to_new", "spurious"])
def test_every_table_explains_its_metrics_in_one_line(task):
    table = report.format_table(task, MEANS, STDS, seeds=1)
    note = table.splitlines()[-1]
    assert note == report.METRIC_NOTES[task]
    for metric in MEANS[task]["coop"]:
        assert f"{metric}:" in note or f"{metric} " in note


def test_plots_zoom_on_the_values_and_skip_error_bars_for_one_seed(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    seen = []
    real_savefig = plt.Figure.savefig

    def record(fig, *args, **kwargs):
        ax = fig.axes[0]
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        seen.append((ax.get_ylim(), len(bars), [c.errorbar for c in bars]))
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = record
    try:
        written = report._plots(tmp_path, MEANS, STDS, seeds=1)
        report._plots(tmp_path, MEANS, STDS, seeds=3)
    finally:
        plt.Figure.savefig = real_savefig
    assert written == ["base_to_new.png", "spurious_groups.png"]
    (low, high), _, errorbars = seen[0]
    assert 60 < low < 70 and 78 < high < 90  # the 70-78 % bars, not 0-100
    assert all(bar is None for bar in errorbars)  # one seed: no zero-width error bars
    assert all(bar is not None for bar in seen[2][2])
    assert seen[1][0][0] < 40 and seen[1][0][1] <= 100
    assert report._value_range([10.0, 12.0], [0.0, 0.0]) == (9.0, 13.0)  # at least 1 point of margin
