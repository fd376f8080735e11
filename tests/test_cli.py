"""The command line end to end, on reduced settings and a tiny backbone saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone

from prompt_robust import cli
from prompt_robust.addons.counterfactual.config import CounterfactualConfig
from prompt_robust.bench.runner import TASKS


@pytest.fixture
def backbone_dir(tmp_path):
    backbone = make_backbone("hf")
    directory = tmp_path / "tiny_clip"
    backbone.clip.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


REDUCED = ["--steps", "2", "--k", "1", "--pool-per-class", "2", "--test-per-class", "2"]
REDUCED += ["--spurious-per-class", "4", "--retrieval-size", "12"]
REDUCED += ["--train-steps", "3", "--inner-steps", "1", "--hidden-dim", "16", "--layers", "1", "--heads", "2"]
# the random test backbone reads no background, so the benchmark's attribute twins (tested on constructed
# features in test_counterfactual.py) are replaced by the paper's class twins here
REDUCED += ["--invariance-config", '{"lam": 1.0, "dim": 8}']
REDUCED += ["--counterfactual-config", '{"train_steps": 3, "twin": "class"}']


def test_bench_writes_every_output_and_resumes(backbone_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["-q", "bench", "--suite", "quick", "--seeds", "2", "--out", str(out), "--backbone", str(backbone_dir)]
    assert cli.main(argv + REDUCED) == 0
    printed = capsys.readouterr().out
    assert "base_to_new" in printed and "sanity checks" in printed
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == sorted([*TASKS, "base_to_new_datasets"])  # world 2: five datasets, averaged
    datasets = ["objects", "polygons", "textures", "gadgets", "scenes"]
    assert set(results["base_to_new_datasets"]["coop"]) == {f"{d}/{m}" for d in datasets for m in ("base", "new", "hm")}
    run = json.loads((out / "results_seeds.json").read_text())["per_seed"]["coop"]["1"]
    b2n, per = run["base_to_new"], run["base_to_new_datasets"]
    assert b2n["base"] == pytest.approx(sum(per[f"{d}/base"] for d in datasets) / 5)
    assert b2n["hm"] == pytest.approx(2 * b2n["base"] * b2n["new"] / (b2n["base"] + b2n["new"]))
    quick = ["coop", "coop+counterfactual", "coop+debias", "coop+invariance", "coop+refiner", "zeroshot"]
    assert sorted(results["base_to_new"]) == quick
    assert set(results["base_to_new"]["coop"]) == {"base", "new", "hm"}
    assert set(results["domain_generalization"]["coop"]) >= {"sketch", "painting", "pixel", "avg"}
    assert set(results["spurious"]["zeroshot"]) == {"avg", "worst_group", "gap"}
    assert set(results["retrieval"]["zeroshot"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(results["cross_dataset"]["coop"]) == {"acc", *datasets[1:]}
    seeds = json.loads((out / "results_seeds.json").read_text())
    assert sorted(seeds["per_seed"]["coop"]) == ["1", "2"]
    report = (out / "report.md").read_text()
    assert "± " in report and "## spurious" in report and "### base_to_new per dataset" in report
    assert (out / "base_to_new.png").stat().st_size > 0 and (out / "spurious_groups.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "splits").iterdir())[0].startswith("base_to_new_gadgets_k1_seed1")
    # zero-shot is not trained: every seed gives the same numbers
    assert seeds["per_seed"]["zeroshot"]["1"] == seeds["per_seed"]["zeroshot"]["2"]
    # a rerun reuses the saved runs (same config) and gives the same results
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert cli.main(argv + REDUCED) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert json.loads((out / "results.json").read_text()) == results
    # runs key on every add-on field, defaults included: a run saved before a default changed is not reused
    saved = json.loads((out / "runs" / "coop+counterfactual_seed1.json").read_text())
    assert saved["addon_configs"]["counterfactual"] == CounterfactualConfig(train_steps=3, twin="class").to_dict()
    assert "addon_configs" not in json.loads((out / "runs" / "coop_seed1.json").read_text())
    saved["addon_configs"]["counterfactual"]["proximity_search"] = 0  # as if written under an older default
    (out / "runs" / "coop+counterfactual_seed1.json").write_text(json.dumps(saved))
    assert cli.main(argv + REDUCED) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert {name for name in after if after[name] != before[name]} == {"coop+counterfactual_seed1.json"}


def test_pretrain_backbone_then_use_it(tmp_path, capsys):
    out = tmp_path / "mini"
    argv = ["-q", "pretrain-backbone", "--out", str(out), "--steps", "2", "--batch-size", "16", "--width", "16"]
    argv += ["--embed-dim", "16", "--layers", "1", "--heads", "2", "--patch-size", "8", "--group-size", "4"]
    argv += ["--warmup-steps", "1", "--checkpoint-every", "1"]
    assert cli.main(argv) == 0
    record = json.loads((out / "pretrain_record.json").read_text())
    from prompt_robust.bench.world_v2 import DATASETS

    groups = {f"{d}/{half}" for d in DATASETS for half in ("base", "new")}
    assert record["config"]["steps"] == 2 and set(record["zero_shot"]) == groups
    assert "zero-shot accuracy" in capsys.readouterr().out
    from prompt_robust.backbones import load_backbone

    backbone = load_backbone(str(out))
    assert backbone.image_size == 48 and backbone.embed_dim == 16
    capsys.readouterr()
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    # resuming checkpoints of a run with other settings would mix two runs
    assert cli.main([*argv, "--overwrite", "--lr", "0.01"]) == 2
    assert "other settings" in capsys.readouterr().err


def _waterbirds(root, n=8):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = ["img_id,img_filename,y,split,place"]
    for i in range(n):
        y, place, split = i % 2, (i // 2) % 2, 0 if i < n // 2 else 2
        colour = (200, 40, 40) if y else (40, 40, 200)
        Image.new("RGB", (40, 30), colour).save(root / "images" / f"{i}.png")
        rows.append(f"{i},images/{i}.png,{y},{split},{place}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def test_train_and_eval_on_a_user_dataset(backbone_dir, tmp_path, capsys):
    _waterbirds(tmp_path / "wb")
    common = ["--dataset", "waterbirds", "--root", str(tmp_path / "wb"), "--backbone", str(backbone_dir)]
    run = tmp_path / "run"
    assert (
        cli.main(["-q", "train", *common, "--learner", "coop", "--out", str(run), "--steps", "3", "--batch-size", "2"])
        == 0
    )
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["eval", *common, "--adapter", str(run / "adapter")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test"]["n"] == 4 and {"accuracy", "worst_group", "gap"} <= set(report["test"])
    torch.testing.assert_close(
        torch.tensor(report["test"]["gap"]), torch.tensor(report["test"]["accuracy"] - report["test"]["worst_group"])
    )


def test_train_with_the_refiner_saves_a_trained_refiner(backbone_dir, tmp_path, capsys):
    _waterbirds(tmp_path / "wb")
    common = ["--dataset", "waterbirds", "--root", str(tmp_path / "wb"), "--backbone", str(backbone_dir)]
    run = tmp_path / "run"
    argv = ["-q", "train", *common, "--learner", "vpt", "--out", str(run), "--steps", "2", "--batch-size", "2"]
    argv += ["--addons", "refiner", "--train-steps", "4", "--inner-steps", "1", "--hidden-dim", "16", "--heads", "2"]
    assert cli.main(argv) == 0
    assert "refiner/final_loss" in capsys.readouterr().out
    assert list((run / "cache").glob("refiner-targets-*/shard-*.safetensors"))
    from prompt_robust.backbones import load_backbone
    from prompt_robust.model import RobustPromptModel

    model = RobustPromptModel.from_pretrained(run / "adapter", backbone=load_backbone(str(backbone_dir)))
    assert model.addons["refiner"].fitted and int(model.addons["refiner"].trained_steps) == 4
    assert model.config.refiner.hidden_dim == 16
    assert cli.main(argv) == 2 and "already holds an adapter" in capsys.readouterr().err
    assert cli.main(["eval", *common, "--adapter", str(run / "adapter")]) == 0


def test_train_with_debias_on_a_waterbirds_layout(backbone_dir, tmp_path, capsys):
    _waterbirds(tmp_path / "wb")
    common = ["--dataset", "waterbirds", "--root", str(tmp_path / "wb"), "--backbone", str(backbone_dir)]
    run = tmp_path / "run"
    config = '{"attribute_values": ["land", "water"]}'
    argv = ["-q", "train", *common, "--learner", "coop", "--out", str(run), "--steps", "2", "--batch-size", "2"]
    assert cli.main([*argv, "--addons", "debias", "--debias-config", config]) == 0
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["robust_config"]["debias"]["attribute_values"] == ["land", "water"]
    # the oracle mode reads the loader's true groups (Waterbirds y x place)
    oracle = ["-q", "train", *common, "--learner", "coop", "--out", str(tmp_path / "oracle"), "--steps", "2"]
    assert cli.main([*oracle, "--batch-size", "2", "--addons", "debias", "--debias-config", '{"mode": "oracle"}']) == 0
    assert cli.main([*argv, "--overwrite", "--addons", "debias", "--debias-config", "{broken"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_bad_cli_input_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "everything"])
    assert cli.main(["bench", "--k", "99", "--out", str(tmp_path / "x")]) == 2
    assert "k must be in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="k must be in"):
        cli.main(["bench", "--k", "99", "--out", str(tmp_path / "x"), "--debug"])


def test_icm_suite_compares_the_four_predictors(backbone_dir, tmp_path, capsys):
    out = tmp_path / "icm"
    argv = ["-q", "bench", "--suite", "icm", "--seeds", "2", "--out", str(out), "--backbone", str(backbone_dir)]
    assert cli.main([*argv, "--invariance-config", '{"lam": 1.0, "dim": 8}']) == 0
    result = json.loads((out / "icm.json").read_text())
    assert set(result["mean"]) == {"zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe"}
    assert set(result["mean"]["zero_shot"]) == {"sketch", "painting", "pixel", "avg"}
    assert {run["dim"] for run in result["per_seed"].values()} == {8}
    # zero-shot CLIP does not depend on the seed; the probes see other shots
    assert result["std"]["zero_shot"]["avg"] == 0.0
    assert "icm_linear_probe" in capsys.readouterr().out
    # the grid diagnostic scores every (λ, k) of the rule's grid; the λ = 0, k = d point is plain CLIP exactly
    grid_config = '{"lam_grid": [0.0, 1.0], "dim_fractions": [0.5, 1.0]}'
    argv = ["-q", "bench", "--suite", "icm-grid", "--seeds", "1", "--out", str(out), "--backbone", str(backbone_dir)]
    assert cli.main([*argv, "--invariance-config", grid_config]) == 0
    run = json.loads((out / "icm_grid.json").read_text())["per_seed"]["1"]
    assert [(r["lam"], r["dim"]) for r in run["grid"]] == [(0.0, 16), (0.0, 32), (1.0, 16), (1.0, 32)]
    identity = run["grid"][1]
    assert identity["icm_zero_shot"] == pytest.approx(identity["zero_shot"])
    assert run["zero_shot"] == pytest.approx(result["per_seed"]["1"]["scores"]["zero_shot"]["avg"])
    assert run["best_icm_zero_shot"]["dim"] == 16 and "best ICM" in capsys.readouterr().out
    # text interventions, when configured, enter the projection (only text pairs here: a different M)
    text_config = (
        '{"lam_grid": [0.0, 1.0], "dim_fractions": [0.5, 1.0], "text_interventions": true, "text_weight": 1.0}'
    )
    assert cli.main([*argv, "--invariance-config", text_config]) == 2  # would replace icm_grid.json
    assert cli.main([*argv, "--invariance-config", text_config, "--overwrite"]) == 0
    text_run = json.loads((out / "icm_grid.json").read_text())["per_seed"]["1"]
    assert text_run["grid"][:2] == run["grid"][:2]  # λ = 0: no intervention term, the same projection
    scores = ("icm_zero_shot", "icm_linear_probe")
    assert [text_run["grid"][2][m] for m in scores] != [run["grid"][2][m] for m in scores]


def test_counterfactual_quality_suite(backbone_dir, tmp_path, capsys):
    out = tmp_path / "cfq"
    argv = ["-q", "bench", "--suite", "counterfactual-quality", "--seeds", "1", "--out", str(out)]
    argv += ["--backbone", str(backbone_dir), "--counterfactual-config", '{"train_steps": 5}']
    assert cli.main(argv) == 0
    result = json.loads((out / "quality.json").read_text())
    run = result["per_seed"]["1"]
    assert 0.0 <= run["validity"] <= 1.0 and run["proximity"] >= 0.0 and 0.0 <= run["background_kept"] <= 1.0
    printed = capsys.readouterr().out
    assert "median proximity ratio" in printed and "background kept" in printed
