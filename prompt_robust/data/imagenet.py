"""ImageNet and its four shifted test sets in the folder layout CoOp and CoCoOp use, for the domain-generalisation
protocol (train on ImageNet, test on ImageNet-V2, -Sketch, -A and -R; Zhou et al., "Learning to Prompt for
Vision-Language Models", https://arxiv.org/abs/2109.01134, and "Conditional Prompt Learning for Vision-Language
Models", https://arxiv.org/abs/2203.05557).

All five read the class list of ImageNet's ``classnames.txt`` (one line per class, ``<wnid> <class name>``; the
line order is the class order) and return an :class:`~prompt_robust.data.loaders.ImageListDataset`, like every
other loader of :mod:`prompt_robust.data.loaders`. The returned dataset also carries ``wnids`` (the WordNet id of
each class label) and ``class_positions`` (each class label's position in ImageNet's class list); ``subset()``
does not carry these two.

ImageNet-A and ImageNet-R hold 200 of the 1000 classes. By default (``classes="subset"``) they are labelled
``0..199`` over their own 200 class names, in ImageNet's order: the evaluation of the CoOp and CoCoOp papers, where
the classifier is built from the subset's class names (call ``learner.set_classnames(test.classnames)``).
``classes="imagenet"`` labels them with their positions in ImageNet's 1000-class list, for a model that keeps
predicting over all 1000 classes.

The expected trees are in ``docs/datasets.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import unknown_name_error
from .loaders import IMAGE_EXTENSIONS, ImageListDataset, _check_split_name, _require_dir, _require_file, _subdirs

__all__ = [
    "IMAGENET_TARGETS",
    "load_imagenet",
    "load_imagenet_a",
    "load_imagenet_r",
    "load_imagenet_sketch",
    "load_imagenet_targets",
    "load_imagenet_v2",
    "read_imagenet_classnames",
]

logger = logging.getLogger(__name__)

#: how ImageNet-A and ImageNet-R are labelled: over their own 200 classes, or over ImageNet's 1000
CLASS_SPACES = ("subset", "imagenet")
#: the three ImageNet-V2 test sets (folder ``imagenetv2-<variant>-format-val``); CoOp uses matched-frequency
V2_VARIANTS = ("matched-frequency", "threshold0.7", "top-images")

_CLASSNAMES = "classnames.txt"
_CLASSNAMES_LINE = (
    "'<wnid> <class name>' (e.g. 'n01440764 tench'), one line per class; the line order is the class order"
)
_IMAGES = "extensions " + ", ".join(IMAGE_EXTENSIONS) + " in any case"


@dataclass(frozen=True)
class _Layout:
    """Where one dataset lives under ``<root>`` and the tree printed when something is missing."""

    title: str
    folder: str  # under <root>
    images: str  # under <root>/<folder>
    tree: str


_IMAGENET = _Layout(
    "ImageNet",
    "imagenet",
    "images",
    """
