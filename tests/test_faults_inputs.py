"""Faulty inputs (issue 14): raw integer images, ignored or out-of-range labels and 1-class learners are refused
with errors that say how to fix them; DomainBed folders with symlink loops list every image once; metadata and
split files cannot make a loader read outside the dataset root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CLASSNAMES, LEARNER_KWARGS
from PIL import Image

import prompt_robust as pr
from prompt_robust.addons.refiner import targets as targets_module
from prompt_robust.data.loaders import image_transform, load_celeba, load_coop_split, load_domainbed, load_waterbirds
from prompt_robust.training import FitConfig, fit

TRANSFORM = image_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def model(bb):
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])
    return pr.wrap(learner, pr.RobustConfig())


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------
# pixel values


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixel_values_are_refused_naming_transform_for(model, images, dtype):
    raw = (images.clamp(-1, 1) * 127 + 128).to(dtype)
    for labels in (None, torch.tensor([0, 1, 2])):
        with pytest.raises(TypeError, match=rf"{dtype}.*prompt_robust\.data\.transform_for\(backbone\)"):
            model(raw, labels=labels)
    # training goes through the same check
    data = [(raw[i], i) for i in range(3)]
    with pytest.raises(TypeError, match=r"transform_for"):
        fit(model, data, FitConfig(steps=1, batch_size=3))


def test_transform_for_is_importable_from_prompt_robust_data():
    from prompt_robust.data import transform_for

    assert transform_for is pr.data.transform_for


def test_refiner_targets_refuse_integer_images(model):
    data = [(torch.zeros(3, 32, 32, dtype=torch.uint8), 0), (torch.zeros(3, 32, 32, dtype=torch.uint8), 1)]
    with pytest.raises(TypeError, match=r"transform_for"):
        targets_module.build_targets(model.learner, data, steps=1, lr=0.1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_label_minus_100_is_refused_not_ignored(model, images):
    with pytest.raises(ValueError, match=r"-100.*ignore_index") as info:
        model(images, labels=torch.tensor([0, -100, 2]))
    assert "1 of 3" in str(info.value)  # says how many


def test_a_dataset_of_only_minus_100_does_not_train_with_loss_0(model, images):
    data = [(images[i], -100) for i in range(3)]
    with pytest.raises(ValueError, match=r"negative.*-100"):
        fit(model, data, FitConfig(steps=1, batch_size=3))


def test_labels_beyond_the_classes_are_refused_naming_the_class_count(model, images):
    with pytest.raises(ValueError, match=rf"got 7.*{len(CLASSNAMES)} classes"):
        model(images, labels=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match=r"labels must be class indices"):
        targets_module.build_targets(model.learner, [(images[0], 9)], steps=1, lr=0.1, progress=False)


def test_float_labels_of_one_dimension_are_refused(model, images):
    with pytest.raises(TypeError, match=r"integer class indices"):
        model(images, labels=torch.tensor([0.0, 1.0, 2.0]))


def test_valid_batches_pass_the_checks(model, images):
    from prompt_robust.data import checks

    out = model(images, labels=torch.tensor([0, 3, 1]))
    assert torch.isfinite(out.loss) and out.loss > 0
    checks.check_batch(images, torch.tensor([0, 3]), num_classes=4)
    checks.check_batch(images, None, num_classes=None)


def test_one_class_learner_is_refused(bb):
    with pytest.raises(ValueError, match=r"at least 2 classes.*got 1.*'cat'"):
        pr.build_learner("coop", bb, ["cat"], **LEARNER_KWARGS["coop"])
    learner = pr.build_learner("zeroshot", bb, CLASSNAMES)
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        learner.set_classnames(["cat"])
    assert learner.classnames == CLASSNAMES  # a refused list leaves the learner as it was


# ---------------------------------------------------------------------------------------------------------------
# DomainBed folders with symlinks


def write_image(path: Path, colour=(10, 128, 250)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), colour).save(path)
    return path


LAYOUT = {"photo": {"dog": 2, "guitar": 2}, "sketch": {"dog": 3, "guitar": 1}}


def make_domainbed(root: Path) -> dict[Path, tuple[int, int]]:
    """The folders of LAYOUT; returns each image's (domain, label)."""
    truth = {}
    for d, (domain, classes) in enumerate(sorted(LAYOUT.items())):
        for label, (name, count) in enumerate(sorted(classes.items())):
            for j in range(count):
                truth[write_image(root / domain / name / f"{j}.png", (d * 50, label * 80, j * 30))] = (d, label)
    return truth


