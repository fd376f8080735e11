"""The datasets of the seed papers' tables, where each lives under ``--data-root`` and how it is read.

The folder names are those of CoOp's ``DATASETS.md`` (its ``$DATA``), read by the loaders of
:mod:`prompt_robust.data` (see ``docs/datasets.md``); a dataset is *present* when the files its loader needs first
exist, and the runner says which file it looked for when one is not. FGVCAircraft has no CoOp split file (CoOp reads
the benchmark's own ``images_variant_*.txt`` lists): :func:`prompt_robust.data.load_fgvc_aircraft` reads those.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.imagenet import load_imagenet, load_imagenet_a, load_imagenet_r, load_imagenet_sketch, load_imagenet_v2
from ..data.loaders import ImageListDataset, load_celeba, load_coop_split, load_fgvc_aircraft, load_waterbirds

__all__ = [
    "BASE_TO_NEW",
    "CROSS_DATASET_TARGETS",
    "DATASETS",
    "DG_TARGETS",
    "SPURIOUS",
    "DatasetSpec",
]

Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the tables: its folder under the data root and how to read a split.

    Attributes:
        name: the name used in results and on the command line (CoOp's dataset config name).
        title: the name in the papers' tables.
        needs: paths under the data root the loader reads first; any one of the alternatives in a tuple will do.
        read: ``(data_root, split, transform) -> ImageListDataset``.
        template: the hand-written prompt zero-shot CLIP uses on it (CoOp's ``trainers/zsclip.py``).
        attribute_values: words naming the spurious attribute's values in the dataset's order (spurious sets).
        docs: the page and section of ``docs/`` that shows the layout.
        folders: its folder(s) under the data root.
    """

    name: str
    title: str
    needs: tuple[tuple[str, ...], ...]
    read: Callable[[Path, str, Transform | None], ImageListDataset]
    template: str = "a photo of a {}."
    attribute_values: tuple[str, ...] = ()
    docs: str = ""
    folders: tuple[str, ...] = field(default=())

    def missing(self, root: str | os.PathLike) -> str | None:
        """None when the dataset is present under ``root``; else one line naming what was looked for."""
        root = Path(root)
        for alternatives in self.needs:
            if not any((root / path).exists() for path in alternatives):
                wanted = " or ".join(str(root / path) for path in alternatives)
                return f"{self.name} ({self.title}): no {wanted} (layout: docs/{self.docs})"
        return None

    def load(self, root: str | os.PathLike, split: str, transform: Transform | None = None) -> ImageListDataset:
        """Split ``split`` (``train`` or ``test``) of the dataset under ``root``."""
        return self.read(Path(root), split, transform)


