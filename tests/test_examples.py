"""Every example runs as is (in a reduced setting): on the embedded default, on real-data layouts written by the
test (CoOp/Dassl split file, Waterbirds, DomainBed) with a tiny transformers CLIP given as ``--backbone hf:<dir>``.
Checked: the printed metrics are the saved ones and lie in [0, 1], the saved adapters load and reproduce them, a
fixed seed reproduces a run, and an existing adapter is never replaced without ``--overwrite``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_backbone
from PIL import Image
from safetensors.torch import load_file

import prompt_robust as pr
from prompt_robust.bench import world
from prompt_robust.bench.tasks import BASE_CLASSES, NEW_CLASSES, WorldTasks
from prompt_robust.integrations.trainer import TRAINING_STATE_FILE
from prompt_robust.training import evaluate

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: run settings small enough for seconds per example
TINY_REFINER = ["--train-steps", "3", "--inner-steps", "1", "--hidden-dim", "16", "--layers", "1", "--heads", "2"]
EMBEDDED_B2N = ["--k", "1", "--steps", "3", "--pool-per-class", "2", "--test-per-class", "2", "--quiet"]


def _load(name: str):
    if str(EXAMPLES) not in sys.path:  # the examples import their shared helpers (examples/_data.py)
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(printed: str, names) -> dict[str, list[float]]:
    """The numbers printed on the row of each name of a results table."""
    rows = {}
    for line in printed.splitlines():
        for name in names:
            rest = line[len(name) :].split()
            if line.startswith(name + " ") and rest and all(_is_number(x) for x in rest):
                rows[name] = [float(x) for x in rest]
    missing = set(names) - set(rows)
    assert not missing, f"no printed row for {missing} in:\n{printed}"
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_unit(values) -> None:
    for value in values:
        assert 0.0 <= value <= 1.0, values


def _refuses_to_overwrite(example, argv: list[str], adapter: Path) -> None:
    before = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        example.main(argv)
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == before


def _write_image(path: Path, colour: tuple[int, int, int], size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, 255 - i * 53 % 256, 60 + i * 17 % 180)


# ----------------------------------------------------------------------------------------------------------------
# Tiny real-data layouts and a tiny transformers CLIP on disk
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    backbone = make_backbone("hf")
    directory = tmp_path_factory.mktemp("tiny_clip")
    backbone.clip.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


COOP_CLASSES = ["cat", "dog", "bird", "fish", "tree"]  # 3 base (rounded up), 2 new


@pytest.fixture(scope="module")
def coop_split(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("coop")
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    n = 0
    for subset, per_class in (("train", 3), ("val", 1), ("test", 2)):
        for label, name in enumerate(COOP_CLASSES):
            for j in range(per_class):
                rel = f"{name}/{subset}_{j}.png"
                _write_image(root / "images" / rel, _colour(n))
                split[subset].append([rel, label, name])
                n += 1
    (root / "split_zhou_Tiny.json").write_text(json.dumps(split))
    return root / "split_zhou_Tiny.json", root / "images"


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory) -> Path:
    """Waterbirds' layout: metadata.csv (y, split, place) and the images; every group in train and test."""
    root = tmp_path_factory.mktemp("waterbirds")
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    i = 0
    for split, per_group in ((0, 3), (2, 2)):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_group if place == y or split == 2 else 1):
                    filename = f"{i:03d}.Bird_{y}/Bird_{i:04d}.jpg"
                    _write_image(root / filename, (40 + 150 * place, 120, 40 + 150 * y))
                    rows.append(f"{i + 1},{filename},{y},{split},{place},/x/{place}.jpg")
                    i += 1
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


DOMAINS = ["art_painting", "photo", "sketch"]
DOMAIN_CLASSES = ["dog", "elephant", "guitar"]


@pytest.fixture(scope="module")
def domainbed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("PACS")
    n = 0
    for domain in DOMAINS:
        for classname in DOMAIN_CLASSES:
            for j in range(3):
                _write_image(root / domain / classname / f"pic_{j}.png", _colour(n))
                n += 1
    return root


