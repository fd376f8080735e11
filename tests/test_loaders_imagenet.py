"""ImageNet and its shifted test sets (V2, Sketch, A, R) on tiny fixtures written in CoOp's folder layout: class
order from classnames.txt, labels over ImageNet's list or the 200-class subset, images reaching the transform,
few-shot sampling, and errors that name the problem and the fix."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from prompt_robust.data import FewShotSubset, sample_few_shot
from prompt_robust.data.imagenet import (
    load_imagenet,
    load_imagenet_a,
    load_imagenet_r,
    load_imagenet_sketch,
    load_imagenet_targets,
    load_imagenet_v2,
    read_imagenet_classnames,
)
from prompt_robust.data.items import collate_images_labels
from prompt_robust.data.loaders import ImageListDataset, image_transform

torch.set_num_threads(1)

S = 4
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
TRANSFORM = image_transform(S, MEAN, STD)

# classnames.txt order (the class order) deliberately differs from the wnids' sorted order
WNIDS = ["n00000003", "n00000001", "n00000005", "n00000002", "n00000004"]
NAMES = ["great white shark", "tench", "hammerhead", "goldfish", "tiger shark"]
# ImageNet-A / -R: 3-class subsets, folders written in an order unlike ImageNet's
A_WNIDS = ["n00000004", "n00000005", "n00000003"]  # positions 4, 2, 0
R_WNIDS = ["n00000002", "n00000001"]  # positions 3, 1


def colour(position: int) -> tuple[int, int, int]:
    """A colour per ImageNet class, far enough apart to survive JPEG."""
    return (20 + 50 * position, 230 - 45 * position, 90 + 35 * (position % 3))


def position_of(pixel_values: torch.Tensor) -> int:
    """The ImageNet class whose colour an image shows (nearest colour after un-normalising)."""
    rgb = pixel_values.mean(dim=(1, 2)) * torch.tensor(STD) + torch.tensor(MEAN)
    distance = [float((rgb * 255 - torch.tensor(colour(p), dtype=torch.float32)).abs().sum()) for p in range(5)]
    return min(range(5), key=distance.__getitem__)


def write_image(path: Path, position: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.new("RGB", (8, 8), colour(position)).save(path, format=None if path.suffix else "PNG", **options)


def write_classnames(path: Path, wnids=WNIDS, names=NAMES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names, strict=True)) + "\n")
    return path


@pytest.fixture
def data_root(tmp_path) -> Path:
    """CoOp's $DATA: imagenet/ (3 train + 1 val image per class), imagenetv2/, imagenet-sketch/, imagenet-a/-r."""
    root = tmp_path / "data"
    write_classnames(root / "imagenet" / "classnames.txt")
    for p, wnid in enumerate(WNIDS):
        for j in range(3):
            write_image(root / "imagenet" / "images" / "train" / wnid / f"{wnid}_{j}.JPEG", p)
        write_image(root / "imagenet" / "images" / "val" / wnid / f"ILSVRC2012_val_{p:08d}.JPEG", p)
        for j in range(2):
            write_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(p) / f"{j}.jpeg", p)
        write_image(root / "imagenet-sketch" / "images" / wnid / f"sketch_{p}.png", p)
    for wnid in A_WNIDS:
        for j in range(2):
            write_image(root / "imagenet-adversarial" / "imagenet-a" / wnid / f"{j}.jpg", WNIDS.index(wnid))
    (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("not a class")
    for wnid in R_WNIDS:
        write_image(root / "imagenet-rendition" / "imagenet-r" / wnid / "art_0.jpg", WNIDS.index(wnid))
    return root


def check_images_match_labels(data: ImageListDataset, positions) -> None:
    """Every example's image shows the class its label names (labels -> ImageNet positions via ``positions``)."""
    for i in range(len(data)):
        item = data[i]
        assert item["pixel_values"].shape == (3, S, S) and item["pixel_values"].dtype == torch.float32
        assert position_of(item["pixel_values"]) == positions[item["labels"]]


# ----------------------------------------------------------------------------------------------------------------
# ImageNet
# ----------------------------------------------------------------------------------------------------------------
def test_classnames_file_order_is_the_class_order(data_root):
    wnids, names = read_imagenet_classnames(data_root / "imagenet" / "classnames.txt")
    assert wnids == WNIDS and names == NAMES  # file order, multi-word names kept, trailing blank line skipped


def test_imagenet_train_and_val_labels_follow_classnames(data_root):
    train = load_imagenet(data_root, "train", transform=TRANSFORM)
    assert isinstance(train, ImageListDataset)
    assert train.classnames == NAMES and train.wnids == WNIDS and train.class_positions == list(range(5))
    assert len(train) == 15 and Counter(train.labels) == {p: 3 for p in range(5)}
    for path, label in zip(train.paths, train.labels, strict=True):
        assert path.parent.name == WNIDS[label] and path.parent.parent.name == "train"
    check_images_match_labels(train, range(5))

    val = load_imagenet(data_root, "val", transform=TRANSFORM)
    test = load_imagenet(data_root, "test", transform=TRANSFORM)  # CoOp: the val set is the test set
    assert val.paths == test.paths and val.labels == test.labels == [0, 1, 2, 3, 4]
    assert all(path.parent.parent.name == "val" for path in val.paths)
    batch = collate_images_labels([val[i] for i in range(len(val))])
    assert batch["pixel_values"].shape == (5, 3, S, S) and batch["labels"].tolist() == [0, 1, 2, 3, 4]


def test_few_shot_subset_of_imagenet_train(data_root):
    train = load_imagenet(data_root, "train", transform=TRANSFORM)
    indices = sample_few_shot(train.labels, k=2, seed=1)  # the papers use k=16 on the full train set
    shots = FewShotSubset(train, indices)
    assert len(shots) == 10 and Counter(shots[i]["labels"] for i in range(len(shots))) == {p: 2 for p in range(5)}
    assert sample_few_shot(train.labels, k=2, seed=1) == indices  # reproducible from the seed
    few = train.subset(indices)
    assert few.classnames == NAMES and [few.labels[i] for i in range(10)] == [train.labels[i] for i in indices]
    check_images_match_labels(few, range(5))


def test_missing_class_folder_is_logged(data_root, caplog):
    shutil.rmtree(data_root / "imagenet" / "images" / "train" / WNIDS[2])
    with caplog.at_level(logging.WARNING, logger="prompt_robust.data.imagenet"):
        train = load_imagenet(data_root, "train", transform=TRANSFORM)
    assert "holds 4 of the 5 classes" in caplog.text
    assert train.classnames == NAMES and 2 not in train.labels  # labels keep their ImageNet positions


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-V2 and ImageNet-Sketch (1000-class label space)
# ----------------------------------------------------------------------------------------------------------------
def test_imagenet_v2_index_folders_are_imagenet_positions(data_root):
    v2 = load_imagenet_v2(data_root, transform=TRANSFORM)
    assert v2.classnames == NAMES and v2.wnids == WNIDS
    assert v2.labels == [p for p in range(5) for _ in range(2)]
    assert [int(path.parent.name) for path in v2.paths] == v2.labels
    check_images_match_labels(v2, range(5))


def test_imagenet_sketch_labels_are_imagenet_positions(data_root):
    sketch = load_imagenet_sketch(data_root, transform=TRANSFORM)
    assert sketch.classnames == NAMES and sketch.labels == [0, 1, 2, 3, 4]
    assert [path.parent.name for path in sketch.paths] == WNIDS
    check_images_match_labels(sketch, range(5))


def test_variant_falls_back_to_its_own_classnames_copy(data_root, tmp_path):
    """CoOp's instructions copy imagenet/classnames.txt into each variant's folder; that copy is read when the
    ImageNet folder is not there."""
    (data_root / "imagenet" / "classnames.txt").rename(data_root / "imagenet-sketch" / "classnames.txt")
    assert load_imagenet_sketch(data_root, transform=TRANSFORM).classnames == NAMES
    other = write_classnames(tmp_path / "elsewhere.txt", WNIDS, [n.upper() for n in NAMES])
    assert load_imagenet_v2(data_root, transform=TRANSFORM, classnames_file=other).classnames[0] == "GREAT WHITE SHARK"


# ----------------------------------------------------------------------------------------------------------------
# ImageNet-A / ImageNet-R: subset vs ImageNet label space
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loader", "subset_wnids"), [(load_imagenet_a, A_WNIDS), (load_imagenet_r, R_WNIDS)], ids=["A", "R"]
)
def test_subset_and_imagenet_label_spaces(data_root, loader, subset_wnids):
    positions = sorted(WNIDS.index(w) for w in subset_wnids)  # ImageNet's order, not the folders' name order
    default = loader(data_root, transform=TRANSFORM)
    assert default.classnames == [NAMES[p] for p in positions]  # CoOp's evaluation: the subset's class names
    assert default.wnids == [WNIDS[p] for p in positions] and default.class_positions == positions
    assert sorted(set(default.labels)) == list(range(len(positions)))
    check_images_match_labels(default, positions)

    full = loader(data_root, classes="imagenet", transform=TRANSFORM)
    assert full.classnames == NAMES and full.class_positions == list(range(5))
    assert full.paths == default.paths
    assert full.labels == [positions[label] for label in default.labels]  # subset label -> ImageNet position
    check_images_match_labels(full, range(5))

    with pytest.raises(ValueError, match=r"unknown classes 'imagenet1k'.*Did you mean 'imagenet'"):
        loader(data_root, classes="imagenet1k")