<root>/
  imagenet/
    classnames.txt          '<wnid> <class name>' per line; the line order is the class order
    images/
      train/<wnid>/*.JPEG   one folder per class, named by the wnids of classnames.txt
      val/<wnid>/*.JPEG
""",
)
_SKETCH = _Layout(
    "ImageNet-Sketch",
    "imagenet-sketch",
    "images",
    """
<root>/
  imagenet/classnames.txt   ImageNet's class list (or a copy at imagenet-sketch/classnames.txt)
  imagenet-sketch/
    images/<wnid>/*.JPEG    1000 class folders named by ImageNet's wnids
""",
)
_ADVERSARIAL = _Layout(
    "ImageNet-A",
    "imagenet-adversarial",
    "imagenet-a",
    """
<root>/
  imagenet/classnames.txt   ImageNet's class list (or a copy at imagenet-adversarial/classnames.txt)
  imagenet-adversarial/
    imagenet-a/<wnid>/*.jpg   200 class folders named by ImageNet wnids (README.txt there is ignored)
""",
)
_RENDITION = _Layout(
    "ImageNet-R",
    "imagenet-rendition",
    "imagenet-r",
    """
<root>/
  imagenet/classnames.txt   ImageNet's class list (or a copy at imagenet-rendition/classnames.txt)
  imagenet-rendition/
    imagenet-r/<wnid>/*.jpg   200 class folders named by ImageNet wnids (README.txt there is ignored)
""",
)


def _v2_layout(variant: str) -> _Layout:
    folder = f"imagenetv2-{variant}-format-val"
    return _Layout(
        "ImageNet-V2",
        "imagenetv2",
        folder,
        f"""
<root>/
  imagenet/classnames.txt   ImageNet's class list (or a copy at imagenetv2/classnames.txt)
  imagenetv2/
    {folder}/
      0/*.jpeg ... 999/*.jpeg   folder <i> holds class i, the i-th line of classnames.txt
""",
    )


# --------------------------------------------------------------------------------------------------------------
# Class list
# --------------------------------------------------------------------------------------------------------------
def read_imagenet_classnames(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """ImageNet's class list from a ``classnames.txt`` as CoOp distributes it: one line per class,
    ``<wnid> <class name>`` (the name may contain spaces), the line order being the class order. Blank lines are
    skipped.

    Args:
        path: the ``classnames.txt`` file.

    Returns:
        ``(wnids, classnames)``, two lists in file order.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a line without a class name, a repeated wnid, a file that is not UTF-8 text or lists no class.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder, "classnames.txt")
        ...     _ = path.write_text("n01440764 tench\\nn01530575 brambling finch\\n")
        ...     read_imagenet_classnames(path)
        (['n01440764', 'n01530575'], ['tench', 'brambling finch'])
    """
    path = _require_file(Path(path), "ImageNet class-name file", _IMAGENET.tree)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}); expected lines {_CLASSNAMES_LINE}.") from err
    wnids: list[str] = []
    names: list[str] = []
    first_line: dict[str, int] = {}
    for line_num, line in enumerate(text.splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].strip():
            raise ValueError(
                f"{path}, line {line_num}: cannot read {line!r}; every line must be {_CLASSNAMES_LINE}. Fix the "
                "line, or use the classnames.txt CoOp distributes (see docs/datasets.md)."
            )
        wnid, name = fields[0], fields[1].strip()
        if wnid in first_line:
            raise ValueError(
                f"{path}, line {line_num}: wnid {wnid!r} is listed again (first on line {first_line[wnid]}); each "
                "class must appear once. Remove the repeated line."
            )
        first_line[wnid] = line_num
        wnids.append(wnid)
        names.append(name)
    if not wnids:
        raise ValueError(f"{str(path)!r} lists no classes; expected lines {_CLASSNAMES_LINE}.")
    return wnids, names


def _class_list(
    root: Path, layout: _Layout, classnames_file: str | os.PathLike | None
) -> tuple[list[str], list[str], Path]:
    """ImageNet's class list for a dataset: ``classnames_file``, else ``<root>/imagenet/classnames.txt``, else the
    copy CoOp's instructions put beside the variant (``<root>/<folder>/classnames.txt``)."""
    if classnames_file is not None:
        path = Path(classnames_file)
    else:
        candidates = [root / _IMAGENET.folder / _CLASSNAMES]
        if layout is not _IMAGENET:
            candidates.append(root / layout.folder / _CLASSNAMES)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            where = " or ".join(repr(str(p)) for p in candidates)
            raise FileNotFoundError(
                f"{layout.title} needs ImageNet's class list, but no class-name file exists at {where}. Put CoOp's "
                f"classnames.txt there (lines {_CLASSNAMES_LINE}) or pass classnames_file=...; expected layout:"
                f"{layout.tree}"
            )
    wnids, names = read_imagenet_classnames(path)
    return wnids, names, path


# --------------------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------------------
def _image_dir(root: str | os.PathLike, layout: _Layout, *parts: str) -> Path:
    """``<root>/<folder>/<images>/<parts...>``, each level checked, with the expected tree in the error."""
    root = _require_dir(root, f"{layout.title} data root", f"(root holds {layout.folder}/){layout.tree}")
    path = root
    for level, part in enumerate((layout.folder, layout.images, *parts)):
        path = path / part
        if path.is_dir():
            continue
        hint = ""
        if level == 0 and (root.name == layout.folder or (root / layout.images).is_dir()):
            # the commonest slip: passing the dataset's own folder instead of the data folder above it
            hint = f" root must be the folder that holds {layout.folder}/; pass {str(root.parent)!r} instead."
        raise FileNotFoundError(
            f"{layout.title} folder {str(path)!r} does not exist or is not a directory.{hint} Expected layout "
            f"(root = {str(root)!r}):{layout.tree}"
        )
    return path


def _images_in(folder: Path, title: str) -> list[Path]:
    """The image files directly in a class folder (hidden ones skipped), sorted by name; an empty folder raises."""
    images = sorted(
        Path(entry.path)
        for entry in os.scandir(folder)
        if not entry.name.startswith(".") and entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not images:
        raise ValueError(
            f"{title} class folder {str(folder)!r} holds no images ({_IMAGES}). The download or extraction is "
            "incomplete: extract that class again, or delete the empty folder to load the others."
        )
    return images


def _wnid_folders(image_dir: Path, wnids: list[str], names_file: Path, title: str, tree: str) -> dict[int, str]:
    """Class folder of each ImageNet position present in ``image_dir``, checking every folder is a known wnid."""
    folders = _subdirs(image_dir)
    if not folders:
        loose = any(entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in os.scandir(image_dir))
        # ILSVRC-2012's val archive unpacks flat; CoOp's layout needs it sorted into class folders
        hint = " It holds images directly: move each into the folder of its class's wnid." if loose else ""
        raise ValueError(f"{title} folder {str(image_dir)!r} holds no class folders.{hint} Expected layout:{tree}")
    position = {wnid: i for i, wnid in enumerate(wnids)}
    unknown = [f for f in folders if f not in position]
    if unknown:
        listed = ", ".join(repr(f) for f in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"{title} folder {str(image_dir)!r} has class folder(s) {listed} whose wnid is not in the class list "
            f"{str(names_file)!r} ({len(wnids)} classes): the class folders must be a subset of ImageNet's wnids. "
            "Use ImageNet's full classnames.txt (classnames_file=...), or remove folders that are not classes."
        )
    return {position[f]: f for f in folders}


def _warn_missing(title: str, image_dir: Path, expected: int, found: int) -> None:
    if found < expected:
        logger.warning(
            "%s folder %s holds %d of the %d classes; the missing ones get no examples",
            title,
            image_dir,
            found,
            expected,
        )


def _dataset(
    entries: Sequence[tuple[int, Path]],
    positions: Sequence[int],
    wnids: list[str],
    names: list[str],
    *,
    transform: Callable[[Any], torch.Tensor] | None,
    root: Path,
    title: str,
) -> ImageListDataset:
    """An ImageListDataset over the classes at ``positions`` of ImageNet's list (label = index in ``positions``),
    from ``(imagenet_position, class_folder)`` entries, with ``wnids`` and ``class_positions`` attached."""
    label_of = {p: label for label, p in enumerate(positions)}
    paths: list[Path] = []
    labels: list[int] = []
    for p, folder in entries:
        images = _images_in(folder, title)
        paths.extend(images)
        labels.extend([label_of[p]] * len(images))
    source = f"{title} ({root})"
    data = ImageListDataset(paths, labels, [names[p] for p in positions], transform=transform, root=root, source=source)
    data.wnids = [wnids[p] for p in positions]
    data.class_positions = list(positions)
    return data


def _by_wnid(
    layout: _Layout,
    root: str | os.PathLike,
    parts: tuple[str, ...],
    *,
    subset: bool,
    transform: Callable[[Any], torch.Tensor] | None,
    classnames_file: str | os.PathLike | None,
) -> ImageListDataset:
    """A dataset of wnid-named class folders; labelled over the classes present (``subset``: ImageNet-A/R) or
    over all of ImageNet's classes (a missing class is then logged, except for the 200-class sets)."""
    image_dir = _image_dir(root, layout, *parts)
    wnids, names, names_file = _class_list(Path(root), layout, classnames_file)
    found = _wnid_folders(image_dir, wnids, names_file, layout.title, layout.tree)
    present = sorted(found)  # ImageNet's order, not the folders' name order
    positions = present if subset else list(range(len(wnids)))
    if layout in (_IMAGENET, _SKETCH):  # the 1000-class sets; ImageNet-A/R hold 200 classes by design
        _warn_missing(layout.title, image_dir, len(wnids), len(present))
    return _dataset(
        [(p, image_dir / found[p]) for p in present],
        positions,
        wnids,
        names,
        transform=transform,
        root=image_dir,
        title=" ".join((layout.title, *parts)),
    )


# --------------------------------------------------------------------------------------------------------------
# The five datasets
# --------------------------------------------------------------------------------------------------------------
def load_imagenet(
    root: str | os.PathLike,
    split: str = "train",
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageListDataset:
    """ImageNet (ILSVRC-2012) as CoOp lays it out: ``<root>/imagenet/images/{train,val}/<wnid>/*.JPEG`` and
    ``<root>/imagenet/classnames.txt``.

    Labels are positions in ``classnames.txt`` (its line order), for every split. As in CoOp, the validation set
    is the test set: ``split="test"`` reads ``images/val``. The papers train on 16 shots per class; draw them with
    :func:`~prompt_robust.data.fewshot.sample_few_shot` (see the example).

    Args:
        root: the data folder that holds ``imagenet/`` (CoOp's ``DATASET.ROOT``).
        split: ``"train"``, ``"val"`` or ``"test"`` (the same images as ``"val"``).
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: the class list; ``<root>/imagenet/classnames.txt`` when None.

    Returns:
        An :class:`~prompt_robust.data.loaders.ImageListDataset` with the 1000 ``classnames``, ``labels``,
        ``paths``, plus ``wnids`` and ``class_positions`` (``0..999``).

    Raises:
        FileNotFoundError: a folder or ``classnames.txt`` is missing (the message shows the expected tree).
        ValueError: unknown split, an unreadable ``classnames.txt`` line, a class folder whose wnid is not in it,
            a class folder without images.

    Example:
        >>> train = load_imagenet("data", "train", transform=transform_for(backbone))  # doctest: +SKIP
        >>> shots = FewShotSubset(train, sample_few_shot(train.labels, k=16, seed=1))  # doctest: +SKIP
        >>> test = load_imagenet("data", "test", transform=transform_for(backbone))  # doctest: +SKIP
    """
    _check_split_name(split)
    folder = "train" if split == "train" else "val"
    return _by_wnid(_IMAGENET, root, (folder,), subset=False, transform=transform, classnames_file=classnames_file)


def load_imagenet_v2(
    root: str | os.PathLike,
    *,
    variant: str = "matched-frequency",
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageListDataset:
    """ImageNet-V2 (Recht et al., "Do ImageNet Classifiers Generalize to ImageNet?",
    https://arxiv.org/abs/1902.10811): ``<root>/imagenetv2/imagenetv2-matched-frequency-format-val/<i>/*.jpeg``,
    where folder ``<i>`` (``0..999``) holds the images of ImageNet's class ``i`` (line ``i + 1`` of
    ``classnames.txt``). Test only.

    Args:
        root: the data folder that holds ``imagenetv2/`` (and ``imagenet/classnames.txt``).
        variant: ``"matched-frequency"`` (the one CoOp and CoCoOp report), ``"threshold0.7"`` or ``"top-images"``.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: ImageNet's class list; ``<root>/imagenet/classnames.txt``, else
            ``<root>/imagenetv2/classnames.txt`` (the copy CoOp's instructions make), when None.

    Returns:
        An :class:`~prompt_robust.data.loaders.ImageListDataset` labelled over ImageNet's classes.

    Raises:
        FileNotFoundError: a folder or the class list is missing (the message shows the expected tree).
        ValueError: a folder name that is not an integer in ``0..len(classes) - 1``, a class folder without images,
            an unreadable ``classnames.txt`` line, an unknown variant.

    Example:
        >>> v2 = load_imagenet_v2("data", transform=transform_for(backbone))  # doctest: +SKIP
    """
    if variant not in V2_VARIANTS:
        raise unknown_name_error("ImageNet-V2 variant", variant, V2_VARIANTS)
    layout = _v2_layout(variant)
    image_dir = _image_dir(root, layout)
    wnids, names, names_file = _class_list(Path(root), layout, classnames_file)
    found: dict[int, str] = {}
    bad = []
    for folder in _subdirs(image_dir):
        # ASCII digits only (no sign, spaces or other scripts' digits), written without leading zeros
        index = int(folder) if folder.isascii() and folder.isdigit() else -1
        if not 0 <= index < len(wnids) or str(index) != folder:
            bad.append(folder)
        else:
            found[index] = folder
    if bad:
        listed = ", ".join(repr(f) for f in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"ImageNet-V2 folder {str(image_dir)!r} has folder(s) {listed}; its class folders must be named by the "
            f"class index 0..{len(wnids) - 1} (written without leading zeros) of the class list {str(names_file)!r}. "
            "Remove the stray folders, or pass ImageNet's full 1000-class classnames.txt as classnames_file."
        )
    if not found:
        raise ValueError(f"ImageNet-V2 folder {str(image_dir)!r} holds no class folders. Expected layout:{layout.tree}")
    _warn_missing(layout.title, image_dir, len(wnids), len(found))
    return _dataset(
        [(i, image_dir / found[i]) for i in sorted(found)],
        list(range(len(wnids))),
        wnids,
        names,
        transform=transform,
        root=image_dir,
        title=f"ImageNet-V2 {variant}",
    )


def load_imagenet_sketch(
    root: str | os.PathLike,
    *,
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageListDataset:
    """ImageNet-Sketch (Wang et al., "Learning Robust Global Representations by Penalizing Local Predictive
    Power", https://arxiv.org/abs/1905.13549): ``<root>/imagenet-sketch/images/<wnid>/*``, 1000 classes, labelled
    with their positions in ImageNet's class list. Test only.

    Args:
        root: the data folder that holds ``imagenet-sketch/`` (and ``imagenet/classnames.txt``).
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: ImageNet's class list; ``<root>/imagenet/classnames.txt``, else
            ``<root>/imagenet-sketch/classnames.txt``, when None.

    Returns:
        An :class:`~prompt_robust.data.loaders.ImageListDataset` labelled over ImageNet's classes.

    Raises:
        FileNotFoundError: a folder or the class list is missing (the message shows the expected tree).
        ValueError: a class folder whose wnid is not ImageNet's, a class folder without images, an unreadable
            ``classnames.txt`` line.

    Example:
        >>> sketch = load_imagenet_sketch("data", transform=transform_for(backbone))  # doctest: +SKIP
    """
    return _by_wnid(_SKETCH, root, (), subset=False, transform=transform, classnames_file=classnames_file)


def _check_classes(classes: str) -> bool:
    if classes not in CLASS_SPACES:
        raise unknown_name_error("classes", classes, CLASS_SPACES)
    return classes == "subset"


def load_imagenet_a(
    root: str | os.PathLike,
    *,
    classes: str = "subset",
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageListDataset:
    """ImageNet-A (Hendrycks et al., "Natural Adversarial Examples", https://arxiv.org/abs/1907.07174):
    ``<root>/imagenet-adversarial/imagenet-a/<wnid>/*.jpg``, 200 of ImageNet's classes. Test only.

    Args:
        root: the data folder that holds ``imagenet-adversarial/`` (and ``imagenet/classnames.txt``).
        classes: ``"subset"`` (default, as CoOp and CoCoOp evaluate): labels ``0..199`` over the subset's own
            class names, in ImageNet's order; predict with ``learner.set_classnames(dataset.classnames)``.
            ``"imagenet"``: labels are positions in ImageNet's 1000-class list and ``classnames`` is that list,
            for a model that predicts over all 1000 classes. Either way ``class_positions`` maps each label to
            its ImageNet position.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: ImageNet's class list; ``<root>/imagenet/classnames.txt``, else
            ``<root>/imagenet-adversarial/classnames.txt``, when None.

    Raises:
        FileNotFoundError: a folder or the class list is missing (the message shows the expected tree).
        ValueError: a class folder whose wnid is not ImageNet's, a class folder without images, an unreadable
            ``classnames.txt`` line, an unknown ``classes``.

    Example:
        >>> test = load_imagenet_a("data", transform=transform_for(backbone))  # doctest: +SKIP
        >>> learner.set_classnames(test.classnames)  # the 200 classes  # doctest: +SKIP
    """
    subset = _check_classes(classes)
    return _by_wnid(_ADVERSARIAL, root, (), subset=subset, transform=transform, classnames_file=classnames_file)


def load_imagenet_r(
    root: str | os.PathLike,
    *,
    classes: str = "subset",
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> ImageListDataset:
    """ImageNet-R(endition) (Hendrycks et al., "The Many Faces of Robustness", https://arxiv.org/abs/2006.16241):
    ``<root>/imagenet-rendition/imagenet-r/<wnid>/*.jpg``, 200 of ImageNet's classes. Test only.

    Args:
        root: the data folder that holds ``imagenet-rendition/`` (and ``imagenet/classnames.txt``).
        classes: ``"subset"`` (default, as CoOp and CoCoOp evaluate) or ``"imagenet"``; see :func:`load_imagenet_a`.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: ImageNet's class list; ``<root>/imagenet/classnames.txt``, else
            ``<root>/imagenet-rendition/classnames.txt``, when None.

    Raises:
        FileNotFoundError: a folder or the class list is missing (the message shows the expected tree).
        ValueError: a class folder whose wnid is not ImageNet's, a class folder without images, an unreadable
            ``classnames.txt`` line, an unknown ``classes``.

    Example:
        >>> test = load_imagenet_r("data", classes="imagenet", transform=transform_for(backbone))  # doctest: +SKIP
    """
    subset = _check_classes(classes)
    return _by_wnid(_RENDITION, root, (), subset=subset, transform=transform, classnames_file=classnames_file)


#: the test sets of the domain-generalisation protocol, by name; "imagenet" is the source's own val split
IMAGENET_TARGETS = ("imagenet", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r")


def load_imagenet_targets(
    root: str | os.PathLike,
    targets: Sequence[str] | None = None,
    *,
    classes: str = "subset",
    transform: Callable[[Any], torch.Tensor] | None = None,
    classnames_file: str | os.PathLike | None = None,
) -> dict[str, ImageListDataset]:
    """The test sets of CoOp's domain-generalisation table: ImageNet's val split (the source) and the four shifted
    sets, by name. Train with ``load_imagenet(root, "train")`` (16 shots per class).

    Args:
        root: the data folder that holds ``imagenet/`` and the variants' folders.
        targets: names among ``imagenet``, ``imagenetv2``, ``imagenet-sketch``, ``imagenet-a``, ``imagenet-r``, in
            the order wanted; all five when None.
        classes: the label space of ImageNet-A and -R (see :func:`load_imagenet_a`); the others always use 1000.
        transform: PIL image -> tensor, e.g. ``transform_for(backbone)``; CLIP's 224 px preprocessing when None.
        classnames_file: ImageNet's class list; ``<root>/imagenet/classnames.txt`` when None.

    Returns:
        ``{name: dataset}`` in the order of ``targets``.

    Raises:
        ValueError: an unknown or repeated name; anything the single loaders raise.

    Example:
        >>> tests = load_imagenet_targets("data", ["imagenetv2", "imagenet-a"], transform=tf)  # doctest: +SKIP
        >>> {name: len(data.classnames) for name, data in tests.items()}  # doctest: +SKIP
        {'imagenetv2': 1000, 'imagenet-a': 200}
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of names; got the string {targets!r} (wrap it in a list).")
    names = list(IMAGENET_TARGETS) if targets is None else list(targets)
    for name in names:
        if name not in IMAGENET_TARGETS:
            raise unknown_name_error("ImageNet test set", name, IMAGENET_TARGETS)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"targets must be distinct and not empty; got {names!r}.")
    _check_classes(classes)
    common = {"transform": transform, "classnames_file": classnames_file}
    loaders: dict[str, Callable[[], ImageListDataset]] = {
        "imagenet": lambda: load_imagenet(root, "val", **common),
        "imagenetv2": lambda: load_imagenet_v2(root, **common),
        "imagenet-sketch": lambda: load_imagenet_sketch(root, **common),
        "imagenet-a": lambda: load_imagenet_a(root, classes=classes, **common),
        "imagenet-r": lambda: load_imagenet_r(root, classes=classes, **common),
    }
    return {name: loaders[name]() for name in names}