def _coop(folder: str, split_file: str, image_dir: str) -> Callable[[Path, str, Transform | None], ImageListDataset]:
    def read(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
        return load_coop_split(root / folder / split_file, root / folder / image_dir, split, transform=transform)

    return read


def _coop_spec(name: str, title: str, folder: str, split_file: str, image_dir: str, template: str) -> DatasetSpec:
    return DatasetSpec(
        name,
        title,
        needs=((f"{folder}/{split_file}",), (f"{folder}/{image_dir}" if image_dir != "." else folder,)),
        read=_coop(folder, split_file, image_dir),
        template=template,
        docs="datasets.md#coop-split-files-base-to-new-and-few-shot-datasets",
        folders=(folder,),
    )


# --------------------------------------------------------------------------------------------------------------
# FGVCAircraft (CoOp reads the benchmark's own lists)
# --------------------------------------------------------------------------------------------------------------
def _fgvc(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
    return load_fgvc_aircraft(root / "fgvc_aircraft", split, transform=transform)


def _imagenet(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
    return load_imagenet(root, split, transform=transform)


def _shifted(loader: Callable[..., ImageListDataset]) -> Callable[[Path, str, Transform | None], ImageListDataset]:
    def read(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
        if split != "test":
            raise ValueError(f"the ImageNet variants are test sets; asked for split {split!r}.")
        return loader(root, transform=transform)

    return read


_WATERBIRDS_FOLDERS = ("waterbird_complete95_forest2water2", "waterbirds")
_CELEBA_FOLDERS = ("celeba", "CelebA")


def _first_folder(root: Path, folders: Sequence[str], marker: str) -> Path:
    return next((root / f for f in folders if (root / f / marker).exists()), root / folders[0])


def _waterbirds(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
    return load_waterbirds(_first_folder(root, _WATERBIRDS_FOLDERS, "metadata.csv"), split, transform=transform)


def _celeba(root: Path, split: str, transform: Transform | None) -> ImageListDataset:
    folder = _first_folder(root, _CELEBA_FOLDERS, "list_attr_celeba.txt")
    return load_celeba(folder, "Blond_Hair", "Male", split, transform=transform)


_IMAGENET_NEEDS = (("imagenet/images/train",), ("imagenet/images/val",), ("imagenet/classnames.txt",))
_SHIFT_DOCS = "datasets.md#imagenet-v2-imagenet-sketch-imagenet-a-imagenet-r"

#: every dataset by name, in the order of CoCoOp's tables
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "imagenet", "ImageNet", _IMAGENET_NEEDS, _imagenet, docs="datasets.md#imagenet", folders=("imagenet",)
        ),
        _coop_spec(
            "caltech101",
            "Caltech101",
            "caltech-101",
            "split_zhou_Caltech101.json",
            "101_ObjectCategories",
            "a photo of a {}.",
        ),
        _coop_spec(
            "oxford_pets",
            "OxfordPets",
            "oxford_pets",
            "split_zhou_OxfordPets.json",
            "images",
            "a photo of a {}, a type of pet.",
        ),
        _coop_spec(
            "stanford_cars", "StanfordCars", "stanford_cars", "split_zhou_StanfordCars.json", ".", "a photo of a {}."
        ),
        _coop_spec(
            "oxford_flowers",
            "Flowers102",
            "oxford_flowers",
            "split_zhou_OxfordFlowers.json",
            "jpg",
            "a photo of a {}, a type of flower.",
        ),
        _coop_spec(
            "food101", "Food101", "food-101", "split_zhou_Food101.json", "images", "a photo of {}, a type of food."
        ),
        DatasetSpec(
            "fgvc_aircraft",
            "FGVCAircraft",
            (("fgvc_aircraft/variants.txt",), ("fgvc_aircraft/images",)),
            _fgvc,
            template="a photo of a {}, a type of aircraft.",
            docs="reproduce.md#fgvcaircraft",
            folders=("fgvc_aircraft",),
        ),
        _coop_spec("sun397", "SUN397", "sun397", "split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
        _coop_spec("dtd", "DTD", "dtd", "split_zhou_DescribableTextures.json", "images", "{} texture."),
        _coop_spec(
            "eurosat", "EuroSAT", "eurosat", "split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {}."
        ),
        _coop_spec(
            "ucf101",
            "UCF101",
            "ucf101",
            "split_zhou_UCF101.json",
            "UCF-101-midframes",
            "a photo of a person doing {}.",
        ),
        DatasetSpec(
            "imagenetv2",
            "ImageNet-V2",
            (
                ("imagenetv2/imagenetv2-matched-frequency-format-val",),
                ("imagenet/classnames.txt", "imagenetv2/classnames.txt"),
            ),
            _shifted(load_imagenet_v2),
            docs=_SHIFT_DOCS,
            folders=("imagenetv2",),
        ),
        DatasetSpec(
            "imagenet-sketch",
            "ImageNet-Sketch",
            (("imagenet-sketch/images",), ("imagenet/classnames.txt", "imagenet-sketch/classnames.txt")),
            _shifted(load_imagenet_sketch),
            docs=_SHIFT_DOCS,
            folders=("imagenet-sketch",),
        ),
        DatasetSpec(
            "imagenet-a",
            "ImageNet-A",
            (("imagenet-adversarial/imagenet-a",), ("imagenet/classnames.txt", "imagenet-adversarial/classnames.txt")),
            _shifted(load_imagenet_a),
            docs=_SHIFT_DOCS,
            folders=("imagenet-adversarial",),
        ),
        DatasetSpec(
            "imagenet-r",
            "ImageNet-R",
            (("imagenet-rendition/imagenet-r",), ("imagenet/classnames.txt", "imagenet-rendition/classnames.txt")),
            _shifted(load_imagenet_r),
            docs=_SHIFT_DOCS,
            folders=("imagenet-rendition",),
        ),
        DatasetSpec(
            "waterbirds",
            "Waterbirds",
            (tuple(f"{folder}/metadata.csv" for folder in _WATERBIRDS_FOLDERS),),
            _waterbirds,
            # the loader's attribute order: place 0 = land, 1 = water
            attribute_values=("land background", "water background"),
            docs="datasets.md#waterbirds",
            folders=_WATERBIRDS_FOLDERS,
        ),
        DatasetSpec(
            "celeba",
            "CelebA",
            (tuple(f"{folder}/list_attr_celeba.txt" for folder in _CELEBA_FOLDERS),),
            _celeba,
            # the loader's attribute order for Male: 0 = not male, 1 = male
            attribute_values=("female", "male"),
            docs="datasets.md#celeba",
            folders=_CELEBA_FOLDERS,
        ),
    )
}

#: base-to-new generalisation: the 11 datasets of CoCoOp's Table 1, in its order
BASE_TO_NEW = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
#: cross-dataset transfer: trained on ImageNet, tested on the other ten (CoCoOp's Table 2)
CROSS_DATASET_TARGETS = BASE_TO_NEW[1:]
#: domain generalisation: trained on ImageNet, tested on its four shifted sets (CoCoOp's Table 3)
DG_TARGETS = ("imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r")
#: spurious correlations (the debiasing papers' benchmarks)
SPURIOUS = ("waterbirds", "celeba")
