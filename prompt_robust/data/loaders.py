"""Real datasets in the on-disk layouts their users already have.

Every loader returns an :class:`ImageListDataset`: a map-style dataset whose items are dicts

* ``"pixel_values"``: ``(3, S, S)`` float tensor, normalised with the backbone's mean/std;
* ``"labels"``: class index (int);
* ``"groups"`` / ``"attribute"`` (Waterbirds, CelebA) or ``"domains"`` (DomainBed folders) when the layout has them.

Labels and group/domain ids are also lists on the dataset (``dataset.labels``, ``dataset.groups``, ...), so
few-shot splits and group statistics never have to open an image. Images are read lazily in ``__getitem__``.

Supported layouts (the public formats, read as they are distributed):

* CoOp/Dassl split files ``split_zhou_<Dataset>.json`` (Zhou et al., "Learning to Prompt for Vision-Language
  Models", https://arxiv.org/abs/2109.01134): :func:`load_coop_split`;
* Waterbirds ``metadata.csv`` (Sagawa et al., "Distributionally Robust Neural Networks",
  https://arxiv.org/abs/1911.08731): :func:`load_waterbirds`;
* CelebA ``list_attr_celeba.txt`` + ``list_eval_partition.txt`` + ``img_align_celeba/``
  (Liu et al., "Deep Learning Face Attributes in the Wild", https://arxiv.org/abs/1411.7766): :func:`load_celeba`;
* DomainBed image folders ``<root>/<domain>/<class>/<image>`` (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet;
  Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", https://arxiv.org/abs/2007.01434):
  :func:`load_domainbed` and :func:`split_by_domain`.

Preprocessing follows CLIP (resize the shorter side with bicubic interpolation, centre crop, normalise) and is
implemented with Pillow and torch only: torchvision is not a dependency.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._io import read_json
from ..config import unknown_name_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageListDataset",
    "image_transform",
    "load_celeba",
    "load_coop_split",
    "load_domainbed",
    "load_fgvc_aircraft",
    "load_waterbirds",
    "split_by_domain",
    "transform_for",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: file extensions (compared case-insensitively) read as images in DomainBed folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# CLIP's own preprocessing, used when no transform is given (ViT-B/16 at 224 px, OpenAI statistics).
_DEFAULT_IMAGE_SIZE = 224

_COOP_LAYOUT = (
    "a CoOp/Dassl split file split_zhou_<Dataset>.json holding "
    '{"train": [[relative_image_path, label, classname], ...], "val": [...], "test": [...]} '
    "and an image directory the relative paths are joined to"
)
_WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place")
_WATERBIRDS_REQUIRED = ("img_filename", "y", "split", "place")
_WATERBIRDS_LAYOUT = (
    "<root>/metadata.csv with columns img_id,img_filename,y,split,place (split 0/1/2 = train/val/test; an extra "
    "place_filename column is ignored) and the images at <root>/<img_filename>"
)
_CELEBA_LAYOUT = (
    "<root>/list_attr_celeba.txt (line 1: image count, line 2: attribute names, then '<file> v1 v2 ...' with "
    "values -1/1), <root>/list_eval_partition.txt ('<file> 0|1|2' = train/val/test) and the images in "
    "<root>/img_align_celeba/"
)
_DOMAINBED_LAYOUT = "<root>/<domain>/<class>/<image> with image extensions " + "/".join(
    ext[1:] for ext in IMAGE_EXTENSIONS
)


def _pil_image():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow ships with transformers' vision extras
        raise ImportError(
            "reading image files needs Pillow; install it with `pip install pillow`.",
        ) from err
    return Image


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
class _ClipTransform:
    """PIL image -> ``(3, S, S)`` normalised tensor; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image) -> torch.Tensor:
        Image = _pil_image()
        size = self.image_size
        # RGB first: palette and 1-bit images would otherwise be resized with nearest-neighbour.
        image = image.convert("RGB")
        width, height = image.size
        # shorter side -> size, longer side scaled and truncated (the rule of CLIP's torchvision Resize(size))
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # round() is half-to-even, as in torchvision's CenterCrop
        top = round((new_h - size) / 2.0)
        left = round((new_w - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
        array = np.array(image, dtype=np.uint8)  # (S, S, 3), a writable copy
        pixels = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div(255)  # (3, S, S) in [0, 1]
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def __repr__(self) -> str:
        return f"image_transform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    """CLIP preprocessing for PIL images: resize the shorter side to ``image_size`` (bicubic), centre-crop a
    square, scale to [0, 1] and normalise per channel. Equal to CLIP's torchvision pipeline
    (``Resize(S, BICUBIC), CenterCrop(S), ToTensor(), Normalize(mean, std)``) without needing torchvision.

    Args:
        image_size: side ``S`` of the output square.
        mean: per-channel mean (3 values, on the [0, 1] scale).
        std: per-channel standard deviation (3 positive values).

    Returns:
        A picklable callable mapping a PIL image (any mode; converted to RGB) to a ``(3, S, S)`` float tensor.

    Example:
        >>> from PIL import Image
        >>> transform = image_transform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> transform(Image.new("RGB", (40, 30), (255, 0, 255))).shape
        torch.Size([3, 16, 16])
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1; got {image_size!r}.")
    mean, std = list(mean), list(std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel (3 each); got {mean!r} and {std!r}.")
    if any(not s > 0 for s in std):
        raise ValueError(f"std values must be > 0; got {std!r}.")
    return _ClipTransform(image_size, mean, std)


def transform_for(backbone: Any) -> Callable[[Any], torch.Tensor]:
    """The :func:`image_transform` a backbone expects (its ``image_size``, ``image_mean`` and ``image_std``).

    Args:
        backbone: a :class:`~prompt_robust.backbones.ClipBackbone` (or any object with those three attributes).

    Example:
        >>> train = load_waterbirds("data/waterbirds", transform=transform_for(backbone))  # doctest: +SKIP
    """
    missing = [name for name in ("image_size", "image_mean", "image_std") if not hasattr(backbone, name)]
    if missing:
        raise TypeError(
            f"{type(backbone).__name__} has no {', '.join(missing)}; pass a ClipBackbone, or build the transform "
            "with image_transform(image_size, mean, std)."
        )
    return image_transform(int(backbone.image_size), backbone.image_mean, backbone.image_std)


def _default_transform() -> Callable[[Any], torch.Tensor]:
    from ..backbones.hf_clip import OPENAI_MEAN, OPENAI_STD

    return image_transform(_DEFAULT_IMAGE_SIZE, OPENAI_MEAN, OPENAI_STD)


# --------------------------------------------------------------------------------------------------------------
# The common dataset
# --------------------------------------------------------------------------------------------------------------
def _check_ids(what: str, values: Sequence[int], names: Sequence[str] | None, n: int, source: str) -> list[int]:
    values = [int(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries but there are {n} images ({source}).")
    if names is not None:
        bad = sorted({v for v in values if not 0 <= v < len(names)})
        if bad:
            raise ValueError(f"{what} ids {bad[:10]} are outside 0..{len(names) - 1} ({len(names)} names; {source}).")
    return values


class ImageListDataset(Dataset):
    """Images listed on disk with their labels (and group, attribute or domain ids), read lazily.

    Items are dicts ``{"pixel_values": (3, S, S), "labels": int}`` plus ``"groups"`` and ``"attribute"`` when
    ``groups``/``attributes`` are given and ``"domains"`` when ``domains`` is given.

    Args:
        paths: image file of each example.
        labels: class index of each example, in ``0..len(classnames) - 1``.
        classnames: class names, indexed by label.
        transform: PIL image -> tensor (see :func:`image_transform`, :func:`transform_for`); CLIP's own 224 px
            preprocessing with OpenAI statistics when None.
        root: directory the images live under (named in error messages).
        source: where the list came from, e.g. the split or metadata file (named in error messages).
        groups / group_names: group id of each example and the names of the groups.
        attributes / attribute_names: spurious-attribute id of each example and the attribute's value names.
        domains / domain_names: domain id of each example and the domain names.

    Example:
        >>> data = ImageListDataset(["a.png", "b.png"], [0, 1], ["cat", "dog"], root=".")  # doctest: +SKIP
        >>> data[0]["pixel_values"].shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        classnames: Sequence[str],
        *,
        transform: Callable[[Any], torch.Tensor] | None = None,
        root: str | os.PathLike = "",
        source: str = "",
        groups: Sequence[int] | None = None,
        group_names: Sequence[str] | None = None,
        attributes: Sequence[int] | None = None,
        attribute_names: Sequence[str] | None = None,
        domains: Sequence[int] | None = None,
        domain_names: Sequence[str] | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.root = Path(root)
        self.source = source or str(root)
        where = f"source {self.source}"
        if not self.paths:
            raise ValueError(f"the dataset is empty: no images listed ({where}). Check the split and the layout.")
        n = len(self.paths)
        self.classnames = [str(c) for c in classnames]
        self.labels = _check_ids("labels", labels, self.classnames, n, where)
        self.transform = transform if transform is not None else _default_transform()
        self.group_names = list(group_names) if group_names is not None else None
        self.groups = _check_ids("groups", groups, self.group_names, n, where) if groups is not None else None
        self.attribute_names = list(attribute_names) if attribute_names is not None else None
        self.attributes = (
            _check_ids("attributes", attributes, self.attribute_names, n, where) if attributes is not None else None
        )
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.domains = _check_ids("domains", domains, self.domain_names, n, where) if domains is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int):
        """The PIL image (RGB) of example ``index``, read from disk."""
        Image = _pil_image()
        path = self.paths[index]
        if not path.is_file():
            raise FileNotFoundError(
                f"image {str(path)!r} (example {index}, listed in {self.source}) does not exist under the image "
                f"root {str(self.root)!r}. Check that the images were extracted there completely."
            )
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as err:  # PIL.UnidentifiedImageError and truncated files are OSErrors
            raise ValueError(
                f"image {str(path)!r} (example {index}, listed in {self.source}) is not a readable image ({err})."
            ) from err

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images.")
        index = index % len(self)
        item: dict[str, Any] = {"pixel_values": self.transform(self.load_image(index)), "labels": self.labels[index]}
        if self.groups is not None:
            item["groups"] = self.groups[index]
        if self.attributes is not None:
            item["attribute"] = self.attributes[index]
        if self.domains is not None:
            item["domains"] = self.domains[index]
        return item

    def subset(self, indices: Iterable[int]) -> ImageListDataset:
        """A new dataset with the examples at ``indices``; class, group, attribute and domain names are kept.

        Args:
            indices: positions in this dataset.

        Example:
            >>> few = dataset.subset(sample_few_shot(dataset.labels, k=16, seed=1))  # doctest: +SKIP
        """
        picked = [int(i) for i in indices]
        bad = [i for i in picked if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"subset indices {bad[:10]} are out of range for a dataset of {len(self)} images.")

        def take(values: list[int] | None) -> list[int] | None:
            return None if values is None else [values[i] for i in picked]

        return ImageListDataset(
            [self.paths[i] for i in picked],
            [self.labels[i] for i in picked],
            self.classnames,
            transform=self.transform,
            root=self.root,
            source=self.source,
            groups=take(self.groups),
            group_names=self.group_names,
            attributes=take(self.attributes),
            attribute_names=self.attribute_names,
            domains=take(self.domains),
            domain_names=self.domain_names,
        )

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={len(values)}"
            for name, values in (
                ("groups", self.group_names),
                ("attributes", self.attribute_names),
                ("domains", self.domain_names),
            )
            if values is not None
        )
        return f"ImageListDataset(n={len(self)}, classes={len(self.classnames)}{extra}, source={self.source!r})"


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the loaders
# --------------------------------------------------------------------------------------------------------------
def _require_dir(path: str | os.PathLike, what: str, layout: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist or is not a directory. Expected layout: {layout}."
        )
    return path


def _require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist. Expected layout: {layout}.")
    return path


def _check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise unknown_name_error("split", split, SPLITS)


def _int_field(value: str, allowed: tuple[int, ...], column: str, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number not in allowed:
        raise ValueError(f"{where}: column {column!r} must be one of {allowed}; got {value!r}.")
    return number


def _inside(base: Path, entry: str, where: str, what: str) -> Path:
    """``base / entry`` for an entry of a metadata or split file, refused when it would leave ``base``.

    The check is on the path's text (an absolute path, or more ``..`` than folders above it), not on where
    symlinks lead: an image folder linked to other storage on purpose still loads, an entry cannot escape.
    """
    normal = os.path.normpath(entry)
    if os.path.isabs(entry) or Path(entry).drive:
        reason = "an absolute path"
    elif normal == ".." or normal.startswith(".." + os.sep):
        reason = "its '..' climb out of it"
    else:
        return base / normal
    raise ValueError(
        f"the {what} {entry!r} ({where}) points outside {str(base)!r} ({reason}); entries must be paths relative "
        f"to {str(base)!r} that stay inside it. Fix that entry, or pass the folder the entries are relative to."
    )


def _readable(name: str) -> str:
    return name.replace("_", " ").lower()


# --------------------------------------------------------------------------------------------------------------
# CoOp / Dassl split files
# --------------------------------------------------------------------------------------------------------------
def _coop_classnames(split_file: Path, data: dict[str, list]) -> list[str]:
    """One name per label over all subsets of the file, labels 0..n-1 contiguous."""
    names: dict[int, str] = {}
    for subset in SPLITS:
        for position, (_, label, classname) in enumerate(data[subset]):
            known = names.setdefault(label, classname)
            if known != classname:
                raise ValueError(
                    f"split file {str(split_file)!r} names label {label} both {known!r} and {classname!r} "
                    f"(at {subset}[{position}]); every label must have exactly one classname."
                )
    expected = list(range(len(names)))
    if sorted(names) != expected:
        missing = sorted(set(expected) - set(names))
        raise ValueError(
            f"split file {str(split_file)!r} has labels {sorted(names)[:20]} but labels must be 0..{len(names) - 1} "
            f"without gaps (missing: {missing[:20]}). Relabel the classes contiguously."
        )
    return [names[label] for label in expected]


def load_coop_split(
    split_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    subset: str = "train",
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ImageListDataset:
    """One subset of a CoOp/Dassl ``split_zhou_<Dataset>.json`` file (the splits CoOp, CoCoOp and MaPLe use for
    OxfordPets, Caltech101, DTD, EuroSAT, Food101, Flowers102, StanfordCars, SUN397, UCF101).

    The file holds ``{"train": [[relative_image_path, label, classname], ...], "val": [...], "test": [...]}``;
    image paths are relative to ``image_dir``. Class names come from the (label, classname) pairs of the whole
    file, so every subset has the same ``classnames``.

    Args:
        split_file: the ``split_zhou_<Dataset>.json`` file.
        image_dir: directory the relative image paths are joined to (e.g. ``oxford_pets/images``).
        subset: ``"train"``, ``"val"`` or ``"test"``.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.

    Returns:
        An :class:`ImageListDataset` with ``labels`` and ``classnames``.

    Raises:
        FileNotFoundError: the split file or the image directory does not exist.
        ValueError: unknown subset, malformed file, inconsistent or non-contiguous labels, empty subset, an image
            path that is absolute or climbs out of ``image_dir`` with ``..``.

    Example:
        >>> train = load_coop_split("oxford_pets/split_zhou_OxfordPets.json", "oxford_pets/images",
        ...                         "train", transform=transform_for(backbone))  # doctest: +SKIP
        >>> train.classnames[:2]  # doctest: +SKIP
        ['abyssinian', 'american_bulldog']
    """
    _check_split_name(subset)
    split_file = _require_file(Path(split_file), "CoOp split file", _COOP_LAYOUT)
    try:
        data = read_json(split_file, what="CoOp split file")
    except ValueError as err:
        raise ValueError(f"{err} Expected {_COOP_LAYOUT}.") from err
    if not isinstance(data, dict) or any(key not in data for key in SPLITS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"CoOp split file {str(split_file)!r} must be a JSON object with keys 'train', 'val' and 'test'; "
            f"found {found}. Expected {_COOP_LAYOUT}."
        )
    for name in SPLITS:
        entries = data[name]
        if not isinstance(entries, list):
            raise ValueError(
                f"CoOp split file {str(split_file)!r}: {name!r} must be a list; got {type(entries).__name__}."
            )
        for position, entry in enumerate(entries):
            ok = (
                isinstance(entry, (list, tuple))
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)
                and isinstance(entry[2], str)
            )
            if not ok:
                raise ValueError(
                    f"CoOp split file {str(split_file)!r}: {name}[{position}] is {entry!r}; every entry must be "
                    "[relative_image_path (str), label (int), classname (str)]."
                )
    classnames = _coop_classnames(split_file, data)
    image_dir = _require_dir(image_dir, "image directory", _COOP_LAYOUT)
    entries = data[subset]
    if not entries:
        raise ValueError(f"subset {subset!r} of CoOp split file {str(split_file)!r} is empty; choose another subset.")
    paths = [
        _inside(image_dir, path, f"CoOp split file {str(split_file)!r}, {subset}[{position}]", "image path")
        for position, (path, _, _) in enumerate(entries)
    ]
    return ImageListDataset(
        paths,
        [label for _, label, _ in entries],
        classnames,
        transform=transform,
        root=image_dir,
        source=f"{split_file} [{subset}]",
    )


# --------------------------------------------------------------------------------------------------------------
# Waterbirds
# --------------------------------------------------------------------------------------------------------------
WATERBIRDS_CLASSNAMES = ["landbird", "waterbird"]
WATERBIRDS_PLACES = ["land", "water"]


def load_waterbirds(
    root: str | os.PathLike,
    split: str = "train",
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ImageListDataset:
    """One split of Waterbirds (CUB birds pasted on Places backgrounds), as distributed with ``metadata.csv``.

    ``metadata.csv`` has the columns ``img_id,img_filename,y,split,place`` (and usually ``place_filename``, which
    is ignored): ``y`` 0/1 = landbird/waterbird, ``place`` 0/1 = land/water background, ``split`` 0/1/2 =
    train/val/test; images are at ``<root>/<img_filename>``. Groups follow group DRO: ``y * 2 + place``.

    Args:
        root: the dataset directory (e.g. ``waterbird_complete95_forest2water2``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.

    Returns:
        An :class:`ImageListDataset` whose items carry ``"groups"`` and ``"attribute"`` (the place);
        ``classnames`` ``["landbird", "waterbird"]``, ``attribute_names`` ``["land", "water"]`` and
        ``group_names`` such as ``"waterbird on land"``.

    Raises:
        FileNotFoundError: ``root`` or ``metadata.csv`` does not exist.
        ValueError: unknown split, missing columns or bad values in the CSV, empty split, an ``img_filename``
            that is absolute or climbs out of ``root`` with ``..``.

    Example:
        >>> test = load_waterbirds("data/waterbirds", "test", transform=transform_for(backbone))  # doctest: +SKIP
        >>> evaluate(model, test, groups_key="groups")["worst_group"]  # doctest: +SKIP
    """
    _check_split_name(split)
    root = _require_dir(root, "Waterbirds root", _WATERBIRDS_LAYOUT)
    metadata = _require_file(root / "metadata.csv", "Waterbirds metadata file", _WATERBIRDS_LAYOUT)
    wanted = SPLITS.index(split)
    paths: list[Path] = []
    labels: list[int] = []
    places: list[int] = []
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in _WATERBIRDS_REQUIRED if c not in columns]
        if missing:
            raise ValueError(
                f"Waterbirds metadata file {str(metadata)!r} lacks the column(s) {', '.join(missing)}; expected "
                f"columns {','.join(_WATERBIRDS_COLUMNS)} (found {','.join(columns) or 'none'})."
            )
        reader.fieldnames = columns
        for row in reader:
            where = f"{metadata}, line {reader.line_num}"
            if any(row.get(c) is None for c in _WATERBIRDS_REQUIRED):
                raise ValueError(f"{where}: the row has fewer fields than the header ({','.join(columns)}).")
            if _int_field(row["split"], (0, 1, 2), "split", where) != wanted:
                continue
            labels.append(_int_field(row["y"], (0, 1), "y", where))
            places.append(_int_field(row["place"], (0, 1), "place", where))
            paths.append(_inside(root, row["img_filename"].strip(), where, "img_filename"))
    if not paths:
        raise ValueError(f"Waterbirds split {split!r} (split == {wanted}) has no rows in {str(metadata)!r}.")
    return ImageListDataset(
        paths,
        labels,
        WATERBIRDS_CLASSNAMES,
        transform=transform,
        root=root,
        source=f"{metadata} [{split}]",
        groups=[y * 2 + place for y, place in zip(labels, places, strict=True)],
        group_names=[f"{bird} on {place}" for bird in WATERBIRDS_CLASSNAMES for place in WATERBIRDS_PLACES],
        attributes=places,
        attribute_names=WATERBIRDS_PLACES,
    )


# --------------------------------------------------------------------------------------------------------------
# CelebA
# --------------------------------------------------------------------------------------------------------------
def _celeba_value(value: str, attribute: str, where: str) -> int:
    # the official file uses -1/1; some re-exports use 0/1
    if value in ("1", "+1"):
        return 1
    if value in ("-1", "0"):
        return 0
    raise ValueError(f"{where}: attribute {attribute!r} must be -1 or 1; got {value!r}.")


def load_celeba(
    root: str | os.PathLike,
    target: str = "Blond_Hair",
    spurious: str = "Male",
    split: str = "train",
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ImageListDataset:
    """One split of CelebA with a binary target attribute and a spurious one (group DRO's Blond_Hair vs Male by
    default), read from the official annotation files.

    ``list_attr_celeba.txt``: line 1 the image count, line 2 the 40 attribute names, then one line per image,
    ``<file> v1 v2 ...`` with values -1/1 (whitespace-separated). ``list_eval_partition.txt``: ``<file> 0|1|2``
    (train/val/test). Images are in ``<root>/img_align_celeba/``. Label = target attribute present,
    attribute = spurious attribute present, group = ``label * 2 + attribute``.

    Args:
        root: directory holding the two annotation files and ``img_align_celeba/``.
        target: attribute used as the class (e.g. ``"Blond_Hair"``).
        spurious: attribute carried as ``"attribute"`` and used to form groups (e.g. ``"Male"``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.

    Returns:
        An :class:`ImageListDataset` with ``classnames`` ``["not blond hair", "blond hair"]``, ``attribute_names``
        ``["not male", "male"]`` and ``group_names`` such as ``"blond hair, male"``.

    Raises:
        FileNotFoundError: a file or the image folder is missing.
        ValueError: unknown attribute or split, malformed annotation lines, empty split, a file name that is
            absolute or climbs out of ``img_align_celeba/`` with ``..``.

    Example:
        >>> test = load_celeba("data/celeba", "Blond_Hair", "Male", "test")  # doctest: +SKIP
        >>> test.group_names  # doctest: +SKIP
        ['not blond hair, not male', 'not blond hair, male', 'blond hair, not male', 'blond hair, male']
    """
    _check_split_name(split)
    root = _require_dir(root, "CelebA root", _CELEBA_LAYOUT)
    attr_file = _require_file(root / "list_attr_celeba.txt", "CelebA attribute file", _CELEBA_LAYOUT)
    partition_file = _require_file(root / "list_eval_partition.txt", "CelebA partition file", _CELEBA_LAYOUT)
    image_dir = _require_dir(root / "img_align_celeba", "CelebA image folder", _CELEBA_LAYOUT)

    lines = attr_file.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise ValueError(
            f"CelebA attribute file {str(attr_file)!r} must start with the image count and a line of attribute "
            f"names; got {lines[:2]!r}. Expected {_CELEBA_LAYOUT}."
        )
    count = int(lines[0])
    names = lines[1].split()
    for attribute in (target, spurious):
        if attribute not in names:
            raise unknown_name_error("CelebA attribute", attribute, names)
    if target == spurious:
        raise ValueError(f"target and spurious must be different attributes; got {target!r} for both.")
    t_col, s_col = names.index(target) + 1, names.index(spurious) + 1

    partition: dict[str, int] = {}
    for line_num, line in enumerate(partition_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{partition_file}, line {line_num}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected '<file> <partition>'; got {line!r}.")
        partition[fields[0]] = _int_field(fields[1], (0, 1, 2), "partition", where)

    wanted = SPLITS.index(split)
    files: list[Path] = []
    labels: list[int] = []
    attributes: list[int] = []
    rows = 0
    for line_num, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        rows += 1
        where = f"{attr_file}, line {line_num}"
        if len(fields) != len(names) + 1:
            raise ValueError(
                f"{where}: expected a file name and {len(names)} values (one per attribute); got {len(fields)} fields."
            )
        name = fields[0]
        if name not in partition:
            raise ValueError(f"{where}: image {name!r} has no entry in the partition file {str(partition_file)!r}.")
        if partition[name] != wanted:
            continue
        files.append(_inside(image_dir, name, where, "image file"))
        labels.append(_celeba_value(fields[t_col], target, where))
        attributes.append(_celeba_value(fields[s_col], spurious, where))
    if rows != count:
        raise ValueError(
            f"CelebA attribute file {str(attr_file)!r} announces {count} images but lists {rows}; the file is "
            "truncated or damaged."
        )
    if not files:
        raise ValueError(f"CelebA split {split!r} (partition {wanted}) has no images in {str(partition_file)!r}.")
    t_name, s_name = _readable(target), _readable(spurious)
    classnames = [f"not {t_name}", t_name]
    attribute_names = [f"not {s_name}", s_name]
    return ImageListDataset(
        files,
        labels,
        classnames,
        transform=transform,
        root=image_dir,
        source=f"{attr_file} [{split}]",
        groups=[y * 2 + a for y, a in zip(labels, attributes, strict=True)],
        group_names=[f"{c}, {a}" for c in classnames for a in attribute_names],
        attributes=attributes,
        attribute_names=attribute_names,
    )


# --------------------------------------------------------------------------------------------------------------
# DomainBed folders
# --------------------------------------------------------------------------------------------------------------
def _subdirs(path: Path) -> list[str]:
    # hidden folders (.ipynb_checkpoints, .DS_Store-like leftovers) are never domains or classes
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def _link_conflict(real: str, own: str, class_dirs: dict[str, str]) -> str | None:
    """Why a symlinked folder resolving to ``real`` must not be searched from the class folder ``own``: it is (or
    lies in) another class folder, or it holds a class folder (the domain, the root, anything above). None: fine."""
    path = Path(real)
    for ancestor in (path, *path.parents):
        name = class_dirs.get(str(ancestor))
        if name is not None:
            return None if str(ancestor) == own else f"it lies in the class folder {name}"
    prefix = real.rstrip(os.sep) + os.sep
    for class_real, name in class_dirs.items():
        if class_real.startswith(prefix):
            return f"it holds the class folder {name}"
    return None


def _images_under(folder: Path, class_dirs: dict[str, str], seen: set[str]) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted, hidden entries skipped), each real file once.

    Symlinks are followed, but every real folder is searched once (a loop is entered once, not until the OS gives
    up) and never a folder that is, lies in or holds another class folder (its images would be counted twice or
    under the wrong class). ``seen`` holds the real paths of the images already listed by the whole load.

    Args:
        folder: the class folder.
        class_dirs: real path -> ``"<domain>/<class>"`` of every class folder of the dataset.
        seen: real paths of the images listed so far; updated.
    """
    own = os.path.realpath(folder)
    visited = {own}
    found: list[Path] = []
    skipped: list[str] = []
    stack = [(folder, own)]
    while stack:
        directory, real_dir = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as err:
            logger.warning("cannot list %s (%s); the images in it are skipped", directory, err)
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            link = entry.is_symlink()
            real = os.path.realpath(entry.path) if link else os.path.join(real_dir, entry.name)
            if entry.is_dir():  # follows symlinks
                reason = "it was searched already (a loop)" if real in visited else None
                reason = reason or (_link_conflict(real, own, class_dirs) if link else None)
                if reason is not None:
                    if link:
                        skipped.append(f"{entry.path} -> {real} ({reason})")
                    continue
                visited.add(real)
                subdirs.append((Path(entry.path), real))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if real in seen:
                    skipped.append(f"{entry.path} (the same file as an image listed before)")
                    continue
                seen.add(real)
                found.append(Path(entry.path))
        stack.extend(reversed(subdirs))  # depth first, in name order (os.walk's order)
    if skipped:
        logger.warning(
            "class folder %s: %d symlinked entr%s not followed, so that no image is listed twice or under another "
            "class: %s",
            folder,
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return found


def load_domainbed(
    root: str | os.PathLike,
    domains: Sequence[str] | None = None,
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ImageListDataset:
    """A multi-domain image-folder dataset in DomainBed's layout ``<root>/<domain>/<class>/<image>`` (PACS: domains
    art_painting, cartoon, photo, sketch; also VLCS, OfficeHome, TerraIncognita, DomainNet).

    Classes are the class folder names, sorted, and must be the same in every domain. Images are the files with
    extensions jpg/jpeg/png/bmp (any case), searched recursively inside each class folder; hidden files and
    folders are skipped. Symlinks are followed, each real folder once (a symlink loop does not multiply the
    images) and never into another class folder or a folder that holds one; an image reachable by two paths is
    listed once (skipped links are logged). Items carry ``"domains"``, the index into ``domain_names``.

    Args:
        root: the dataset directory (e.g. ``data/PACS``).
        domains: domain folders to load, in this order; all of them, sorted by name (DomainBed's environment
            order), when None.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.

    Returns:
        An :class:`ImageListDataset` with ``classnames``, ``labels``, ``domains`` and ``domain_names``; use
        :func:`split_by_domain` for leave-domains-out evaluation.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no domain folders, unknown domain, classes that differ between domains, a domain without images.

    Example:
        >>> pacs = load_domainbed("data/PACS", transform=transform_for(backbone))  # doctest: +SKIP
        >>> pacs.domain_names  # doctest: +SKIP
        ['art_painting', 'cartoon', 'photo', 'sketch']
    """
    root = _require_dir(root, "DomainBed root", _DOMAINBED_LAYOUT)
    available = _subdirs(root)
    if not available:
        raise ValueError(f"DomainBed root {str(root)!r} holds no domain folders. Expected layout: {_DOMAINBED_LAYOUT}.")
    if domains is None:
        domain_names = available
    else:
        if isinstance(domains, str):
            raise TypeError(f"domains must be a list of domain names; got the string {domains!r} (wrap it in a list).")
        domain_names = list(domains)
        for name in domain_names:
            if name not in available:
                raise unknown_name_error(f"domain folder in {root}", name, available)
        if len(set(domain_names)) != len(domain_names):
            raise ValueError(f"domains must not repeat; got {domain_names!r}.")
        if not domain_names:
            raise ValueError(f"domains is empty; pass None for all domains ({', '.join(available)}).")

    classes_of = {domain: _subdirs(root / domain) for domain in domain_names}
    classnames = sorted(set().union(*classes_of.values()))
    if not classnames:
        raise ValueError(
            f"the domain folders of {str(root)!r} hold no class folders. Expected layout: {_DOMAINBED_LAYOUT}."
        )
    for domain, classes in classes_of.items():
        missing = [c for c in classnames if c not in classes]
        if missing:
            raise ValueError(
                f"domain {domain!r} ({root / domain}) lacks the class folder(s) {', '.join(missing)} that other "
                "domains have; every domain must hold the same classes. Add the folders or drop the domain via "
                "domains=[...]."
            )

    # every class folder of the dataset, loaded or not: symlinks into one are never followed from another
    class_dirs = {
        os.path.realpath(root / domain / name): f"{domain}/{name}"
        for domain in available
        for name in (classes_of[domain] if domain in classes_of else _subdirs(root / domain))
    }
    seen: set[str] = set()
    paths: list[Path] = []
    labels: list[int] = []
    domain_ids: list[int] = []
    for d, domain in enumerate(domain_names):
        before = len(paths)
        for label, classname in enumerate(classnames):
            images = _images_under(root / domain / classname, class_dirs, seen)
            if not images:
                logger.warning("class folder %s has no images", root / domain / classname)
            paths.extend(images)
            labels.extend([label] * len(images))
        if len(paths) == before:
            raise ValueError(
                f"domain {domain!r} ({root / domain}) holds no images with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}. Expected layout: {_DOMAINBED_LAYOUT}."
            )
        domain_ids.extend([d] * (len(paths) - before))
    return ImageListDataset(
        paths,
        labels,
        classnames,
        transform=transform,
        root=root,
        source=str(root),
        domains=domain_ids,
        domain_names=domain_names,
    )


def split_by_domain(
    dataset: ImageListDataset, test_domains: str | Sequence[str]
) -> tuple[ImageListDataset, dict[str, ImageListDataset]]:
    """Leave-domains-out split: train on every domain but ``test_domains``, test on each of those separately.

    Both parts keep the dataset's ``classnames`` and ``domain_names`` (domain ids keep their meaning).

    Args:
        dataset: a dataset with ``domains`` and ``domain_names`` (e.g. from :func:`load_domainbed`).
        test_domains: one domain name or several.

    Returns:
        ``(train, {domain: test_subset})``, the test subsets in the order of ``test_domains``.

    Raises:
        ValueError: the dataset has no domains, an unknown test domain, or no domain left for training.

    Example:
        >>> train, tests = split_by_domain(pacs, ["sketch"])  # doctest: +SKIP
        >>> sorted(tests), len(train) + len(tests["sketch"]) == len(pacs)  # doctest: +SKIP
        (['sketch'], True)
    """
    if getattr(dataset, "domains", None) is None or getattr(dataset, "domain_names", None) is None:
        raise ValueError(
            f"{type(dataset).__name__} carries no domain ids; split_by_domain needs a dataset from load_domainbed."
        )
    names = [test_domains] if isinstance(test_domains, str) else list(test_domains)
    if not names:
        raise ValueError(f"test_domains is empty; name at least one of {', '.join(dataset.domain_names)}.")
    for name in names:
        if name not in dataset.domain_names:
            raise unknown_name_error("test domain", name, dataset.domain_names)
    test_ids = {dataset.domain_names.index(name) for name in names}
    train_idx = [i for i, d in enumerate(dataset.domains) if d not in test_ids]
    if not train_idx:
        raise ValueError(
            f"every domain of the dataset ({', '.join(dataset.domain_names)}) is a test domain; leave at least one "
            "for training."
        )
    tests = {}
    for name in names:
        d = dataset.domain_names.index(name)
        tests[name] = dataset.subset([i for i, domain in enumerate(dataset.domains) if domain == d])
    return dataset.subset(train_idx), tests


_FGVC_LAYOUT = (
    "<root>/fgvc_aircraft/variants.txt (one class name per line, the line order is the class order), "
    "images_variant_{train,val,test}.txt ('<image id> <class name>' per line) and images/<image id>.jpg"
)


def load_fgvc_aircraft(
    root: str | os.PathLike, split: str = "train", *, transform: Callable[[Any], torch.Tensor] | None = None
) -> ImageListDataset:
    """FGVCAircraft as CoOp reads it (``datasets/fgvc_aircraft.py``): the 100 variants of ``variants.txt`` as
    classes, ``images_variant_<split>.txt`` listing ``<image id> <variant name>``, images at
    ``images/<image id>.jpg``.

    Args:
        root: the folder holding ``variants.txt`` (CoOp's ``$DATA/fgvc_aircraft``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``.

    Raises:
        FileNotFoundError: a list file is missing.
        ValueError: a line names a variant that ``variants.txt`` lacks, or the split lists no image.

    Example:
        >>> test = load_fgvc_aircraft("data/fgvc_aircraft", "test")  # doctest: +SKIP
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}.")
    root = Path(root)
    variants, listing = root / "variants.txt", root / f"images_variant_{split}.txt"
    for path in (variants, listing):
        if not path.is_file():
            raise FileNotFoundError(f"FGVCAircraft file {str(path)!r} does not exist. Expected layout: {_FGVC_LAYOUT}.")
    classnames = [line.strip() for line in variants.read_text(encoding="utf-8").splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(classnames)}
    paths, labels = [], []
    for line_num, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        image, _, name = line.strip().partition(" ")
        if not image:
            continue
        if name not in index:
            raise ValueError(
                f"{listing}, line {line_num}: variant {name!r} is not in {variants}; every line must be "
                "'<image id> <variant name>' with a name of variants.txt."
            )
        if "/" in image or "\\" in image or image.startswith("."):
            raise ValueError(f"{listing}, line {line_num}: image id {image!r} must be a plain file name.")
        paths.append(root / "images" / f"{image}.jpg")
        labels.append(index[name])
    if not paths:
        raise ValueError(f"{listing} lists no images; expected lines '<image id> <variant name>'.")
    return ImageListDataset(
        paths, labels, classnames, transform=transform, root=root / "images", source=f"{listing} [{split}]"
    )
