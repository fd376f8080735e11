"""``prompt-robust reproduce`` end to end on tiny copies of every protocol's datasets and a tiny CLIP saved to disk:
the tables, resuming after an interruption, refusing to mix settings, the presets against the reference configs,
missing datasets, precision and device, and ImageNet in ``train`` / ``eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import make_backbone
from PIL import Image

from prompt_robust import cli
from prompt_robust.data import load_fgvc_aircraft
from prompt_robust.reproduce import (
    PRESETS,
    PROTOCOLS,
    ReproduceConfig,
    is_paper_backbone,
    resolve_preset,
)
from prompt_robust.reproduce.presets import PRESET_FIELDS
from prompt_robust.reproduce.table import build_table

torch.set_num_threads(1)

# short words the tiny tokenizer knows (every prompt must fit its 32 positions)
NAMES = ["cat", "dog", "bird", "fish"]
WNIDS = ["n00000001", "n00000002", "n00000003", "n00000004"]
FAST = ["--set", "steps=2", "--workers", "0", "--eval-batch-size", "4"]
REFINER = '{"train_steps": 2, "inner_steps": 1, "hidden_dim": 16, "layers": 1, "heads": 2, "target_batch_size": 4}'


def colour(label: int, shade: int = 0) -> tuple[int, int, int]:
    return (30 + 60 * label, 200 - 40 * label + shade, 80 + 25 * (label % 2))


def image(path: Path, label: int, shade: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour(label, shade)).save(path)
    return path.name


def write_coop(root: Path, folder: str, split_file: str, image_dir: str, names=NAMES) -> None:
    """A CoOp split file: 3 train and 1 test image per class (labels in the file's order)."""
    images = root / folder / image_dir
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(names):
        for j in range(3):
            image(images / name / f"{j}.png", label, j)
            split["train"].append([f"{name}/{j}.png", label, name])
        image(images / name / "t.png", label, 5)
        split["test"].append([f"{name}/t.png", label, name])
        split["val"].append([f"{name}/t.png", label, name])
    (root / folder / split_file).write_text(json.dumps(split))


def write_imagenet(root: Path) -> None:
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES, strict=True)))
    for label, wnid in enumerate(WNIDS):
        for j in range(3):
            image(root / "imagenet" / "images" / "train" / wnid / f"{j}.JPEG", label, j)
        image(root / "imagenet" / "images" / "val" / wnid / "v.JPEG", label, 4)
        image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "0.jpeg", label, 2)
        image(root / "imagenet-sketch" / "images" / wnid / "s.png", label, 7)
    for wnid in WNIDS[1:3]:  # ImageNet-A and -R: two-class subsets
        image(root / "imagenet-adversarial" / "imagenet-a" / wnid / "a.jpg", WNIDS.index(wnid), 1)
        image(root / "imagenet-rendition" / "imagenet-r" / wnid / "r.jpg", WNIDS.index(wnid), 3)