# ----------------------------------------------------------------------------------------------------------------
# train_coop
# ----------------------------------------------------------------------------------------------------------------
def test_train_coop_example(tmp_path, capsys):
    example = _load("train_coop")
    out = tmp_path / "run"
    argv = ["--k", "1", "--steps", "4", "--pool-per-class", "2", "--test-per-class", "2", "--quiet", "--out", str(out)]
    results = example.main(argv)
    printed = capsys.readouterr().out
    assert f"{results['before']:.3f} before training, {results['after']:.3f} after" in printed
    _check_unit(results.values())
    assert json.loads((out / "results.json").read_text()) == results
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) >= 1  # resumable checkpoints
    # the adapter loads onto the embedded mini-CLIP and gives the printed test accuracy
    backbone = pr.load_backbone("embedded")
    loaded = pr.RobustPromptModel.from_pretrained(out / "adapter", backbone=backbone)
    assert loaded.learner.classnames == list(world.CLASSES)
    test = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=2).dg_source_test()
    assert evaluate(loaded, test)["accuracy"] == results["after"]
    _refuses_to_overwrite(example, argv, out / "adapter")
    # --overwrite: the same run (resumed from its last checkpoint) gives the same result
    assert example.main([*argv, "--overwrite"]) == results


def test_train_coop_on_a_coop_split_with_an_hf_checkpoint(tmp_path, capsys, hf_dir, coop_split):
    split_file, image_dir = coop_split
    out = tmp_path / "run"
    argv = ["--backbone", f"hf:{hf_dir}", "--split-file", str(split_file), "--image-dir", str(image_dir)]
    results = _load("train_coop").main([*argv, "--k", "2", "--steps", "3", "--quiet", "--out", str(out)])
    _check_unit(results.values())
    loaded = pr.RobustPromptModel.from_pretrained(out / "adapter", backbone=pr.load_backbone(f"hf:{hf_dir}"))
    assert loaded.learner.classnames == COOP_CLASSES
    assert len(json.loads((out / "split.json").read_text())["indices"]) == 2 * len(COOP_CLASSES)


# ----------------------------------------------------------------------------------------------------------------
# coop_refiner_b2n
# ----------------------------------------------------------------------------------------------------------------
def test_coop_refiner_b2n_example(tmp_path, capsys):
    example = _load("coop_refiner_b2n")
    argv = [*EMBEDDED_B2N, *TINY_REFINER]
    results = example.main([*argv, "--out", str(tmp_path / "a")])
    printed = _rows(capsys.readouterr().out, ["coop", "coop+refiner"])
    for method, values in results.items():
        _check_unit(values.values())
        assert values["hm"] == pytest.approx(2 * values["base"] * values["new"] / (values["base"] + values["new"]))
        assert printed[method] == pytest.approx([values[k] for k in ("base", "new", "hm")], abs=6e-4)
    # the adapter holds the prompt and the trained refiner; it reproduces the refined base accuracy
    backbone = pr.load_backbone("embedded")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "a" / "adapter", backbone=backbone)
    assert loaded.learner.classnames == list(BASE_CLASSES)
    assert loaded.addons["refiner"].fitted and int(loaded.addons["refiner"].trained_steps) == 3
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=2)
    base_test, new_test = tasks.base_to_new_test()
    assert evaluate(loaded, base_test)["accuracy"] == results["coop+refiner"]["base"]
    loaded.learner.set_classnames(list(NEW_CLASSES))
    assert evaluate(loaded, new_test)["accuracy"] == results["coop+refiner"]["new"]
    # a fixed seed reproduces the run
    assert example.main([*argv, "--out", str(tmp_path / "b")]) == results


def test_coop_refiner_b2n_on_a_coop_split_with_an_hf_checkpoint(tmp_path, hf_dir, coop_split):
    split_file, image_dir = coop_split
    out = tmp_path / "run"
    argv = ["--backbone", f"hf:{hf_dir}", "--split-file", str(split_file), "--image-dir", str(image_dir)]
    results = _load("coop_refiner_b2n").main([*argv, "--k", "2", "--steps", "2", *TINY_REFINER, "--out", str(out)])
    for values in results.values():
        _check_unit(values.values())
    loaded = pr.RobustPromptModel.from_pretrained(out / "adapter", backbone=pr.load_backbone(f"hf:{hf_dir}"))
    assert loaded.learner.classnames == COOP_CLASSES[:3]  # base: the first half, rounded up
    assert len(json.loads((out / "split.json").read_text())["indices"]) == 2 * 3