def test_imagenet_a_subset_order_for_real_ordered_classnames(data_root, tmp_path):
    """With the real (wnid-sorted) classnames.txt the subset labels are the sorted-folder labels CoOp assigns."""
    order = sorted(range(5), key=WNIDS.__getitem__)
    sorted_file = write_classnames(tmp_path / "sorted.txt", [WNIDS[p] for p in order], [NAMES[p] for p in order])
    data = load_imagenet_a(data_root, transform=TRANSFORM, classnames_file=sorted_file)
    assert data.wnids == sorted(A_WNIDS)
    assert [data.wnids[label] for label in data.labels] == [path.parent.name for path in data.paths]


def test_targets_of_the_dg_protocol(data_root):
    tests = load_imagenet_targets(data_root, transform=TRANSFORM)
    assert list(tests) == ["imagenet", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r"]
    assert {name: len(d.classnames) for name, d in tests.items()} == {
        "imagenet": 5,
        "imagenetv2": 5,
        "imagenet-sketch": 5,
        "imagenet-a": 3,
        "imagenet-r": 2,
    }
    both = load_imagenet_targets(data_root, ["imagenet-r", "imagenet-a"], classes="imagenet", transform=TRANSFORM)
    assert list(both) == ["imagenet-r", "imagenet-a"] and both["imagenet-a"].classnames == NAMES
    with pytest.raises(ValueError, match=r"Did you mean 'imagenet-sketch'"):
        load_imagenet_targets(data_root, ["imagenet_sketch"])
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        load_imagenet_targets(data_root, "imagenet-a")


# ----------------------------------------------------------------------------------------------------------------
# Errors that name the problem and the fix
# ----------------------------------------------------------------------------------------------------------------
def test_missing_folders_print_the_expected_tree(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*imagenet/.*classnames\.txt.*train/<wnid>"):
        load_imagenet(tmp_path / "nowhere")
    shutil.rmtree(data_root / "imagenet" / "images" / "val")
    with pytest.raises(FileNotFoundError, match=r"(?s)val'? does not exist.*val/<wnid>/\*\.JPEG"):
        load_imagenet(data_root, "val")
    # the commonest slip: the dataset's own folder as root
    with pytest.raises(FileNotFoundError, match=rf"pass '{data_root}' instead"):
        load_imagenet(data_root / "imagenet")
    with pytest.raises(FileNotFoundError, match=rf"pass '{data_root}' instead"):
        load_imagenet_a(data_root / "imagenet-adversarial")
    shutil.rmtree(data_root / "imagenet-rendition")
    with pytest.raises(FileNotFoundError, match=r"(?s)imagenet-rendition.*imagenet-r/<wnid>"):
        load_imagenet_r(data_root)
    shutil.rmtree(data_root / "imagenetv2")
    with pytest.raises(FileNotFoundError, match=r"(?s)imagenetv2-matched-frequency-format-val/.*0/\*\.jpeg"):
        load_imagenet_v2(data_root)


def test_missing_classnames_file_names_where_it_was_looked_for(data_root):
    (data_root / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"(?s)no class-name file exists at .*imagenet/classnames\.txt.*<wnid> <class name>"
    ):
        load_imagenet(data_root)
    with pytest.raises(FileNotFoundError, match=r"(?s)imagenet-adversarial/classnames\.txt.*classnames_file="):
        load_imagenet_a(data_root)


def test_wnid_folder_not_in_classnames(data_root):
    write_image(data_root / "imagenet" / "images" / "train" / "n09999999" / "x.JPEG", 0)
    with pytest.raises(ValueError, match=r"'n09999999' whose wnid is not in the class list .*classnames_file="):
        load_imagenet(data_root)


def test_flat_val_folder_asks_for_class_folders(data_root):
    val = data_root / "imagenet" / "images" / "val"
    shutil.rmtree(val)
    write_image(val / "ILSVRC2012_val_00000001.JPEG", 0)
    with pytest.raises(ValueError, match=r"(?s)holds no class folders\. It holds images directly: move each.*<wnid>"):
        load_imagenet(data_root, "val")


def test_variant_wnids_must_be_a_subset_of_imagenets(data_root):
    write_image(data_root / "imagenet-adversarial" / "imagenet-a" / "n07777777" / "x.jpg", 0)
    with pytest.raises(ValueError, match=r"n07777777.*must be a subset of ImageNet's wnids"):
        load_imagenet_a(data_root)
    write_image(data_root / "imagenet-sketch" / "images" / "n06666666" / "x.png", 0)
    with pytest.raises(ValueError, match=r"n06666666.*must be a subset of ImageNet's wnids"):
        load_imagenet_sketch(data_root)


@pytest.mark.parametrize("folder", ["5", "17", "007", "-1", "abc"])
def test_v2_index_folder_outside_the_class_list(data_root, folder):
    write_image(data_root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / folder / "x.jpeg", 0)
    with pytest.raises(ValueError, match=rf"'{folder}'.*class index 0\.\.4 .*without leading zeros"):
        load_imagenet_v2(data_root)


def test_empty_class_folder(data_root):
    empty = data_root / "imagenet-rendition" / "imagenet-r" / WNIDS[0]
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"ImageNet-R class folder .*n00000003' holds no images.*extract"):
        load_imagenet_r(data_root)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("n00000003 great white shark\nn00000001\n", r"line 2: cannot read 'n00000001'.*'<wnid> <class name>'"),
        ("n00000003 shark\nn00000003 tench\n", r"line 2: wnid 'n00000003' is listed again \(first on line 1\)"),
        ("\n\n", r"lists no classes"),
    ],
    ids=["no-name", "repeated", "empty"],
)
def test_unreadable_classnames_file(data_root, content, message):
    (data_root / "imagenet" / "classnames.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_imagenet(data_root)


def test_bad_split_and_variant_names(data_root):
    with pytest.raises(ValueError, match=r"unknown split 'training'.*Did you mean 'train'"):
        load_imagenet(data_root, "training")
    with pytest.raises(ValueError, match=r"unknown ImageNet-V2 variant.*Did you mean 'matched-frequency'"):
        load_imagenet_v2(data_root, variant="matched_frequency")