def test_domainbed_symlink_loops_list_every_image_once(tmp_path):
    root = tmp_path / "PACS"
    truth = make_domainbed(root)
    os.symlink(".", root / "photo" / "dog" / "self")  # a folder holding itself
    os.symlink("..", root / "photo" / "guitar" / "up")  # the domain: both classes again, and itself
    os.symlink("../../..", root / "sketch" / "dog" / "top")  # above the dataset root
    nested = root / "sketch" / "guitar" / "more"
    nested.mkdir()
    os.symlink("../../guitar", nested / "back")  # the class folder from a subfolder
    data = load_domainbed(root, transform=TRANSFORM)
    assert len(data) == len(truth) == 8
    real = [p.resolve() for p in data.paths]
    assert len(set(real)) == len(real)
    assert {p: (d, y) for p, d, y in zip(real, data.domains, data.labels, strict=True)} == {
        p.resolve(): v for p, v in truth.items()
    }


def test_domainbed_follows_a_symlinked_folder_outside_the_root_once(tmp_path):
    root = tmp_path / "PACS"
    truth = make_domainbed(root)
    store = tmp_path / "store"
    extra = write_image(store / "x.png")
    os.symlink(store, root / "photo" / "dog" / "external")
    os.symlink(store, root / "photo" / "dog" / "external_again")  # the same real folder: read once
    os.symlink(store, store / "loop")
    data = load_domainbed(root, transform=TRANSFORM)
    assert len(data) == len(truth) + 1
    assert [p.resolve() for p in data.paths].count(extra.resolve()) == 1


# ---------------------------------------------------------------------------------------------------------------
# entries that point outside the root


@pytest.fixture
def outside(tmp_path):
    return write_image(tmp_path / "secret.png")


def make_waterbirds(root: Path, filename: str) -> Path:
    write_image(root / "001.Bird" / "a.jpg")
    lines = ["img_id,img_filename,y,split,place", "1,001.Bird/a.jpg,0,0,0", f"2,{filename},1,0,1"]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested"])
def test_waterbirds_entries_outside_the_root_are_refused(tmp_path, outside, kind):
    root = tmp_path / "waterbirds"
    filename = {"dotdot": "../secret.png", "absolute": str(outside), "nested": "001.Bird/../../secret.png"}[kind]
    make_waterbirds(root, filename)
    with pytest.raises(ValueError) as info:
        load_waterbirds(root, "train", transform=TRANSFORM)
    message = str(info.value)
    assert filename in message and "metadata.csv" in message and "line 3" in message and "outside" in message


def test_waterbirds_entries_inside_the_root_still_load(tmp_path):
    root = make_waterbirds(tmp_path / "waterbirds", "001.Bird/./../001.Bird/a.jpg")
    assert len(load_waterbirds(root, "train", transform=TRANSFORM)) == 2


def test_celeba_entries_outside_the_root_are_refused(tmp_path, outside):
    root = tmp_path / "celeba"
    write_image(root / "img_align_celeba" / "000001.jpg")
    names = ["000001.jpg", "../../secret.png"]
    attr = ["2", "Blond_Hair Male", *(f"{n} 1 -1" for n in names)]
    (root / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} 0\n" for n in names))
    with pytest.raises(ValueError, match=r"\.\./\.\./secret\.png.*list_attr_celeba\.txt.*outside"):
        load_celeba(root, "Blond_Hair", "Male", transform=TRANSFORM)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_coop_split_entries_outside_the_image_dir_are_refused(tmp_path, outside, kind):
    image_dir = tmp_path / "pets" / "images"
    write_image(image_dir / "a.jpg")
    bad = "../../secret.png" if kind == "dotdot" else str(outside)
    split = {"train": [["a.jpg", 0, "cat"], [bad, 1, "dog"]], "val": [], "test": []}
    split_file = tmp_path / "pets" / "split_zhou_Pets.json"
    split_file.write_text(json.dumps(split))
    with pytest.raises(ValueError) as info:
        load_coop_split(split_file, image_dir, "train", transform=TRANSFORM)
    message = str(info.value)
    assert bad in message and "split_zhou_Pets.json" in message and "train[1]" in message and "outside" in message
