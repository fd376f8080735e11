"""The calibration suite: target arithmetic on known numbers, intervention class-preservation computed from
accuracies, and the suite end to end on a tiny backbone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone

from prompt_robust.bench.runner import BenchConfig
from prompt_robust.bench.suites import calibration
from prompt_robust.bench.tasks import TaskData


def _run(base: float, new: float, styles: tuple[float, float, float], source: float, worst: float) -> dict:
    sketch, painting, pixel = styles
    return {
        "base_to_new": {"base": base, "new": new, "hm": 2 * base * new / (base + new)},
        "domain_generalization": {"sketch": sketch, "painting": painting, "pixel": pixel, "source_photo": source},
        "spurious": {"avg": 0.7, "worst_group": worst},
    }


def test_target_rows_compute_each_target_from_the_runs():
    zs = _run(0.60, 0.75, (0.5, 0.5, 0.2), 0.8, 0.40)
    raw = {
        "zeroshot": {1: zs, 2: zs},
        "coop": {1: _run(0.70, 0.70, (0.5, 0.6, 0.2), 0.85, 0.20), 2: _run(0.66, 0.74, (0.5, 0.5, 0.2), 0.85, 0.45)},
        "cocoop": {1: _run(0.69, 0.74, (0.5, 0.5, 0.2), 0.8, 0.3), 2: _run(0.65, 0.76, (0.5, 0.5, 0.2), 0.8, 0.3)},
    }
    interventions = {"grayscale": {"clean": 0.8, "intervened": 0.76, "ratio": 0.95}, "invert": {"ratio": 0.5}}
    rows = {r["key"]: r for r in calibration.target_rows(raw, {1: 0.72, 2: 0.68}, interventions)}
    assert rows["probe_gain_base"]["mean"] == pytest.approx(10.0) and rows["probe_gain_base"]["passed"]
    assert rows["probe_gain_base"]["std"] == pytest.approx(torch.tensor([12.0, 8.0]).std().item())
    assert rows["coop_gain_base"]["mean"] == pytest.approx(8.0) and rows["coop_gain_base"]["passed"]
    assert rows["coop_loss_new"]["mean"] == pytest.approx(3.0) and rows["coop_loss_new"]["passed"]
    assert rows["cocoop_gain_new"]["mean"] == pytest.approx(3.0) and rows["cocoop_gain_new"]["passed"]
    assert rows["dg_zeroshot_drop"]["mean"] == pytest.approx(40.0) and rows["dg_zeroshot_drop"]["std"] == 0
    assert rows["dg_coop_keeps"]["mean"] == pytest.approx(10.0 / 6) and rows["dg_coop_keeps"]["passed"]
    # seed 1: 40 - 20 = +20, seed 2: 40 - 45 = -5; the mean +7.5 is a strict drop on average
    assert rows["spurious_coop_worse"]["mean"] == pytest.approx(7.5) and rows["spurious_coop_worse"]["passed"]
    assert rows["intervention_grayscale"]["passed"] and not rows["intervention_invert"]["passed"]
    # a target one point short fails
    raw["coop"][1]["base_to_new"]["base"] = raw["coop"][2]["base_to_new"]["base"] = 0.63
    assert not {r["key"]: r for r in calibration.target_rows(raw, {1: 0.72, 2: 0.68}, {})}["coop_gain_base"]["passed"]


class _Pool:
    """What intervention_preservation reads from the tasks: the DG training pool and its classes."""

    def __init__(self, data: TaskData) -> None:
        self.data = data

    def dg_pool(self) -> TaskData:
        return self.data

    def dg_classes(self) -> tuple[str, ...]:
        return tuple(self.data.classnames)


def test_intervention_preservation_is_the_ratio_of_measured_accuracies():
    backbone = make_backbone("hf")
    generator = torch.Generator().manual_seed(0)
    gray = torch.rand(24, 1, 32, 32, generator=generator).expand(-1, 3, -1, -1)  # R = G = B
    mean, std = torch.tensor(backbone.image_mean).view(1, 3, 1, 1), torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    pixels = (gray - mean) / std
    labels = torch.arange(24) % 4
    tasks = _Pool(TaskData(pixels, labels, ["cat", "dog", "bird", "fish"]))
    out = calibration.intervention_preservation(backbone, tasks, ["grayscale", "invert"])
    # grayscale does not change gray images: the ratio is exactly 1
    assert out["grayscale"]["intervened"] == out["grayscale"]["clean"] and out["grayscale"]["ratio"] == 1.0
    # invert: the accuracies are those of zero-shot CLIP on the inverted and the clean images
    from prompt_robust.learners import build_learner

    learner = build_learner("zeroshot", backbone, tasks.dg_classes())
    with torch.no_grad():
        clean = (learner(pixels).logits.argmax(-1) == labels).float().mean().item()
        inverted = (learner(((1 - gray) - mean) / std).logits.argmax(-1) == labels).float().mean().item()
    assert out["invert"]["clean"] == pytest.approx(clean) and out["invert"]["intervened"] == pytest.approx(inverted)
    assert out["invert"]["ratio"] == pytest.approx(inverted / clean)


def test_calibration_suite_end_to_end(tmp_path):
    backbone = make_backbone("hf")
    bench = BenchConfig(
        steps=2, k=1, pool_per_class=2, test_per_class=1, spurious_per_class=2, world_version=2, batch_size=4
    )
    result = calibration.calibration_benchmark(backbone, tmp_path, seeds=[1], bench=bench, progress=False)
    keys = [row["key"] for row in result["targets"]]
    assert keys[: len(calibration.TARGETS)] == [t.key for t in calibration.TARGETS]
    assert {k for k in keys if k.startswith("intervention_")} == {
        f"intervention_{name}" for name in result["interventions"]
    }
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["targets"] == json.loads(json.dumps(result["targets"]))
    text = (tmp_path / "calibration.md").read_text()
    assert "| target | measured |" in text and "linear probe" in text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "cocoop_seed1.json",
        "coop_seed1.json",
        "zeroshot_seed1.json",
    ]
