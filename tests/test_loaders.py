"""Real-dataset loaders on tiny fixtures written in the exact public layouts (CoOp split files, Waterbirds,
CelebA, DomainBed folders): contents against the fixture's ground truth, exact preprocessing, errors that name
the path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from prompt_robust.data.fewshot import sample_few_shot
from prompt_robust.data.loaders import (
    ImageListDataset,
    image_transform,
    load_celeba,
    load_coop_split,
    load_domainbed,
    load_waterbirds,
    split_by_domain,
    transform_for,
)

torch.set_num_threads(1)

S = 8
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORM = image_transform(S, MEAN, STD)


def write_image(path: Path, colour=(10, 128, 250), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def expected_pixels(colour) -> torch.Tensor:
    c = torch.tensor(colour, dtype=torch.float32)[:, None, None].div(255)
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return ((c - mean) / std).expand(3, S, S)


def colour_of(index: int) -> tuple[int, int, int]:
    return (index * 7 % 256, 255 - index * 11 % 256, 40 + index % 200)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 30), (30, 40), (8, 8), (5, 3)])
def test_constant_colour_maps_to_normalised_value(tmp_path, size):
    colour = (10, 128, 250)
    path = write_image(tmp_path / "c.png", colour, size)
    with Image.open(path) as image:
        out = TRANSFORM(image)
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_pixels(colour), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(41, 30), (30, 41), (16, 16), (8, 13), (5, 3)])
def test_transform_matches_clip_torchvision_pipeline(size):
    transforms = pytest.importorskip("torchvision.transforms")
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    reference = transforms.Compose(
        [
            transforms.Resize(S, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(S),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    torch.testing.assert_close(TRANSFORM(image), reference(image), rtol=0, atol=1e-6)


def test_transform_converts_grayscale_and_palette_to_rgb():
    gray = Image.new("L", (12, 9), 77)
    torch.testing.assert_close(TRANSFORM(gray), expected_pixels((77, 77, 77)), rtol=0, atol=1e-6)
    palette = Image.new("RGB", (12, 9), (10, 128, 250)).convert("P")
    assert TRANSFORM(palette).shape == (3, S, S)


def test_image_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"image_size"):
        image_transform(0, MEAN, STD)
    with pytest.raises(ValueError, match=r"3 each"):
        image_transform(8, (0.5, 0.5), STD)
    with pytest.raises(ValueError, match=r"> 0"):
        image_transform(8, MEAN, (0.5, 0.0, 0.5))


def test_transform_for_backbone_feeds_the_backbone(tmp_path, hf_backbone):
    size = hf_backbone.image_size
    paths = [write_image(tmp_path / f"{i}.png", colour_of(i), (size + 9, size + 3)) for i in range(2)]
    data = ImageListDataset(paths, [0, 1], ["a", "b"], transform=transform_for(hf_backbone), root=tmp_path)
    pixel_values = torch.stack([data[i]["pixel_values"] for i in range(2)])
    assert pixel_values.shape == (2, 3, size, size)
    mean = torch.tensor(hf_backbone.image_mean)[:, None, None]
    std = torch.tensor(hf_backbone.image_std)[:, None, None]
    c = torch.tensor(colour_of(1), dtype=torch.float32)[:, None, None] / 255
    torch.testing.assert_close(pixel_values[1], ((c - mean) / std).expand(3, size, size), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert hf_backbone.encode_image(pixel_values).shape == (2, hf_backbone.embed_dim)
    with pytest.raises(TypeError, match=r"image_mean"):
        transform_for(object())


# ----------------------------------------------------------------------------------------------------------------
# CoOp / Dassl split files
# ----------------------------------------------------------------------------------------------------------------
COOP_CLASSES = ["abyssinian", "beagle", "boxer"]


def make_coop(tmp_path: Path) -> tuple[Path, Path, dict]:
    image_dir = tmp_path / "tiny" / "images"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    counts = {"train": 4, "val": 1, "test": 2}
    n = 0
    for subset, per_class in counts.items():
        for label, name in enumerate(COOP_CLASSES):
            for j in range(per_class):
                rel = f"{name}/{name}_{subset}_{j}.jpg"
                write_image(image_dir / rel, colour_of(n), (40, 30))
                split[subset].append([rel, label, name])
                n += 1
    split_file = tmp_path / "tiny" / "split_zhou_Tiny.json"
    split_file.write_text(json.dumps(split))
    return split_file, image_dir, split


def test_coop_split_contents_and_items(tmp_path):
    split_file, image_dir, split = make_coop(tmp_path)
    for subset in ("train", "val", "test"):
        data = load_coop_split(split_file, image_dir, subset, transform=TRANSFORM)
        assert len(data) == len(split[subset])
        assert data.classnames == COOP_CLASSES
        assert data.labels == [label for _, label, _ in split[subset]]
        assert data.paths == [image_dir / rel for rel, _, _ in split[subset]]
    item = data[3]
    assert set(item) == {"pixel_values", "labels"}
    assert item["pixel_values"].shape == (3, S, S) and item["labels"] == split["test"][3][1]

    train = load_coop_split(split_file, image_dir, "train", transform=TRANSFORM)
    idx = sample_few_shot(train.labels, k=2, seed=1)
    assert Counter(train.labels[i] for i in idx) == {0: 2, 1: 2, 2: 2}
    few = train.subset(idx)
    assert len(few) == 6 and few.classnames == COOP_CLASSES
    assert few.labels == [train.labels[i] for i in idx]


def test_coop_png_item_is_exactly_normalised(tmp_path):
    image_dir = tmp_path / "images"
    write_image(image_dir / "x.png", (200, 3, 90), (30, 40))
    split_file = tmp_path / "split_zhou_Tiny.json"
    split_file.write_text(json.dumps({"train": [["x.png", 0, "cat"]], "val": [], "test": []}))
    item = load_coop_split(split_file, image_dir, transform=TRANSFORM)[0]
    torch.testing.assert_close(item["pixel_values"], expected_pixels((200, 3, 90)), rtol=0, atol=1e-6)


def test_coop_errors_name_the_path(tmp_path):
    split_file, image_dir, split = make_coop(tmp_path)
    missing = tmp_path / "split_zhou_Nope.json"
    with pytest.raises(FileNotFoundError, match=r"split_zhou_Nope.json"):
        load_coop_split(missing, image_dir)
    with pytest.raises(FileNotFoundError, match=r"no_images"):
        load_coop_split(split_file, tmp_path / "no_images")
    with pytest.raises(ValueError, match=r"unknown split 'validation'; valid: test, train, val"):
        load_coop_split(split_file, image_dir, "validation")

    def rewrite(data) -> Path:
        path = tmp_path / "split_zhou_Bad.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    with pytest.raises(ValueError, match=r"split_zhou_Bad.json.*not valid JSON"):
        load_coop_split(rewrite('{"train": [['), image_dir)
    with pytest.raises(ValueError, match=r"split_zhou_Bad.json.*keys 'train', 'val' and 'test'.*\['test', 'train'\]"):
        load_coop_split(rewrite({"train": split["train"], "test": split["test"]}), image_dir)
    with pytest.raises(ValueError, match=r"train\[1\].*\[relative_image_path"):
        load_coop_split(rewrite({**split, "train": [split["train"][0], ["a.jpg", 0]]}), image_dir)
    with pytest.raises(ValueError, match=r"label 0 both 'abyssinian' and 'cat'"):
        load_coop_split(rewrite({**split, "val": [*split["val"], ["a.jpg", 0, "cat"]]}), image_dir)
    gap = {key: [entry for entry in entries if entry[1] != 1] for key, entries in split.items()}
    with pytest.raises(ValueError, match=r"without gaps \(missing: \[1\]\)"):
        load_coop_split(rewrite(gap), image_dir)
    with pytest.raises(ValueError, match=r"'val'.*is empty"):
        load_coop_split(rewrite({**split, "val": []}), image_dir, "val")

    data = load_coop_split(split_file, image_dir, "test", transform=TRANSFORM)
    gone = image_dir / split["test"][0][0]
    gone.unlink()
    with pytest.raises(FileNotFoundError) as info:
        data[0]
    assert str(gone) in str(info.value) and str(image_dir) in str(info.value)
    gone.write_text("not an image")
    with pytest.raises(ValueError, match=r"not a readable image"):
        data[0]


# ----------------------------------------------------------------------------------------------------------------
# Waterbirds
# ----------------------------------------------------------------------------------------------------------------
# (y, place, split) per image: every group present in train, some in val/test
WATERBIRDS_ROWS = [
    (0, 0, 0),
    (0, 0, 0),
    (0, 1, 0),
    (1, 0, 0),
    (1, 1, 0),
    (1, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
    (0, 1, 2),
    (1, 0, 2),
    (1, 1, 2),
]


def make_waterbirds(tmp_path: Path, header="img_id,img_filename,y,split,place,place_filename") -> Path:
    root = tmp_path / "waterbird_complete95_forest2water2"
    lines = [header]
    for i, (y, place, split) in enumerate(WATERBIRDS_ROWS):
        filename = f"{i:03d}.Bird_{y}/Bird_{i:04d}.jpg"
        write_image(root / filename, colour_of(i))
        lines.append(f"{i + 1},{filename},{y},{split},{place},/{'o/ocean' if place else 'b/bamboo_forest'}/x.jpg")
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_waterbirds_contents_groups_and_items(tmp_path):
    root = make_waterbirds(tmp_path)
    for split_id, split in enumerate(("train", "val", "test")):
        rows = [row for row in WATERBIRDS_ROWS if row[2] == split_id]
        data = load_waterbirds(root, split, transform=TRANSFORM)
        assert len(data) == len(rows)
        assert data.labels == [y for y, _, _ in rows]
        assert data.attributes == [place for _, place, _ in rows]
        assert data.groups == [y * 2 + place for y, place, _ in rows]
    assert data.classnames == ["landbird", "waterbird"] and data.attribute_names == ["land", "water"]
    assert data.group_names == ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
    item = data[1]  # test row (1, 0, 2): a waterbird on land
    assert item["labels"] == 1 and item["attribute"] == 0 and item["groups"] == 2
    assert item["pixel_values"].shape == (3, S, S)
    assert data.paths[1] == root / "009.Bird_1/Bird_0009.jpg"

    train = load_waterbirds(root, "train", transform=TRANSFORM)
    idx = sample_few_shot(train.labels, k=3, seed=0)
    assert Counter(train.labels[i] for i in idx) == {0: 3, 1: 3}


def test_waterbirds_without_place_filename_column(tmp_path):
    root = make_waterbirds(tmp_path, header="img_id,img_filename,y,split,place")
    # the rows still carry a 6th value: csv puts it under the None key, which is ignored
    assert len(load_waterbirds(root, "val", transform=TRANSFORM)) == 2


def test_waterbirds_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        load_waterbirds(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"metadata.csv"):
        load_waterbirds(tmp_path)
    root = make_waterbirds(tmp_path, header="img_id,img_filename,y,split,background")
    with pytest.raises(
        ValueError, match=r"metadata.csv.*lacks the column\(s\) place.*img_id,img_filename,y,split,place"
    ):
        load_waterbirds(root)
    with pytest.raises(ValueError, match=r"unknown split 'dev'"):
        load_waterbirds(root, "dev")

    root = make_waterbirds(tmp_path / "b")
    text = (root / "metadata.csv").read_text().replace(",0,2,", ",0,7,", 1)  # split 7 on row (0, 1, 2)
    (root / "metadata.csv").write_text(text)
    with pytest.raises(ValueError, match=r"metadata.csv, line \d+: column 'split' must be one of \(0, 1, 2\)"):
        load_waterbirds(root)

    root = make_waterbirds(tmp_path / "c")
    header, *rows = (root / "metadata.csv").read_text().splitlines()
    kept = [row for row in rows if row.split(",")[3] != "2"]  # no test rows
    assert len(kept) == sum(1 for row in WATERBIRDS_ROWS if row[2] != 2)
    (root / "metadata.csv").write_text("\n".join([header, *kept]) + "\n")
    with pytest.raises(ValueError, match=r"'test'.*no rows"):
        load_waterbirds(root, "test")

    data = load_waterbirds(root, "val", transform=TRANSFORM)
    data.paths[0].unlink()
    with pytest.raises(FileNotFoundError) as info:
        data[0]
    assert str(data.paths[0]) in str(info.value) and str(root) in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# CelebA
# ----------------------------------------------------------------------------------------------------------------
CELEBA_ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Young"]
# (blond, male, young, partition) per image, values in the file's -1/1 convention
CELEBA_ROWS = [
    (1, -1, 1, 0),
    (1, 1, 1, 0),
    (-1, -1, -1, 0),
    (-1, 1, 1, 0),
    (-1, 1, -1, 0),
    (1, -1, -1, 1),
    (-1, 1, 1, 1),
    (1, 1, -1, 2),
    (-1, -1, 1, 2),
]


def make_celeba(tmp_path: Path) -> Path:
    root = tmp_path / "celeba"
    attr = [f"{len(CELEBA_ROWS)}", " ".join(CELEBA_ATTRS) + " "]  # the official file has a trailing space
    partition = []
    for i, (blond, male, young, part) in enumerate(CELEBA_ROWS):
        name = f"{i + 1:06d}.jpg"
        write_image(root / "img_align_celeba" / name, colour_of(i), (17, 21))
        values = [-1, blond, male, young]
        attr.append(name + " " + " ".join(f"{v:2d}" for v in values))  # "-1  1" spacing as in the release
        partition.append(f"{name} {part}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root


def test_celeba_contents_groups_and_items(tmp_path):
    root = make_celeba(tmp_path)
    for part, split in enumerate(("train", "val", "test")):
        rows = [row for row in CELEBA_ROWS if row[3] == part]
        data = load_celeba(root, split=split, transform=TRANSFORM)
        assert len(data) == len(rows)
        assert data.labels == [int(b == 1) for b, _, _, _ in rows]
        assert data.attributes == [int(m == 1) for _, m, _, _ in rows]
        assert data.groups == [int(b == 1) * 2 + int(m == 1) for b, m, _, _ in rows]
    assert data.classnames == ["not blond hair", "blond hair"]
    assert data.attribute_names == ["not male", "male"]
    assert data.group_names == [
        "not blond hair, not male",
        "not blond hair, male",
        "blond hair, not male",
        "blond hair, male",
    ]
    item = data[0]  # (1, 1, -1, 2): blond male
    assert (item["labels"], item["attribute"], item["groups"]) == (1, 1, 3)
    assert item["pixel_values"].shape == (3, S, S)
    assert data.paths == [root / "img_align_celeba" / "000008.jpg", root / "img_align_celeba" / "000009.jpg"]

    young = load_celeba(root, target="Young", spurious="Blond_Hair", split="train", transform=TRANSFORM)
    assert young.labels == [1, 1, 0, 1, 0] and young.attributes == [1, 1, 0, 0, 0]
    assert young.classnames == ["not young", "young"] and young.attribute_names == ["not blond hair", "blond hair"]
    idx = sample_few_shot(young.labels, k=2, seed=3)
    assert Counter(young.labels[i] for i in idx) == {0: 2, 1: 2}


def test_celeba_errors_name_the_path(tmp_path):
    root = make_celeba(tmp_path)
    with pytest.raises(ValueError, match=r"unknown CelebA attribute 'Blond_hair'.*Male.*Did you mean 'Blond_Hair'"):
        load_celeba(root, target="Blond_hair")
    with pytest.raises(ValueError, match=r"different attributes"):
        load_celeba(root, target="Male", spurious="Male")
    with pytest.raises(ValueError, match=r"unknown split 'training'"):
        load_celeba(root, split="training")

    attr = root / "list_attr_celeba.txt"
    good = attr.read_text()
    lines = good.splitlines()
    attr.write_text("\n".join([*lines[:4], lines[4].rsplit(" ", 1)[0], *lines[5:]]) + "\n")
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt, line 5: expected a file name and 4 values"):
        load_celeba(root)
    attr.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt.*announces 9 images but lists 8"):
        load_celeba(root)
    attr.write_text(good.replace("000003.jpg -1 -1", "000003.jpg -1  2", 1))
    with pytest.raises(ValueError, match=r"line 5: attribute 'Blond_Hair' must be -1 or 1; got '2'"):
        load_celeba(root)
    attr.write_text(good)

    (root / "list_eval_partition.txt").rename(root / "moved.txt")
    with pytest.raises(FileNotFoundError, match=r"list_eval_partition.txt.*img_align_celeba"):
        load_celeba(root)
    (root / "moved.txt").rename(root / "list_eval_partition.txt")
    (root / "img_align_celeba").rename(root / "images")
    with pytest.raises(FileNotFoundError, match=r"CelebA image folder.*img_align_celeba"):
        load_celeba(root)


# ----------------------------------------------------------------------------------------------------------------
# DomainBed folders
# ----------------------------------------------------------------------------------------------------------------
PACS = {
    "photo": {"dog": 2, "elephant": 1, "guitar": 2},
    "art_painting": {"dog": 1, "elephant": 2, "guitar": 1},
    "sketch": {"dog": 3, "elephant": 1, "guitar": 1},
}
EXTENSIONS = [".jpg", ".PNG", ".jpeg", ".bmp", ".JPG"]


def make_domainbed(tmp_path: Path, layout=PACS) -> Path:
    root = tmp_path / "PACS"
    n = 0
    for domain, classes in layout.items():
        for classname, count in classes.items():
            folder = root / domain / classname
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                write_image(folder / f"pic_{j:03d}{EXTENSIONS[n % len(EXTENSIONS)]}", colour_of(n), (12, 9))
                n += 1
            (folder / "notes.txt").write_text("not an image")
            (folder / ".hidden.jpg").write_text("not an image either")
    (root / ".cache").mkdir(parents=True, exist_ok=True)  # hidden folders are not domains
    return root


def test_domainbed_contents_and_items(tmp_path):
    root = make_domainbed(tmp_path)
    data = load_domainbed(root, transform=TRANSFORM)
    domains = sorted(PACS)
    classes = ["dog", "elephant", "guitar"]
    assert data.domain_names == domains and data.classnames == classes
    expected = [
        (d, c) for d, domain in enumerate(domains) for c, name in enumerate(classes) for _ in range(PACS[domain][name])
    ]
    assert len(data) == len(expected) == 14
    assert list(zip(data.domains, data.labels, strict=True)) == expected
    assert all(path.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"} for path in data.paths)
    assert all(path.parent.name == classes[y] for path, y in zip(data.paths, data.labels, strict=True))
    item = data[len(data) - 1]
    assert set(item) == {"pixel_values", "labels", "domains"}
    assert item["pixel_values"].shape == (3, S, S) and (item["labels"], item["domains"]) == (2, 2)

    two = load_domainbed(root, ["sketch", "photo"], transform=TRANSFORM)
    assert two.domain_names == ["sketch", "photo"] and len(two) == 5 + 5
    assert two.domains == [0] * 5 + [1] * 5

    idx = sample_few_shot(data.labels, k=3, seed=0)
    assert Counter(data.labels[i] for i in idx) == {0: 3, 1: 3, 2: 3}


def test_split_by_domain(tmp_path):
    data = load_domainbed(make_domainbed(tmp_path), transform=TRANSFORM)
    train, tests = split_by_domain(data, ["sketch", "art_painting"])
    assert list(tests) == ["sketch", "art_painting"]
    assert set(train.domains) == {data.domain_names.index("photo")} and len(train) == 5
    assert set(tests["sketch"].domains) == {data.domain_names.index("sketch")} and len(tests["sketch"]) == 5
    assert len(tests["art_painting"]) == 4
    for part in (train, *tests.values()):
        assert part.classnames == data.classnames and part.domain_names == data.domain_names
        for i in range(len(part)):
            j = data.paths.index(part.paths[i])
            assert (part.labels[i], part.domains[i]) == (data.labels[j], data.domains[j])
    assert train[0]["domains"] == data.domain_names.index("photo")
    single_train, single = split_by_domain(data, "photo")
    assert list(single) == ["photo"] and len(single_train) == 9

    with pytest.raises(ValueError, match=r"unknown test domain 'sketches'.*Did you mean 'sketch'"):
        split_by_domain(data, ["sketches"])
    with pytest.raises(ValueError, match=r"leave at least one"):
        split_by_domain(data, sorted(PACS))
    with pytest.raises(ValueError, match=r"no domain ids"):
        split_by_domain(ImageListDataset(data.paths[:1], [0], data.classnames, transform=TRANSFORM), "photo")


def test_domainbed_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*<domain>/<class>/<image>"):
        load_domainbed(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*no domain folders"):
        load_domainbed(tmp_path / "empty")

    layout = {**PACS, "cartoon": {"dog": 1, "guitar": 1}}
    root = make_domainbed(tmp_path / "a", layout)
    with pytest.raises(ValueError, match=r"domain 'cartoon' \(.*cartoon\) lacks the class folder\(s\) elephant"):
        load_domainbed(root)
    data = load_domainbed(root, ["photo", "sketch"], transform=TRANSFORM)  # dropping the domain works
    assert data.domain_names == ["photo", "sketch"]
    with pytest.raises(ValueError, match=r"unknown domain folder in .*'skech'.*Did you mean 'sketch'"):
        load_domainbed(root, ["skech"])
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        load_domainbed(root, "photo")

    root = make_domainbed(tmp_path / "b", {**PACS, "cartoon": {"dog": 0, "elephant": 0, "guitar": 0}})
    with pytest.raises(ValueError, match=r"domain 'cartoon'.*holds no images"):
        load_domainbed(root)

    data = load_domainbed(make_domainbed(tmp_path / "c"), transform=TRANSFORM)
    data.paths[2].unlink()
    with pytest.raises(FileNotFoundError) as info:
        data[2]
    assert str(data.paths[2]) in str(info.value) and str(tmp_path / "c" / "PACS") in str(info.value)


def test_image_list_dataset_checks_its_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"empty"):
        ImageListDataset([], [], ["a"], transform=TRANSFORM, root=tmp_path)
    with pytest.raises(ValueError, match=r"labels ids \[2\]"):
        ImageListDataset(["x.png"], [2], ["a", "b"], transform=TRANSFORM, root=tmp_path)
    data = ImageListDataset([write_image(tmp_path / "x.png")], [1], ["a", "b"], transform=TRANSFORM, root=tmp_path)
    with pytest.raises(IndexError):
        data[1]
    assert data[-1]["labels"] == 1