# ----------------------------------------------------------------------------------------------------------------
# maple_counterfactual
# ----------------------------------------------------------------------------------------------------------------
def test_maple_counterfactual_example(tmp_path, capsys):
    example = _load("maple_counterfactual")
    out = tmp_path / "run"
    argv = [*EMBEDDED_B2N, "--maple-depth", "2", "--train-steps", "3", "--hidden-dim", "16", "--depth", "1"]
    results = example.main([*argv, "--out", str(out)])
    printed = _rows(capsys.readouterr().out, ["maple", "maple+counterfactual"])
    assert sorted(results) == ["maple", "maple+counterfactual"]
    for method, values in results.items():
        _check_unit(values.values())
        assert printed[method] == pytest.approx([values[k] for k in ("base", "new", "hm")], abs=6e-4)
    backbone = pr.load_backbone("embedded")
    bare = pr.RobustPromptModel.from_pretrained(out / "maple", backbone=backbone)
    regularized = pr.RobustPromptModel.from_pretrained(out / "maple_counterfactual", backbone=backbone)
    assert not bare.addons and "counterfactual" in regularized.addons
    assert regularized.config.counterfactual.train_steps == 3
    saved = json.loads((out / "maple_counterfactual" / "adapter_config.json").read_text())
    assert saved["learner"]["type"] == "maple" and saved["learner"]["config"]["depth"] == 2
    test = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=2)
    assert evaluate(regularized, test.base_to_new_test()[0])["accuracy"] == results["maple+counterfactual"]["base"]
    _refuses_to_overwrite(example, [*argv, "--out", str(out)], out / "maple")


# ----------------------------------------------------------------------------------------------------------------
# debias_waterbirds
# ----------------------------------------------------------------------------------------------------------------
SMALL_DEBIAS = ["--steps", "3", "--jtt-steps", "2", "--batch-size", "8", "--quiet"]


def _check_debias_record(record: dict, printed: str) -> None:
    rows = _rows(printed, ["initial prompt", "after training"])
    for name, values in record["results"].items():
        _check_unit(values.values())
        assert values["gap"] == pytest.approx(values["avg"] - values["worst_group"])
        assert values["worst_group"] == min(v for k, v in values.items() if k not in ("avg", "worst_group", "gap"))
        assert rows[name] == pytest.approx([values[k] for k in ("avg", "worst_group", "gap")], abs=6e-4)