def write_fgvc(root: Path) -> None:
    folder = root / "fgvc_aircraft"
    names = ["boat", "plane", "small car", "tree"]  # variant names may hold spaces
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(names) + "\n")
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for label, name in enumerate(names):
            for j in range(count):
                image(folder / "images" / f"{split}{label}{j}.jpg", label, j)
                lines.append(f"{split}{label}{j} {name}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def write_waterbirds(root: Path) -> None:
    folder = root / "waterbird_complete95_forest2water2"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    n = 0
    for split, per_group in ((0, 2), (2, 1)):
        for y in (0, 1):
            for place in (0, 1):
                for j in range(per_group + (2 if y == place and split == 0 else 0)):  # majority groups larger
                    name = f"{y}{place}/{split}_{j}.jpg"
                    image(folder / name, y, 20 * place + j)
                    n += 1
                    rows.append(f"{n},{name},{y},{split},{place},x")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")


def write_celeba(root: Path) -> None:
    folder = root / "celeba"
    attributes, partition = [], []
    n = 0
    for split, count in ((0, 3), (2, 1)):
        for blond in (-1, 1):
            for male in (-1, 1):
                for _ in range(count):
                    n += 1
                    name = f"{n:06d}.jpg"
                    image(folder / "img_align_celeba" / name, int(blond > 0), 30 * int(male > 0))
                    attributes.append(f"{name} {blond} {male} -1")
                    partition.append(f"{name} {split}")
    (folder / "list_attr_celeba.txt").write_text(f"{n}\nBlond_Hair Male Smiling\n" + "\n".join(attributes) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    backbone = make_backbone("hf")
    directory = tmp_path_factory.mktemp("tiny_clip")
    backbone.clip.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """CoOp's $DATA with ImageNet (+ V2, Sketch, A, R), OxfordPets, DTD, FGVCAircraft, Waterbirds and CelebA; the
    other six base-to-new datasets are missing."""
    root = tmp_path_factory.mktemp("data")
    write_imagenet(root)
    write_coop(root, "oxford_pets", "split_zhou_OxfordPets.json", "images")
    write_coop(
        root, "dtd", "split_zhou_DescribableTextures.json", "images", names=["tree", "house", "car", "boat", "plane"]
    )
    write_fgvc(root)
    write_waterbirds(root)
    write_celeba(root)
    return root


def reproduce(args: list[str], backbone_dir: Path, data_root: Path, out: Path) -> list[str]:
    return [
        "-q",
        "reproduce",
        *FAST,  # first: a later --set of the test wins
        *args,
        "--data-root",
        str(data_root),
        "--backbone",
        f"hf:{backbone_dir}",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]


def results(out: Path, protocol: str) -> dict[str, dict]:
    return {
        str(p.relative_to(out / "results" / protocol)): json.loads(p.read_text())
        for p in sorted((out / "results" / protocol).glob("*/*/seed*.json"))
    }


# ----------------------------------------------------------------------------------------------------------------
# base-to-new: the table, the class split, resume, settings
# ----------------------------------------------------------------------------------------------------------------
B2N = ["--protocol", "base2new", "--methods", "zeroshot", "coop", "coop+refiner", "--seeds", "1", "2"]
B2N += ["--refiner-config", REFINER]


def test_base2new_table_splits_and_missing_datasets(backbone_dir, data_root, tmp_path, capsys):
    out = tmp_path / "b2n"
    assert cli.main(reproduce(B2N, backbone_dir, data_root, out)) == 0
    printed = capsys.readouterr().out
    missing = [line for line in printed.splitlines() if line.startswith("missing ")]
    assert len(missing) == 7  # 11 datasets, 4 present (ImageNet, OxfordPets, FGVCAircraft, DTD)
    assert any(
        "caltech101 (Caltech101): no " in line and "caltech-101/split_zhou_Caltech101.json" in line for line in missing
    )
    assert "### Average over 4 of 11 datasets" in printed and "### FGVCAircraft" in printed
    saved = results(out, "base2new")
    assert len(saved) == 4 * 3 * 2
    for result in saved.values():
        m = result["metrics"]
        assert m["hm"] == pytest.approx(
            2 * m["base"] * m["new"] / (m["base"] + m["new"]) if m["base"] + m["new"] else 0
        )
    # CoCoOp's split: the first ceil(n / 2) labels are base; DTD has 5 classes here -> 3 base, 2 new
    assert saved["dtd/coop/seed1.json"]["n_test"] == {"base": 3, "new": 2}
    split = json.loads((out / "splits" / "base2new" / "dtd_k16_seed1.json").read_text())
    assert split["classes"] == [0, 3] and len(split["indices"]) == 9  # 16 shots asked, 3 per class exist
    record = json.loads((out / "train" / "base2new" / "dtd" / "coop" / "seed1" / "train.json").read_text())
    assert record["status"] == "done" and record["fit"]["steps"] == 2 and record["settings"]["recipe"]["epochs"] == 200
    assert not (out / "train" / "base2new" / "dtd" / "coop" / "seed1" / "checkpoints").exists()
    assert not (out / "train" / "base2new" / "dtd" / "zeroshot").exists()  # nothing to train
    table = json.loads((out / "tables" / "base2new.json").read_text())
    base = [table["cells"][d]["coop"]["base"]["mean"] for d in table["datasets"]]
    assert table["average"]["coop"]["base"]["mean"] == pytest.approx(sum(base) / 4)
    avg = table["average"]["coop"]
    assert avg["hm"]["mean"] == pytest.approx(
        2 * avg["base"]["mean"] * avg["new"]["mean"] / (avg["base"]["mean"] + avg["new"]["mean"])
    )
    assert table["paper_backbone"] is False and "No paper numbers" in (out / "tables" / "base2new.md").read_text()
    # zero-shot CLIP trains nothing: both seeds agree
    assert saved["dtd/zeroshot/seed1.json"]["metrics"] == saved["dtd/zeroshot/seed2.json"]["metrics"]


def test_interrupted_run_resumes_to_the_same_table(backbone_dir, data_root, tmp_path, monkeypatch, capsys):
    from prompt_robust.reproduce import runner

    args = ["--protocol", "base2new", "--methods", "coop", "--seeds", "1", "2", "--datasets", "dtd", "oxford_pets"]
    whole = tmp_path / "whole"
    assert cli.main(reproduce(args, backbone_dir, data_root, whole)) == 0

    out = tmp_path / "interrupted"
    calls = {"n": 0}
    evaluate = runner._Runner.evaluate

    def interrupting(self, unit, trained):
        calls["n"] += 1
        if calls["n"] == 3:  # the third unit's training is saved, then the run is killed
            raise KeyboardInterrupt
        return evaluate(self, unit, trained)

    monkeypatch.setattr(runner._Runner, "evaluate", interrupting)
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 130
    assert "prompt-robust: error: interrupted" in capsys.readouterr().err
    done = {name: (out / "results" / "base2new" / name).stat().st_mtime_ns for name in results(out, "base2new")}
    assert len(done) == 2 and not (out / "tables").exists()
    monkeypatch.setattr(runner._Runner, "evaluate", evaluate)
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 0
    assert "2 unit(s) run, 2 reused" in capsys.readouterr().out
    assert {n: (out / "results" / "base2new" / n).stat().st_mtime_ns for n in done} == done  # skipped, not rerun
    table, expected = (json.loads((d / "tables" / "base2new.json").read_text()) for d in (out, whole))
    assert table["cells"] == expected["cells"] and table["average"] == expected["average"]


def test_training_killed_midway_resumes_from_its_checkpoint(backbone_dir, data_root, tmp_path, monkeypatch, capsys):
    from prompt_robust.reproduce import runner

    args = ["--protocol", "base2new", "--methods", "coop", "--seeds", "1", "--datasets", "dtd", "--set", "steps=4"]
    whole = tmp_path / "whole"
    assert cli.main(reproduce(args, backbone_dir, data_root, whole)) == 0
    fit = runner.fit

    def killed_at_step_3(model, dataset, config, **kwargs):
        calls = {"n": 0}

        def hook(module, inputs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        handle = model.register_forward_pre_hook(hook)
        try:
            return fit(model, dataset, config, **kwargs)
        finally:
            handle.remove()

    out = tmp_path / "killed"
    monkeypatch.setattr(runner, "fit", killed_at_step_3)
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 130
    directory = out / "train" / "base2new" / "dtd" / "coop" / "seed1"
    assert json.loads((directory / "train.json").read_text())["status"] == "running"
    assert sorted(p.name for p in (directory / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    monkeypatch.setattr(runner, "fit", fit)
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 0
    record = json.loads((directory / "train.json").read_text())
    assert record["status"] == "done" and record["fit"]["resumed_from"] == 2 and record["fit"]["steps"] == 4
    expected = json.loads((whole / "results" / "base2new" / "dtd" / "coop" / "seed1.json").read_text())
    resumed = json.loads((out / "results" / "base2new" / "dtd" / "coop" / "seed1.json").read_text())
    assert resumed["metrics"] == expected["metrics"]
    final = json.loads((whole / "train" / "base2new" / "dtd" / "coop" / "seed1" / "train.json").read_text())
    assert record["fit"]["final_loss"] == final["fit"]["final_loss"]  # bit-identical to the uninterrupted run


def test_other_settings_are_refused_until_overwrite(backbone_dir, data_root, tmp_path, capsys):
    args = ["--protocol", "base2new", "--methods", "coop", "--seeds", "1", "--datasets", "dtd"]
    out = tmp_path / "runs"
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 0
    capsys.readouterr()
    other = [*reproduce(args, backbone_dir, data_root, out), "--set", "lr=0.01"]
    assert cli.main(other) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("prompt-robust: error: ")
    assert "recipe.lr 0.002 -> 0.01" in err and "Pass --overwrite" in err and "another --out" in err
    assert cli.main([*other, "--overwrite"]) == 0
    assert "moved the results and trainings of other settings to" in capsys.readouterr().out
    replaced = next(out.glob("replaced-*"))
    old = json.loads((replaced / "results" / "base2new" / "dtd" / "coop" / "seed1.json").read_text())
    new = json.loads((out / "results" / "base2new" / "dtd" / "coop" / "seed1.json").read_text())
    assert old["settings"]["training"]["recipe"]["lr"] == 0.002 and new["settings"]["training"]["recipe"]["lr"] == 0.01


# ----------------------------------------------------------------------------------------------------------------
# cross-dataset and domain generalisation share the ImageNet training
# ----------------------------------------------------------------------------------------------------------------
def test_cross_dataset_then_domain_generalization(backbone_dir, data_root, tmp_path, capsys):
    out = tmp_path / "imagenet"
    args = ["--methods", "zeroshot", "maple", "--seeds", "1"]
    assert cli.main(reproduce(["--protocol", "cross_dataset", *args], backbone_dir, data_root, out)) == 0
    printed = capsys.readouterr().out
    assert "| Method | ImageNet (source) | OxfordPets | FGVCAircraft | DTD | Average (targets) |" in printed
    saved = results(out, "cross_dataset")
    assert sorted({name.split("/")[0] for name in saved}) == ["dtd", "fgvc_aircraft", "imagenet", "oxford_pets"]
    record = out / "train" / "imagenet" / "imagenet" / "maple" / "seed1" / "train.json"
    settings = json.loads(record.read_text())["settings"]
    assert settings["recipe"]["lr"] == 0.0026 and settings["recipe"]["learner_config"]["depth"] == 3  # xd config
    stamp = record.stat().st_mtime_ns
    assert cli.main(reproduce(["--protocol", "domain_generalization", *args], backbone_dir, data_root, out)) == 0
    printed = capsys.readouterr().out
    assert "| Method | ImageNet (source) | -V2 | -Sketch | -A | -R | Average (targets) |" in printed
    assert record.stat().st_mtime_ns == stamp  # the ImageNet prompts were reused, not retrained
    dg = results(out, "domain_generalization")
    assert dg["imagenet-a/maple/seed1.json"]["n_test"] == 2  # ImageNet-A over its own classes
    table = json.loads((out / "tables" / "domain_generalization.json").read_text())
    targets = [
        table["cells"][d]["maple"]["acc"]["mean"] for d in ("imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r")
    ]
    assert table["average"]["maple"]["acc"]["mean"] == pytest.approx(sum(targets) / 4)


# ----------------------------------------------------------------------------------------------------------------
# spurious correlations, precision
# ----------------------------------------------------------------------------------------------------------------
def test_spurious_worst_group_table_with_debias_in_bf16(backbone_dir, data_root, tmp_path, capsys):
    out = tmp_path / "spurious"
    args = ["--protocol", "spurious", "--methods", "coop", "coop+debias", "--seeds", "1", "--precision", "bf16"]
    args += ["--debias-config", '{"templates": ["a {}."]}']  # the tiny tokenizer spells unknown words by bytes
    assert cli.main(reproduce(args, backbone_dir, data_root, out)) == 0
    printed = capsys.readouterr().out
    assert "| Method | Waterbirds Worst | Waterbirds Avg | Waterbirds Gap | CelebA Worst |" in printed
    result = results(out, "spurious")["waterbirds/coop+debias/seed1.json"]
    m = result["metrics"]
    assert m["worst_group"] == pytest.approx(min(m["per_group"].values())) and m["gap"] == pytest.approx(
        m["avg"] - m["worst_group"]
    )
    assert "waterbird on land" in m["per_group"]
    training = result["settings"]["training"]
    assert training["precision"] == "bf16"
    assert training["addons"]["debias"]["attribute_values"] == ["land background", "water background"]
    celeba = results(out, "spurious")["celeba/coop+debias/seed1.json"]["settings"]["training"]
    assert celeba["addons"]["debias"]["attribute_values"] == ["female", "male"]


# ----------------------------------------------------------------------------------------------------------------
# errors: one line, exit 2
# ----------------------------------------------------------------------------------------------------------------
def test_missing_every_dataset_is_one_line(backbone_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = reproduce(["--protocol", "domain_generalization"], backbone_dir, empty, tmp_path / "out")
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out.count("missing ") == 5  # ImageNet and its four variants, one line each
    assert "missing imagenet-a (ImageNet-A): no " in captured.out and "imagenet-adversarial/imagenet-a" in captured.out
    err = captured.err.strip()
    assert err.count("\n") == 0 and "holds no dataset the domain_generalization protocol can run" in err
    assert f"{empty}/imagenet/images/train" in err and f"{empty}/imagenet-rendition/imagenet-r" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "lrr=0.1"], "unknown override key 'lrr'.*Did you mean 'lr'"),
        (["--set", "lr"], "overrides are KEY=VALUE"),
        (["--methods", "coop+refine"], "unknown add-on 'refine'.*Did you mean 'refiner'"),
        (
            ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "(no CUDA GPU|unknown device)",
        ),
        (["--methods", "coop+debias"], "needs words for the spurious attribute"),
        (["--shots", "-1"], "shots must be an integer >= 0"),
    ],
)
def test_user_errors_are_one_line(backbone_dir, data_root, tmp_path, capsys, extra, message):
    import re

    argv = reproduce(["--protocol", "base2new", "--datasets", "dtd", "--seeds", "1"], backbone_dir, data_root, tmp_path)
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err


# ----------------------------------------------------------------------------------------------------------------
# presets against the reference configs
# ----------------------------------------------------------------------------------------------------------------
#: values read from the reference repositories' files (the file is named on each line)
REFERENCE = {
    # KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml: OPTIM sgd, LR 0.002, MAX_EPOCH 200, BATCH_SIZE 32,
    # WARMUP_EPOCH 1 constant 1e-5, CTX_INIT "a photo of a"; train.py: PREC fp16, CSC False, CLASS_TOKEN_POSITION end
    ("coop", "default"): {"optimizer": "sgd", "lr": 0.002, "epochs": 200, "batch_size": 32, "precision": "fp16"},
    # KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml (COOP.md: ImageNet uses the *_ep50 configs)
    ("coop", "imagenet"): {"optimizer": "sgd", "lr": 0.002, "epochs": 50, "batch_size": 32, "precision": "fp16"},
    # KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml: LR 0.002, MAX_EPOCH 10, BATCH_SIZE 1,
    # N_CTX 4, CTX_INIT "a photo of a", PREC fp16
    ("cocoop", "default"): {"optimizer": "sgd", "lr": 0.002, "epochs": 10, "batch_size": 1, "precision": "fp16"},
    # muzairkhattak/multimodal-prompt-learning configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: LR 0.0025,
    # MAX_EPOCH 5, BATCH_SIZE 4, N_CTX_VISION 8, PROMPT_DEPTH_VISION 12, PREC fp16
    ("vpt", "default"): {"optimizer": "sgd", "lr": 0.0025, "epochs": 5, "batch_size": 4, "precision": "fp16"},
    # muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: LR 0.0035,
    # MAX_EPOCH 5, BATCH_SIZE 4, N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9, PREC fp16
    ("maple", "default"): {"optimizer": "sgd", "lr": 0.0035, "epochs": 5, "batch_size": 4, "precision": "fp16"},
    # .../MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: LR 0.0026, MAX_EPOCH 2, BATCH_SIZE 4, PROMPT_DEPTH 3
    ("maple", "imagenet"): {"optimizer": "sgd", "lr": 0.0026, "epochs": 2, "batch_size": 4, "precision": "fp16"},
}
REFERENCE_LEARNER = {
    ("coop", "default"): {"ctx_init": "a photo of a", "class_specific": False, "class_token_position": "end"},
    ("cocoop", "default"): {"n_ctx": 4, "ctx_init": "a photo of a"},
    ("vpt", "default"): {"n_tokens": 8, "deep": True, "depth": 12, "template": "a photo of a {}."},
    ("maple", "default"): {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 9},
    ("maple", "imagenet"): {"n_ctx": 2, "ctx_init": "a photo of a", "depth": 3},
}


@pytest.mark.parametrize(("learner", "variant"), sorted(REFERENCE))
def test_presets_match_the_reference_configs(learner, variant):
    preset = PRESETS["paper"][learner][variant]
    for name, value in REFERENCE[(learner, variant)].items():
        assert getattr(preset, name) == value, name
    for name, value in REFERENCE_LEARNER.get((learner, variant), {}).items():
        assert preset.learner_config[name] == value, name
    # every config: cosine after one constant warm-up epoch at 1e-5; Dassl's momentum 0.9 and weight decay 5e-4
    assert (preset.warmup_epochs, preset.warmup_type, preset.warmup_lr) == (1, "constant", 1e-5)
    assert (preset.momentum, preset.weight_decay) == (0.9, 5e-4)
    assert ".yaml" in preset.source and "Dassl" in preset.source
    for name, value in REFERENCE_LEARNER.get((learner, variant), {}).items():  # the learner accepts every field
        from prompt_robust.learners import LEARNERS

        LEARNERS[learner].config_class(**{**preset.learner_config, name: value})


def test_preset_schedule_overrides_and_quick():
    coop = PRESETS["paper"]["coop"]["default"]
    fit = coop.fit_config(50 * 16, seed=3)  # 50 base classes x 16 shots
    assert (fit.steps, fit.warmup_steps, fit.batch_size, fit.lr, fit.warmup, fit.seed) == (
        5000,
        25,
        32,
        0.002,
        "constant",
        3,
    )
    assert coop.fit_config(10, seed=1, steps=1).warmup_steps == 0  # a warm-up as long as the run is cut
    preset, steps = resolve_preset("paper", "maple", "default", {"maple.depth": 3, "coop.lr": 1.0, "epochs": 7})
    assert (preset.learner_config["depth"], preset.lr, preset.epochs, steps) == (3, 0.0035, 7, None)
    assert PRESETS["quick"]["coop"]["default"].epochs == 1 and {"lr", "epochs"} <= set(PRESET_FIELDS)
    assert "precision" not in PRESET_FIELDS  # the reference's, for the record: --precision chooses what runs
    with pytest.raises(ValueError, match=r"unknown override key 'dept'.*Did you mean 'depth'"):
        resolve_preset("paper", "maple", "default", {"dept": 3})
    with pytest.raises(ValueError, match="batch_size must be int"):
        resolve_preset("paper", "coop", "default", {"batch_size": 2.5})


# ----------------------------------------------------------------------------------------------------------------
# paper numbers only beside a ViT-B/16
# ----------------------------------------------------------------------------------------------------------------
class _ViTB16:
    """Looks like CLIP ViT-B/16 to the table (dims and 197 vision positions), without its 150M parameters."""

    name = "clip-vit-base-patch16"
    dims: ClassVar[dict[str, int]] = {
        "embed_dim": 512,
        "text_width": 512,
        "vision_width": 768,
        "image_size": 224,
        "context_length": 77,
        "num_text_layers": 12,
        "num_vision_layers": 12,
    }

    def __init__(self, positions: int = 197) -> None:
        self.positions = positions

    def named_parameters(self):
        return [("vision_model.embeddings.position_embedding.weight", torch.zeros(self.positions, 1))]

    def named_buffers(self):
        return []

    def fingerprint(self) -> str:
        return "0" * 16


def test_paper_numbers_beside_a_vit_b16_only():
    assert is_paper_backbone(_ViTB16()) and not is_paper_backbone(_ViTB16(positions=50))  # ViT-B/32: 7 x 7 + 1
    results = {
        (d, m, s): {"base": 0.8, "new": 0.7, "hm": 2 * 0.8 * 0.7 / 1.5}
        for d in ("dtd", "eurosat")
        for m in ("coop", "coop+refiner")
        for s in (1, 2)
    }
    kwargs = {"methods": ["coop", "coop+refiner"], "seeds": [1, 2], "datasets": ["dtd", "eurosat"]}
    text, data = build_table(PROTOCOLS["base2new"], results, backbone=_ViTB16(), **kwargs)
    assert "| coop | 80.00 ± 0.00 | 70.00 ± 0.00 | 74.67 ± 0.00 | 82.69 | 63.22 | 71.66 |" in text
    assert "| coop+refiner | 80.00 ± 0.00 | 70.00 ± 0.00 | 74.67 ± 0.00 |  |  |  |" in text  # no paper has it
    assert "muzairkhattak/multimodal-prompt-learning README.md" in text and "2 of the 11 datasets" in text
    assert data["paper"]["coop"]["values"] == {"base": 82.69, "new": 63.22, "hm": 71.66}
    text, data = build_table(PROTOCOLS["base2new"], results, backbone=_ViTB16(positions=50), **kwargs)
    assert "Paper" not in text.split("Notes:")[0] and data["paper"] == {}


# ----------------------------------------------------------------------------------------------------------------
# loaders and ImageNet in train / eval
# ----------------------------------------------------------------------------------------------------------------
def test_fgvc_aircraft_reader(data_root, tmp_path):
    train = load_fgvc_aircraft(data_root / "fgvc_aircraft", "train")
    assert train.classnames == ["boat", "plane", "small car", "tree"] and train.labels == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [p.name for p in train.paths[:2]] == ["train00.jpg", "train01.jpg"]
    write_fgvc(tmp_path)
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").write_text("test000 submarine\n")
    with pytest.raises(ValueError, match=r"images_variant_test.txt, line 1: variant 'submarine' is not in"):
        load_fgvc_aircraft(tmp_path / "fgvc_aircraft", "test")
    with pytest.raises(FileNotFoundError, match=r"variants\.txt"):
        load_fgvc_aircraft(tmp_path, "test")


def test_imagenet_in_train_and_eval(backbone_dir, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--dataset", "imagenet", "--root", str(data_root), "--backbone", str(backbone_dir)]
    assert cli.main(["-q", "train", *common, "--k", "2", "--steps", "1", "--out", str(run)]) == 0
    assert json.loads((run / "split.json").read_text())["k"] == 2
    capsys.readouterr()
    assert cli.main(["-q", "eval", *common, "--adapter", str(run / "adapter")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["imagenet", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r"]
    assert report["imagenet-a"]["n"] == 2 and report["imagenet"]["n"] == 4
    assert cli.main(["-q", "eval", *common, "--adapter", str(run / "adapter"), "--targets", "imagenet-r"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["imagenet-r"]


def test_config_checks():
    with pytest.raises(ValueError, match=r"unknown protocol 'base2nw'.*Did you mean 'base2new'"):
        ReproduceConfig("base2nw", "data")
    with pytest.raises(ValueError, match="unknown dataset of the spurious protocol 'dtd'"):
        ReproduceConfig("spurious", "data", datasets=["dtd"])
    assert math.isclose(PRESETS["paper"]["vpt"]["default"].lr, 0.0025)
