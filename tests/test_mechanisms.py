"""Mechanism suites: the mixed-style task's data, the group-purity diagnostic on known partitions, and the
refiner's suite end to end on a tiny backbone (structure, caching, refusal of changed settings)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone

from prompt_robust.bench import world
from prompt_robust.bench.runner import BenchConfig
from prompt_robust.bench.suites import mechanisms
from prompt_robust.bench.tasks import WorldTasks


def test_group_purity_on_known_partitions():
    truth = torch.arange(4).repeat_interleave(5)
    assert mechanisms.group_purity(truth.clone(), truth) == 1.0
    assert mechanisms.group_purity((truth + 1) % 4, truth) == 1.0  # the numbering does not matter
    assert mechanisms.group_purity(torch.zeros(20, dtype=torch.long), truth) == 0.25
    # splitting a true group keeps purity 1; merging two halves of them costs the smaller half
    assert mechanisms.group_purity(torch.arange(20), truth) == 1.0
    merged = truth.clone()
    merged[truth == 1] = 0
    assert mechanisms.group_purity(merged, truth) == 0.75
    with pytest.raises(ValueError, match="same shape"):
        mechanisms.group_purity(truth[:3], truth)


def test_styled_task_has_every_class_in_every_style():
    tasks = WorldTasks(32, (0.5,) * 3, (0.5,) * 3, pool_per_class=3, test_per_class=2, version=2)
    train, indices = tasks.styled_train(2, seed=1)
    n_cls, n_styles = len(tasks.dg_classes()), len(world.STYLES)
    assert len(train) == 2 * n_cls * n_styles and train.group_names == list(world.STYLES)
    counts = torch.bincount(train.labels * n_styles + train.groups, minlength=n_cls * n_styles)
    assert (counts == 2).all()
    assert tasks.styled_train(2, seed=1)[1] == indices and tasks.styled_train(2, seed=2)[1] != indices
    test = tasks.styled_test()
    assert len(test) == 2 * n_cls * n_styles
    # training and test images differ (other seeds)
    assert not torch.equal(test.pixel_values[:2], tasks.styled_pool().pixel_values[:2])
    with pytest.raises(ValueError, match="world 2 only"):
        WorldTasks(32, (0.5,) * 3, (0.5,) * 3, version=1).styled_pool()


def test_refiner_mechanism_suite_end_to_end(tmp_path):
    backbone = make_backbone("hf")
    bench = BenchConfig(steps=2, k=1, pool_per_class=3, test_per_class=1, world_version=2, batch_size=8)
    refiner = {"hidden_dim": 16, "layers": 1, "heads": 2, "inner_steps": 1, "train_steps": 3, "train_batch_size": 8}
    result = mechanisms.mechanisms_benchmark(
        backbone, tmp_path, seeds=[1], suites=["refiner"], bench=bench, k=1, refiner=refiner, progress=False
    )
    ref = result["refiner"]
    assert set(ref["summary"]) == {"learner", "oracle", "refiner:overfit", "refiner:group"}
    run = ref["seeds"]["1"]
    for method in ref["summary"]:
        assert set(run[method]["groups"]) == set(world.STYLES)
        assert 0.0 <= run[method]["test"] <= 1.0
    assert ref["choice"] in mechanisms.REFINER_RULES
    assert set(ref["diagnostics"]["group"]) == {"label_decodability", "prediction_agreement", "chance", "group_purity"}
    assert "group_purity" not in ref["diagnostics"]["overfit"]
    text = (tmp_path / "mechanisms.md").read_text()
    assert "| oracle |" in text and "label_decodability" in text
    # a rerun with the same settings reads the saved seed; other settings are refused, not silently reused
    saved = (tmp_path / "runs" / "mechanisms_refiner_seed1.json").read_text()
    again = mechanisms.mechanisms_benchmark(
        backbone, tmp_path, seeds=[1], suites=["refiner"], bench=bench, k=1, refiner=refiner, progress=False
    )
    assert json.dumps(again["refiner"]["summary"]) == json.dumps(ref["summary"])
    assert (tmp_path / "runs" / "mechanisms_refiner_seed1.json").read_text() == saved
    with pytest.raises(ValueError, match="other settings"):
        mechanisms.mechanisms_benchmark(
            backbone, tmp_path, seeds=[1], bench=bench, k=2, refiner=refiner, progress=False
        )


def test_refiner_tpt_mechanism_suite_end_to_end(tmp_path):
    backbone = make_backbone("hf")
    bench = BenchConfig(steps=2, k=1, pool_per_class=3, test_per_class=1, world_version=2, batch_size=8)
    refiner = {"hidden_dim": 16, "layers": 1, "heads": 2, "train_steps": 3, "train_batch_size": 8, "entropy_views": 4}
    result = mechanisms.mechanisms_benchmark(
        backbone, tmp_path, seeds=[1], suites=["refiner-tpt"], bench=bench, refiner=refiner, progress=False
    )
    tpt = result["refiner-tpt"]
    assert set(tpt["summary"]) == {"learner", "oracle", *(f"refiner:{r}" for r in mechanisms.TPT_RULES)}
    run = tpt["seeds"]["1"]
    for method in tpt["summary"]:
        assert set(run[method]) == {"val", "sketch", "painting", "pixel", "avg"}
        assert run[method]["avg"] == pytest.approx(
            (run[method]["sketch"] + run[method]["painting"] + run[method]["pixel"]) / 3
        )
    # the validation images are unused pool photos: 1 per class here (pool of 3, k = 1, val_per_class = 8)
    headroom = tpt["summary"]["oracle"]["avg"]["mean"] - tpt["summary"]["learner"]["avg"]["mean"]
    for rule, share in tpt["recovery"].items():
        if headroom > 0:
            gain = tpt["summary"][f"refiner:{rule}"]["avg"]["mean"] - tpt["summary"]["learner"]["avg"]["mean"]
            assert share == pytest.approx(gain / headroom)
        else:
            assert share is None
    diagnostics = tpt["diagnostics"]["entropy"]
    assert set(diagnostics) == {"label_decodability", "chance", "cosine_to_rule_offset", "norm_ratio_to_rule_offset"}
    assert -1.0 <= diagnostics["cosine_to_rule_offset"]["mean"] <= 1.0
    assert tpt["choice"] in mechanisms.TPT_RULES
    assert "### Refiner, label-free targets" in (tmp_path / "mechanisms.md").read_text()


def test_twins_change_exactly_one_factor():
    tasks = WorldTasks(32, (0.5,) * 3, (0.5,) * 3, pool_per_class=3, version=2)
    pool = tasks.dg_pool()
    indices = [0, 4, 7, 30]
    for factor in WorldTasks.TWIN_FACTORS:
        twins = tasks.dg_twins(indices, factor, seed=1)
        assert torch.equal(twins.labels, pool.labels[indices])
        # every twin differs from its photo, and the same seed gives the same twins
        assert ((twins.pixel_values - pool.pixel_values[indices]).abs().flatten(1).amax(1) > 0.1).all(), factor
        assert torch.equal(tasks.dg_twins(indices, factor, seed=1).pixel_values, twins.pixel_values)
    with pytest.raises(ValueError, match="Did you mean 'colour'"):
        tasks.dg_twins(indices, "color")


def test_icm_mechanism_suite_end_to_end(tmp_path):
    backbone = make_backbone("hf")
    bench = BenchConfig(k=2, test_per_class=2, world_version=2)
    invariance = {"interventions": ["grayscale", "invert"], "lam_grid": [0.0, 1.0], "dim_fractions": [0.5, 1.0]}
    result = mechanisms.mechanisms_benchmark(
        backbone, tmp_path, seeds=[1, 2], suites=["invariance"], bench=bench, invariance=invariance, progress=False
    )
    icm = result["invariance"]
    assert set(icm["summary"]) == {"zero_shot", "icm", *mechanisms.ICM_ORACLES}
    assert set(icm["summary"]["icm"]) == {"sketch", "painting", "pixel", "avg"}
    assert set(icm["preservation"]) == {"grayscale", "invert"}
    for oracle, share in icm["recovery"].items():
        headroom = icm["summary"][oracle]["avg"]["mean"] - icm["summary"]["zero_shot"]["avg"]["mean"]
        if headroom > 0:
            gain = icm["summary"]["icm"]["avg"]["mean"] - icm["summary"]["zero_shot"]["avg"]["mean"]
            assert share == pytest.approx(gain / headroom)
        else:
            assert share is None
    overlap = icm["class_subspace_share"]
    assert set(overlap["factors"]) == set(WorldTasks.TWIN_FACTORS)
    assert all(0.0 <= v["mean"] <= 1.0 for v in overlap["factors"].values()) and 0 < overlap["random"] < 1
    assert "### Invariance (ICM)" in (tmp_path / "mechanisms.md").read_text()


def test_spurious_twins_flip_one_factor_image_by_image():
    tasks = WorldTasks(32, (0.5,) * 3, (0.5,) * 3, version=2)
    train = tasks.spurious_train(20, seed=1)
    n_bg = 2
    background, label = train.groups % n_bg, train.groups // n_bg
    flipped = tasks.spurious_twins(20, seed=1, factor="background")
    assert torch.equal(flipped.labels, train.labels) and torch.equal(flipped.groups % n_bg, 1 - background)
    swapped = tasks.spurious_twins(20, seed=1, factor="class")
    assert torch.equal(swapped.labels, (label + 1) % len(train.classnames))
    assert torch.equal(swapped.groups % n_bg, background)
    # every twin differs from its image
    assert not torch.equal(flipped.pixel_values, train.pixel_values)
    with pytest.raises(ValueError, match="Did you mean 'class'"):
        tasks.spurious_twins(20, seed=1, factor="classes")


def test_counterfactual_mechanism_suite_end_to_end(tmp_path, monkeypatch):
    from prompt_robust import attributes as pseudo

    backbone = make_backbone("hf")
    # the random test backbone names no background: read the sign of a fixed direction instead
    v = torch.nn.functional.normalize(
        torch.randn(backbone.embed_dim, generator=torch.Generator().manual_seed(5)), dim=0
    )
    monkeypatch.setattr(pseudo, "attribute_text_features", lambda *args, **kwargs: torch.stack([v, -v]))
    bench = BenchConfig(steps=2, k=1, test_per_class=2, spurious_per_class=20, world_version=2, batch_size=8)
    counterfactual = {"hidden_dim": 16, "depth": 1, "train_steps": 3, "train_batch_size": 8}
    result = mechanisms.mechanisms_benchmark(
        backbone,
        tmp_path,
        seeds=[1],
        suites=["counterfactual"],
        bench=bench,
        counterfactual=counterfactual,
        progress=False,
    )
    cf = result["counterfactual"]
    assert set(cf["summary"]) == {"learner", "oracle", "counterfactual:class", "counterfactual:attribute"}
    assert set(cf["summary"]["oracle"]) == {"val/avg", "val/worst_group", "test/avg", "test/worst_group"}
    assert cf["choice"] in mechanisms.COUNTERFACTUAL_TWINS
    diagnostics = cf["diagnostics"]["attribute"]
    assert set(diagnostics) == {
        "attribute_read_correctly",
        "twin_attribute_flipped",
        "twin_class_kept",
        "cosine_to_true_twin",
        "factual_cosine_to_true_twin",
    }
    assert all(0.0 <= v["mean"] <= 1.0 for k, v in diagnostics.items() if "cosine" not in k)
    assert "### Counterfactual" in (tmp_path / "mechanisms.md").read_text()


def test_benchmark_names_the_nuisance_attribute_for_debias_and_attribute_counterfactuals():
    words = ["grass", "water"]
    config = BenchConfig()
    assert config.addon_settings("debias", words)["attribute_values"] == words
    assert config.addon_settings("counterfactual", words)["attribute_values"] == words  # twin "auto"
    assert "attribute_values" not in BenchConfig(counterfactual={"twin": "class"}).addon_settings(
        "counterfactual", words
    )
    own = BenchConfig(counterfactual={"attribute_values": ["sand", "snow"]})
    assert own.addon_settings("counterfactual", words)["attribute_values"] == ["sand", "snow"]  # settings win
    assert "attribute_values" not in config.addon_settings("refiner", words)
    # base-to-new names each dataset's backgrounds; the scenes dataset's label is the background: no nuisance
    tasks = WorldTasks(32, (0.5,) * 3, (0.5,) * 3, version=2)
    assert tasks.nuisance_values("polygons") == ("sand", "snow", "brick") and tasks.nuisance_values("scenes") == ()
    assert "attribute_values" not in config.addon_settings("counterfactual", tasks.nuisance_values("scenes"))


def test_benchmark_prepares_the_add_ons_of_zero_shot_clip(tmp_path):
    """Zero-shot CLIP has no prompt to train, but its add-ons (ICM's projection) must still be fitted."""
    from prompt_robust.bench.runner import _Runner

    bench = BenchConfig(k=1, pool_per_class=2, test_per_class=1, world_version=2)
    bench.invariance = {"lam": 1.0, "dim": 8}
    runner = _Runner(make_backbone("hf"), bench, tmp_path)
    train, _ = runner.tasks.dg_train(1, seed=1)
    model = runner._model("zeroshot", ["invariance"], runner.tasks.dg_classes(), seed=1)
    assert not model.addons["invariance"].fitted
    runner._train(model, train, seed=1)
    assert model.addons["invariance"].fitted