def test_debias_example_on_the_embedded_task(tmp_path, capsys):
    example = _load("debias_waterbirds")
    argv = [*SMALL_DEBIAS, "--train-per-class", "8", "--test-per-class", "2"]
    record = example.main([*argv, "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    _check_debias_record(record, printed)
    assert record["mode"] == "pseudo"
    # the mini-CLIP names the embedded task's backgrounds from the words "grass" / "water" alone
    assert record["pseudo_label_accuracy"] >= 0.9
    assert (
        f"pseudo-label accuracy against the true attribute (grass, water): {record['pseudo_label_accuracy']:.3f}"
        in (printed)
    )
    saved = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert saved["robust_config"]["debias"]["attribute_values"] == ["grass", "water"]
    assert example.main([*argv, "--out", str(tmp_path / "b")])["results"] == record["results"]


@pytest.mark.parametrize("mode", ["pseudo", "oracle", "groupdro", "jtt", "erm"])
def test_debias_example_on_a_waterbirds_layout(tmp_path, capsys, hf_dir, waterbirds, mode):
    argv = ["--backbone", f"hf:{hf_dir}", "--root", str(waterbirds), "--mode", mode, *SMALL_DEBIAS]
    argv += ["--attribute-values", "land", "water"]  # words the tiny test tokenizer keeps short
    record = _load("debias_waterbirds").main([*argv, "--out", str(tmp_path / "run")])
    _check_debias_record(record, capsys.readouterr().out)
    groups = set(record["results"]["after training"]) - {"avg", "worst_group", "gap"}
    assert groups == {f"{bird} on {place}" for bird in ("landbird", "waterbird") for place in ("land", "water")}
    if mode == "pseudo":  # measured against the loader's true places (metadata.csv)
        _check_unit([record["pseudo_label_accuracy"]])
        assert record["prepare_logs"]["debias/pseudo_label_accuracy"] == record["pseudo_label_accuracy"]
    else:
        assert record["pseudo_label_accuracy"] is None
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (saved["robust_config"]["debias"] or {}).get("mode") == (None if mode == "erm" else mode)


# ----------------------------------------------------------------------------------------------------------------
# icm_domainbed
# ----------------------------------------------------------------------------------------------------------------
PREDICTORS = ["zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe"]


def _check_icm_record(record: dict, printed: str, domains: list[str]) -> None:
    rows = _rows(printed, PREDICTORS)
    for predictor in PREDICTORS:
        values = record["results"][predictor]
        assert list(values) == [*domains, "avg"]
        _check_unit(values.values())
        assert values["avg"] == pytest.approx(sum(values[d] for d in domains) / len(domains))
        assert rows[predictor] == pytest.approx([values[k] for k in [*domains, "avg"]], abs=6e-4)


def test_icm_example_on_the_embedded_task(tmp_path, capsys):
    example = _load("icm_domainbed")
    argv = ["--k", "2", "--pool-per-class", "2", "--test-per-class", "2", "--quiet"]
    record = example.main([*argv, "--out", str(tmp_path / "a")])
    _check_icm_record(record, capsys.readouterr().out, ["sketch", "painting", "pixel"])
    # the saved adapter (zero-shot CLIP + the projection) is the ICM zero-shot predictor; without it, zero-shot
    backbone = pr.load_backbone("embedded")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "a" / "adapter", backbone=backbone)
    assert loaded.addons["invariance"].fitted and int(loaded.addons["invariance"].kept_dim) == record["dim"]
    tests = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=2).dg_test()
    for style, data in tests.items():
        assert evaluate(loaded, data)["accuracy"] == pytest.approx(record["results"]["icm_zero_shot"][style])
    plain = pr.wrap(pr.build_learner("zeroshot", backbone, list(world.CLASSES)))
    assert evaluate(plain, tests["pixel"])["accuracy"] == pytest.approx(record["results"]["zero_shot"]["pixel"])
    assert example.main([*argv, "--out", str(tmp_path / "b")])["results"] == record["results"]


def test_icm_example_on_a_domainbed_layout(tmp_path, capsys, hf_dir, domainbed):
    argv = ["--backbone", f"hf:{hf_dir}", "--root", str(domainbed), "--test-domain", "sketch", "art_painting"]
    record = _load("icm_domainbed").main([*argv, "--k", "0", "--quiet", "--out", str(tmp_path / "run")])
    _check_icm_record(record, capsys.readouterr().out, ["sketch", "art_painting"])
    loaded = pr.RobustPromptModel.from_pretrained(
        tmp_path / "run" / "adapter", backbone=pr.load_backbone(f"hf:{hf_dir}")
    )
    assert loaded.learner.classnames == DOMAIN_CLASSES


# ----------------------------------------------------------------------------------------------------------------
# trainer_recipe
# ----------------------------------------------------------------------------------------------------------------
SMALL_TRAINER = ["--max-steps", "4", "--addon-start-step", "1", "--save-steps", "2", "--batch-size", "8", "--quiet"]


def _check_trainer_record(record: dict, printed: str) -> None:
    rows = _rows(printed, ["after training"])
    metrics = record["results"]["after training"]
    values = [metrics[f"eval_{key}"] for key in ("accuracy", "worst_group_accuracy", "gap")]
    _check_unit(values)
    assert rows["after training"] == pytest.approx(values, abs=6e-4)


def test_trainer_recipe_example(tmp_path, capsys):
    example = _load("trainer_recipe")
    out = tmp_path / "run"
    argv = [*SMALL_TRAINER, *TINY_REFINER, "--train-per-class", "4", "--test-per-class", "2", "--out", str(out)]
    record = example.main(argv)
    _check_trainer_record(record, capsys.readouterr().out)
    assert record["global_step"] == 4 and "before training" in record["results"]
    assert "refiner/final_loss" in record["addon_logs"]  # the callback's fit_addons ran
    assert {"debias/pseudo_fraction/grass", "debias/pseudo_fraction/water"} <= set(record["addon_logs"])
    assert (out / "checkpoint-2" / TRAINING_STATE_FILE).is_file()  # the debias group statistics, for a resume
    assert any(key.startswith("eval_group/tree on water") for key in record["results"]["after training"])
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "robust_adapter" / "adapter_config.json").is_file()
    backbone = pr.load_backbone("embedded")
    loaded = pr.RobustPromptModel.from_pretrained(out / "robust_adapter", backbone=backbone)
    assert int(loaded.addons["refiner"].trained_steps) == 3  # fit_addons ran after the warm-up
    test = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=2).spurious_test()
    metrics = evaluate(loaded, test, groups_key="groups")
    assert metrics["accuracy"] == pytest.approx(record["results"]["after training"]["eval_accuracy"])
    assert metrics["worst_group"] == pytest.approx(record["results"]["after training"]["eval_worst_group_accuracy"])
    with pytest.raises(SystemExit):  # a folder holding a run is not silently reused
        example.main(argv)


