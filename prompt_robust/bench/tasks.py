"""The benchmark tasks on the embedded world: base-to-new, domain generalisation, spurious correlation,
image-text retrieval and cross-dataset transfer.

Evaluation sets and training pools are rendered from fixed seeds (like a dataset's fixed test split); a run's
seed only picks the few-shot training indices (and the spurious task's training draw), which are saved as JSON
so a split can be reused exactly.

* **base-to-new** (the CoCoOp protocol): the 24 classes split into base (first half) and new (second half);
  prompts are tuned on ``k`` shots per base class (photo style) and evaluated on base and new classes.
* **domain generalisation**: prompts tuned on ``k`` shots per class of all 24 classes in the photo style,
  evaluated on each unseen style (sketch, painting, pixel) and their average.
* **cross-dataset**: the same prompts evaluated on the 12 disjoint cross-dataset classes (photo style).
* **spurious correlation** (Waterbirds-like): two "land" classes (habitat grass) and two "water" classes
  (habitat water), drawn small against the background as Waterbirds' birds are; in training 95% of a class's
  images show its habitat background, in test every (class, background) group is equally large. Metrics:
  average, worst-group accuracy and the gap between them. The four classes are the ones of each habitat whose
  small shapes the mini-CLIP tells apart least well, so the shape has to compete with the background (with
  easily told shapes every method scores ~99% and the task measures nothing).
* **retrieval**: held-out captioned images of all classes and styles; R@1/5/10 image-to-text and text-to-image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields

import torch
from torch.utils.data import Dataset

from ..data.fewshot import sample_few_shot
from . import world, world_v2

__all__ = [
    "BASE_CLASSES",
    "NEW_CLASSES",
    "SPURIOUS_CLASSES",
    "SPURIOUS_MAJORITY",
    "TASKS_VERSION",
    "TaskData",
    "WorldTasks",
]

BASE_CLASSES: tuple[str, ...] = world.CLASSES[: len(world.CLASSES) // 2]
NEW_CLASSES: tuple[str, ...] = world.CLASSES[len(world.CLASSES) // 2 :]
SOURCE_STYLE = "photo"
TARGET_STYLES: tuple[str, ...] = tuple(s for s in world.STYLES if s != SOURCE_STYLE)
#: two land classes (habitat grass) and two water classes (habitat water), drawn small
SPURIOUS_CLASSES: tuple[str, ...] = ("flower", "tree", "drop", "diamond")
SPURIOUS_SIZE = "small"
#: bump when a task's definition changes: saved benchmark runs of another version are recomputed
TASKS_VERSION = 3
#: the world version the tasks are built on by default (1: the single-dataset world of the first mini-CLIP)
WORLD_VERSION = 2
#: world 2: the dataset domain generalisation trains on (all its classes, photo) and whose styles it tests
DG_DATASET = "objects"
SPURIOUS_BACKGROUNDS: tuple[str, ...] = ("grass", "water")
#: fraction of a class's training images on its habitat background
SPURIOUS_MAJORITY = 0.95

# Fixed seeds of the evaluation sets and pools (a run's seed never touches them).
_SEEDS = {"b2n_pool": 101, "b2n_base": 102, "b2n_new": 103, "dg_pool": 201, "dg_test": 202, "cross": 301}
_SEEDS.update({"spurious_train": 401, "spurious_test": 402, "retrieval": 501})
# world 2: each dataset's pool and test sets get their own seeds (offsets from these)
_DATASET_SEEDS = {"objects": 1100, "polygons": 1200, "textures": 1300, "gadgets": 1400, "scenes": 1500}


@dataclass
class TaskData(Dataset):
    """Rendered, normalised images with labels (and groups or captions where the task has them).

    Items are dicts ``{"pixel_values": (3, S, S), "labels": int}`` plus ``"groups"`` when groups exist.
    """

    pixel_values: torch.Tensor  # (n, 3, S, S)
    labels: torch.Tensor  # (n,)
    classnames: list[str]
    groups: torch.Tensor | None = None  # (n,)
    group_names: list[str] | None = None
    captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}
        if self.groups is not None:
            item["groups"] = self.groups[index]
        return item

    def subset(self, indices: Sequence[int]) -> TaskData:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return replace(
            self,
            pixel_values=self.pixel_values[index],
            labels=self.labels[index],
            groups=None if self.groups is None else self.groups[index],
            captions=None if self.captions is None else [self.captions[i] for i in index.tolist()],
        )


class WorldTasks:
    """Builds every task's data for one backbone (image size and normalisation), world version and scale.

    World 1 has one dataset (the 24 classes) for base-to-new and domain generalisation and the 12 cross-dataset
    classes; world 2 has the datasets of :data:`~.world_v2.DATASETS`, base-to-new runs on each of them, domain
    generalisation on ``DG_DATASET``, and cross-dataset transfer tests the domain-generalisation prompts on every
    other dataset.

    Args:
        image_size: rendered resolution (the backbone's).
        mean / std: the backbone's normalisation.
        pool_per_class: training images rendered per class, from which ``k`` shots are drawn.
        test_per_class: evaluation images per class (per style, per group).
        retrieval_size: captioned images in the retrieval set.
        version: the world version (1 or 2).

    Example:
        >>> tasks = WorldTasks(32, (0.5,) * 3, (0.5,) * 3, pool_per_class=4, test_per_class=2, retrieval_size=8)
        >>> train, indices = tasks.base_to_new_train(k=2, seed=1)
        >>> len(train), len(indices)
        (24, 24)
        >>> WorldTasks(48, (0.5,) * 3, (0.5,) * 3, version=2).datasets()
        ['objects', 'polygons', 'textures', 'gadgets', 'scenes']
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pool_per_class: int = 32,
        test_per_class: int = 50,
        retrieval_size: int = 1000,
        version: int = WORLD_VERSION,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2 (the world versions); got {version!r}.")
        self.config = world.WorldConfig(image_size=image_size) if version == 1 else world_v2.render_config(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.pool_per_class = pool_per_class
        self.test_per_class = test_per_class
        self.retrieval_size = retrieval_size
        self.version = version
        self._cache: dict[tuple, TaskData] = {}

    # -- rendering -------------------------------------------------------------------------------------------
    def _render(self, attrs: world.Attributes) -> torch.Tensor:
        return world.normalize_images(world.render(attrs, self.config), self.mean, self.std)

    def _classes(
        self, key: str, classes: Sequence[str], per_class: int, style: str, seed: int, background=None
    ) -> TaskData:
        cache_key = (key, tuple(classes), per_class, style, seed)
        if cache_key not in self._cache:
            labels = torch.arange(len(classes)).repeat_interleave(per_class)
            attrs = world.sample_attributes(
                len(labels),
                seed,
                classes=classes,
                class_idx=labels,
                style=torch.full_like(labels, world.STYLES.index(style)),
                background=background,
            )
            self._cache[cache_key] = TaskData(self._render(attrs), labels, list(classes))
        return self._cache[cache_key]

    @staticmethod
    def _dataset_attrs(
        name: str, classes: Sequence[str], per_class: int, style: str | None, seed: int
    ) -> tuple[world.Attributes, torch.Tensor]:
        """World 2: the attributes of ``per_class`` images of each of ``classes`` (a subset of dataset ``name``'s)
        in ``style`` (None: the dataset's own), and their labels (indices into ``classes``)."""
        spec = world_v2.DATASETS[name]
        labels = torch.arange(len(classes)).repeat_interleave(per_class)
        full = torch.tensor([spec.classes.index(c) for c in classes])[labels]  # indices into spec.classes
        return spec.attributes(full, seed, style=style), labels

    def _dataset_set(self, name: str, classes: Sequence[str], per_class: int, style: str | None, seed: int) -> TaskData:
        """World 2: ``per_class`` images of each of ``classes`` (a subset of dataset ``name``'s) in ``style``
        (None: the dataset's own)."""
        cache_key = ("v2", name, tuple(classes), per_class, style, seed)
        if cache_key not in self._cache:
            attrs, labels = self._dataset_attrs(name, classes, per_class, style, seed)
            self._cache[cache_key] = TaskData(self._render(attrs), labels, list(classes))
        return self._cache[cache_key]

    def _check_dataset(self, dataset: str) -> None:
        names = self.datasets()
        if dataset not in names:
            from ..config import unknown_name_error

            raise unknown_name_error(f"world-{self.version} dataset", dataset, names)

    def datasets(self) -> list[str]:
        """The datasets base-to-new runs on: world 1 has one (``"objects"``), world 2 five."""
        return ["objects"] if self.version == 1 else list(world_v2.DATASETS)

    def base_classes(self, dataset: str = "objects") -> tuple[str, ...]:
        self._check_dataset(dataset)
        return BASE_CLASSES if self.version == 1 else world_v2.DATASETS[dataset].base_classes

    def new_classes(self, dataset: str = "objects") -> tuple[str, ...]:
        self._check_dataset(dataset)
        return NEW_CLASSES if self.version == 1 else world_v2.DATASETS[dataset].new_classes

    def template(self, dataset: str = "objects") -> str:
        """The hand-crafted zero-shot prompt of ``dataset`` (world 1: ``"a photo of a {}."``)."""
        if self.version == 1 or dataset == "cross":
            return "a photo of a {}."
        self._check_dataset(dataset)
        return world_v2.DATASETS[dataset].template

    def nuisance_values(self, dataset: str = "objects") -> tuple[str, ...]:
        """The words of ``dataset``'s nuisance attribute, its backgrounds (world 1: the world's); empty for a
        dataset whose label *is* the background (scenes)."""
        self._check_dataset(dataset)
        if self.version == 1:
            return world.BACKGROUNDS
        spec = world_v2.DATASETS[dataset]
        return () if spec.label == "background" else tuple(spec.backgrounds)

    def dg_classes(self) -> tuple[str, ...]:
        """The classes of the domain-generalisation task."""
        return world.CLASSES if self.version == 1 else world_v2.DATASETS[DG_DATASET].classes

    # -- base-to-new -------------------------------------------------------------------------------------------
    def base_to_new_train(self, k: int, seed: int, dataset: str = "objects") -> tuple[TaskData, list[int]]:
        """``k`` shots per base class (photo) of ``dataset`` and the chosen pool indices."""
        pool = self.base_to_new_pool(dataset)
        indices = sample_few_shot(pool.labels.tolist(), k, seed)
        return pool.subset(indices), indices

    def base_to_new_pool(self, dataset: str = "objects") -> TaskData:
        """The whole training pool of ``dataset``'s base classes (the shots are drawn from it; the images not drawn
        are a validation set)."""
        self._check_dataset(dataset)
        if self.version == 1:
            return self._classes("b2n_pool", BASE_CLASSES, self.pool_per_class, SOURCE_STYLE, _SEEDS["b2n_pool"])
        seed = _DATASET_SEEDS[dataset]
        return self._dataset_set(dataset, self.base_classes(dataset), self.pool_per_class, None, seed + 1)

    def base_to_new_test(self, dataset: str = "objects") -> tuple[TaskData, TaskData]:
        """Held-out photos of the base and of the new classes of ``dataset``."""
        self._check_dataset(dataset)
        if self.version == 1:
            base = self._classes("b2n_base", BASE_CLASSES, self.test_per_class, SOURCE_STYLE, _SEEDS["b2n_base"])
            new = self._classes("b2n_new", NEW_CLASSES, self.test_per_class, SOURCE_STYLE, _SEEDS["b2n_new"])
            return base, new
        seed = _DATASET_SEEDS[dataset]
        base = self._dataset_set(dataset, self.base_classes(dataset), self.test_per_class, None, seed + 2)
        new = self._dataset_set(dataset, self.new_classes(dataset), self.test_per_class, None, seed + 3)
        return base, new

    # -- domain generalisation and cross-dataset ------------------------------------------------------------------
    def dg_pool(self) -> TaskData:
        """The source-style (photo) training pool of the domain-generalisation classes."""
        if self.version == 1:
            return self._classes("dg_pool", world.CLASSES, self.pool_per_class, SOURCE_STYLE, _SEEDS["dg_pool"])
        seed = _DATASET_SEEDS[DG_DATASET]
        return self._dataset_set(DG_DATASET, self.dg_classes(), self.pool_per_class, SOURCE_STYLE, seed + 11)

    #: factors a twin of a domain-generalisation photo can change (:meth:`dg_twins`)
    TWIN_FACTORS: tuple[str, ...] = ("colour", "background", "geometry", "style")

    def dg_twins(self, indices: Sequence[int], factor: str, seed: int = 0) -> TaskData:
        """True interventions: the domain-generalisation pool's images ``indices`` rendered again with one factor
        changed and everything else (class, pose, texture, noise) kept, aligned with ``dg_pool().subset(indices)``.

        Factors: ``"colour"`` (another colour), ``"background"`` (another background of the dataset),
        ``"geometry"`` (another size, position and rotation), ``"style"`` (another style: sketch, painting or
        pixel; these are the unseen test styles, so style twins are an oracle's knowledge). The new values are
        drawn from ``seed``.
        """
        if self.version == 1:
            raise ValueError("twins exist on world 2 only; pass version=2 (world_version=2).")
        if factor not in self.TWIN_FACTORS:
            from ..config import unknown_name_error

            raise unknown_name_error("twin factor", factor, self.TWIN_FACTORS)
        seed_pool = _DATASET_SEEDS[DG_DATASET] + 11
        attrs, labels = self._dataset_attrs(DG_DATASET, self.dg_classes(), self.pool_per_class, SOURCE_STYLE, seed_pool)
        index = torch.as_tensor(list(indices), dtype=torch.long)
        fields = {f.name: getattr(attrs, f.name) for f in dataclass_fields(attrs)}
        picked = {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        attrs, labels = world.Attributes(**picked), labels[index]
        n, gen = len(index), torch.Generator().manual_seed(int(seed) + 7)

        def other(current: torch.Tensor, choices: int) -> torch.Tensor:
            return (current + torch.randint(1, choices, (n,), generator=gen)) % choices  # uniform over the others

        if factor == "colour":
            attrs = replace(attrs, colour=other(attrs.colour, len(attrs.colours)))
        elif factor == "background":
            attrs = replace(attrs, background=other(attrs.background, len(attrs.backgrounds)))
        elif factor == "style":
            targets = torch.tensor([world.STYLES.index(s) for s in TARGET_STYLES])
            attrs = replace(attrs, style=targets[torch.randint(len(targets), (n,), generator=gen)])
        else:  # a fresh size, position and rotation (positions kept inside the image for their size)
            fresh = world.sample_attributes(n, int(seed) + 11, classes=attrs.classes)
            attrs = replace(attrs, size=fresh.size, x=fresh.x, y=fresh.y, angle=fresh.angle)
        return TaskData(self._render(attrs), labels, list(self.dg_classes()))

    def dg_train(self, k: int, seed: int) -> tuple[TaskData, list[int]]:
        """``k`` shots per class of the domain-generalisation classes in the source style (photo)."""
        pool = self.dg_pool()
        indices = sample_few_shot(pool.labels.tolist(), k, seed)
        return pool.subset(indices), indices

    def dg_test(self) -> dict[str, TaskData]:
        """Held-out images of the domain-generalisation classes in each unseen style."""
        if self.version == 1:
            return {
                style: self._classes("dg_test", world.CLASSES, self.test_per_class, style, _SEEDS["dg_test"] + i)
                for i, style in enumerate(TARGET_STYLES)
            }
        seed = _DATASET_SEEDS[DG_DATASET]
        return {
            style: self._dataset_set(DG_DATASET, self.dg_classes(), self.test_per_class, style, seed + 12 + i)
            for i, style in enumerate(TARGET_STYLES)
        }

    def dg_source_test(self) -> TaskData:
        """Held-out photos of the domain-generalisation classes (the source domain, for reference)."""
        if self.version == 1:
            return self._classes("dg_source", world.CLASSES, self.test_per_class, SOURCE_STYLE, _SEEDS["dg_test"] + 99)
        seed = _DATASET_SEEDS[DG_DATASET]
        return self._dataset_set(DG_DATASET, self.dg_classes(), self.test_per_class, SOURCE_STYLE, seed + 19)

    def cross_datasets(self) -> list[str]:
        """The datasets cross-dataset transfer tests on (world 1: the 12 cross-dataset classes, ``"cross"``)."""
        return ["cross"] if self.version == 1 else [d for d in world_v2.DATASETS if d != DG_DATASET]

    def cross_dataset_test(self, dataset: str | None = None) -> TaskData:
        """Held-out photos of every class of a cross-dataset target (default: the first)."""
        dataset = dataset or self.cross_datasets()[0]
        if dataset not in self.cross_datasets():
            from ..config import unknown_name_error

            raise unknown_name_error("cross-dataset target", dataset, self.cross_datasets())
        if self.version == 1:
            return self._classes("cross", world.CROSS_CLASSES, self.test_per_class, SOURCE_STYLE, _SEEDS["cross"])
        spec = world_v2.DATASETS[dataset]
        return self._dataset_set(dataset, spec.classes, self.test_per_class, None, _DATASET_SEEDS[dataset] + 21)

    # -- mixed styles (the refiner's mechanism task) -----------------------------------------------------------------
    def _styled(self, per_class: int, seed: int) -> TaskData:
        """World 2: ``per_class`` images of every domain-generalisation class in *each* style, group = style."""
        if self.version == 1:
            raise ValueError("the mixed-style task exists on world 2 only; pass version=2 (world_version=2).")
        parts = [
            self._dataset_set(DG_DATASET, self.dg_classes(), per_class, style, seed + i)
            for i, style in enumerate(world.STYLES)
        ]
        groups = torch.arange(len(parts)).repeat_interleave(torch.tensor([len(p) for p in parts]))
        return TaskData(
            torch.cat([p.pixel_values for p in parts]),
            torch.cat([p.labels for p in parts]),
            list(self.dg_classes()),
            groups,
            list(world.STYLES),
        )

    def styled_pool(self) -> TaskData:
        """Training pool of the mixed-style task: every domain-generalisation class in every style (groups: the
        styles). The best prompt depends on the image's style, so a per-image prompt has something to gain."""
        key = ("styled_pool", self.pool_per_class)
        if key not in self._cache:
            self._cache[key] = self._styled(self.pool_per_class, _DATASET_SEEDS[DG_DATASET] + 31)
        return self._cache[key]

    def styled_train(self, k: int, seed: int) -> tuple[TaskData, list[int]]:
        """``k`` shots per class *and style* of the mixed-style pool, and the chosen pool indices."""
        pool = self.styled_pool()
        strata = (pool.labels * len(world.STYLES) + pool.groups).tolist()  # one stratum per (class, style)
        indices = sample_few_shot(strata, k, seed)
        return pool.subset(indices), indices

    def styled_test(self) -> TaskData:
        """Held-out images of the mixed-style task: ``test_per_class`` per class and style."""
        key = ("styled_test", self.test_per_class)
        if key not in self._cache:
            self._cache[key] = self._styled(self.test_per_class, _DATASET_SEEDS[DG_DATASET] + 41)
        return self._cache[key]

    # -- spurious correlation -------------------------------------------------------------------------------------
    @staticmethod
    def spurious_group(label: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """Group id = class * n_backgrounds + background index."""
        return label * len(SPURIOUS_BACKGROUNDS) + background

    @staticmethod
    def spurious_group_names() -> list[str]:
        return [f"{c} on {b}" for c in SPURIOUS_CLASSES for b in SPURIOUS_BACKGROUNDS]

    def _spurious_set(self, labels: torch.Tensor, background: torch.Tensor, seed: int) -> TaskData:
        attrs = world.sample_attributes(
            len(labels),
            seed,
            classes=SPURIOUS_CLASSES,
            backgrounds=SPURIOUS_BACKGROUNDS,
            class_idx=labels,
            background=background,
            style=torch.full_like(labels, world.STYLES.index(SOURCE_STYLE)),
        )
        attrs = replace(attrs, size=torch.full_like(labels, world.SIZES.index(SPURIOUS_SIZE)))
        groups = self.spurious_group(labels, background)
        return TaskData(self._render(attrs), labels, list(SPURIOUS_CLASSES), groups, self.spurious_group_names())

    @staticmethod
    def _spurious_train_factors(n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(SPURIOUS_CLASSES)).repeat_interleave(n_per_class)
        n_minority = round(n_per_class * (1 - SPURIOUS_MAJORITY))
        habitat = torch.tensor([SPURIOUS_BACKGROUNDS.index(world.habitat(c)) for c in SPURIOUS_CLASSES])
        background = habitat[labels].clone()
        for c in range(len(SPURIOUS_CLASSES)):
            start = c * n_per_class
            background[start : start + n_minority] = 1 - habitat[c]
        return labels, background

    def spurious_train(self, n_per_class: int, seed: int) -> TaskData:
        """``n_per_class`` images per class; a fraction ``SPURIOUS_MAJORITY`` on the class's habitat (exactly
        rounded, so the correlation is the same for every seed)."""
        labels, background = self._spurious_train_factors(n_per_class)
        return self._spurious_set(labels, background, _SEEDS["spurious_train"] + 1000 * seed)

    def spurious_twins(self, n_per_class: int, seed: int, factor: str = "background") -> TaskData:
        """True counterfactuals of ``spurious_train(n_per_class, seed)``, image by image: the same scene (pose,
        colour, texture, noise) with the other background (``"background"``: the spurious factor changes, the
        class is kept) or with another class (``"class"``: the next class of ``SPURIOUS_CLASSES``, the background
        is kept). Labels and groups are the twins' own."""
        if factor not in ("background", "class"):
            from ..config import unknown_name_error

            raise unknown_name_error("spurious twin factor", factor, ("background", "class"))
        labels, background = self._spurious_train_factors(n_per_class)
        if factor == "background":
            background = 1 - background
        else:
            labels = (labels + 1) % len(SPURIOUS_CLASSES)
        # the world draws every other attribute independently of the explicit class and background
        return self._spurious_set(labels, background, _SEEDS["spurious_train"] + 1000 * seed)

    def spurious_val(self, per_group: int = 20) -> TaskData:
        """A validation set for choices on the spurious task: every (class, background) group with ``per_group``
        images, rendered from its own seed (neither the training sets' nor the test set's)."""
        key = ("spurious_val", per_group)
        if key not in self._cache:
            n_bg = len(SPURIOUS_BACKGROUNDS)
            labels = torch.arange(len(SPURIOUS_CLASSES)).repeat_interleave(n_bg * per_group)
            background = torch.arange(n_bg).repeat_interleave(per_group).repeat(len(SPURIOUS_CLASSES))
            self._cache[key] = self._spurious_set(labels, background, _SEEDS["spurious_test"] + 50_000)
        return self._cache[key]

    def spurious_test(self) -> TaskData:
        """Every (class, background) group with ``test_per_class`` images."""
        key = ("spurious_test", self.test_per_class)
        if key not in self._cache:
            n_bg = len(SPURIOUS_BACKGROUNDS)
            labels = torch.arange(len(SPURIOUS_CLASSES)).repeat_interleave(n_bg * self.test_per_class)
            background = torch.arange(n_bg).repeat_interleave(self.test_per_class).repeat(len(SPURIOUS_CLASSES))
            self._cache[key] = self._spurious_set(labels, background, _SEEDS["spurious_test"])
        return self._cache[key]

    # -- retrieval --------------------------------------------------------------------------------------------------
    def retrieval_test(self) -> TaskData:
        """Captioned held-out images of every shape in every style (labels index the shapes): world 1's 36
        classes with its captions, or world 2's 43 shapes with surface patterns and its web-like captions."""
        key = ("retrieval", self.retrieval_size, self.version)
        if key not in self._cache:
            seed = _SEEDS["retrieval"]
            if self.version == 1:
                classes = world.CLASSES + world.CROSS_CLASSES
                attrs = world.sample_attributes(self.retrieval_size, seed, classes=classes)
                captions = world.captions(attrs, seed)
            else:
                classes = world_v2.ALL_SHAPES
                attrs = world.sample_attributes(self.retrieval_size, seed, classes=classes, patterns=world.PATTERNS)
                captions = world_v2.captions(attrs, seed)
            self._cache[key] = TaskData(self._render(attrs), attrs.class_idx, list(classes), captions=captions)
        return self._cache[key]