def test_trainer_recipe_on_a_waterbirds_layout_resumes(tmp_path, capsys, hf_dir, waterbirds):
    example = _load("trainer_recipe")
    out = tmp_path / "run"
    argv = ["--backbone", f"hf:{hf_dir}", "--root", str(waterbirds), *SMALL_TRAINER, *TINY_REFINER, "--out", str(out)]
    argv += ["--attribute-values", "land", "water"]  # short: the tiny test tokenizer's context is 32 characters
    record = example.main(argv)
    _check_trainer_record(record, capsys.readouterr().out)
    straight = load_file(out / "robust_adapter" / "adapter_model.safetensors")
    # interrupted after the checkpoint at step 2: resuming ends with the same adapter and metrics
    for path in [out / "checkpoint-4", out / "robust_adapter"]:
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir()
    resumed = example.main([*argv, "--resume"])
    again = load_file(out / "robust_adapter" / "adapter_model.safetensors")
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in straight)
    assert resumed["results"]["after training"]["eval_accuracy"] == record["results"]["after training"]["eval_accuracy"]
    assert resumed["global_step"] == 4
    assert "debias/pseudo_fraction/land" in resumed["addon_logs"]  # debias ran, and resumed exactly


# ----------------------------------------------------------------------------------------------------------------
# peft_lora_recipe
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_hf_dir", [False, True], ids=["embedded", "hf-dir"])
def test_peft_lora_recipe_example(tmp_path, capsys, hf_dir, use_hf_dir):
    example = _load("peft_lora_recipe")
    out = tmp_path / "run"
    argv = [*EMBEDDED_B2N, "--lr", "0.01", "--out", str(out)]
    if use_hf_dir:
        argv += ["--backbone", f"hf:{hf_dir}"]
    record = example.main(argv)
    printed = capsys.readouterr().out
    results = record["results"]
    _check_unit(results.values())
    for name, accuracy in results.items():
        assert f"test accuracy {name:16s} {accuracy:.3f}" in printed
    # reloading (PEFT for the LoRA, prompt_robust for the prompt) gives the trained model back
    assert record["reload_max_abs_logit_diff"] < 1e-5 and results["reloaded"] == results["after training"]
    assert record["prompts_without_lora_refused"]
    lora = load_file(out / "lora" / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in lora.items())  # the LoRA trained
    prompts = load_file(out / "prompts" / "adapter_model.safetensors")
    assert prompts and not any("lora" in name for name in prompts)  # backbone tensors stay out of the prompt adapter
    assert record["trainable"]["lora"] > 0 and record["trainable"]["prompt"] > 0
    _refuses_to_overwrite(example, argv, out / "prompts")


# ----------------------------------------------------------------------------------------------------------------
# the shared checks (examples/_data.py) refuse options that do not go together, before anything is loaded
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        *[
            (name, ["--split-file", "split_zhou_X.json"], "--split-file and --image-dir go together.")
            for name in ("train_coop", "coop_refiner_b2n", "maple_counterfactual", "peft_lora_recipe")
        ],
        ("train_coop", ["--image-dir", "images"], "--split-file and --image-dir go together."),
        ("icm_domainbed", ["--root", "PACS"], "--root needs --test-domain"),
    ],
)
def test_examples_refuse_options_that_do_not_go_together(tmp_path, capsys, name, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main([*argv, "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# every example documents its command
# ----------------------------------------------------------------------------------------------------------------
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", NAMES)
def test_example_help_shows_its_command_and_the_readme_lists_it(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    command = f"python examples/{name}.py --out runs/"
    assert command in capsys.readouterr().out
    assert command in (EXAMPLES / "README.md").read_text()
