"""Few-shot data shared by the examples (not an example itself): the embedded world by default, a dataset in
CoOp/Dassl's layout (``split_zhou_<Dataset>.json`` + image folder) when a split file is given.

Base-to-new follows CoCoOp (Zhou et al., https://arxiv.org/abs/2203.05557): the classes are split in half, base
first; prompts are tuned on ``k`` shots of each base class and tested on held-out images of the base classes and,
with the class names swapped, of the new ones. On the embedded world the split is ``prompt_robust.data.tasks``'s.
"""

from __future__ import annotations

import math

import prompt_robust as pr
from prompt_robust.data import ImageListDataset, load_coop_split, sample_few_shot, transform_for
from prompt_robust.data.tasks import WorldTasks
from prompt_robust.eval.metrics import harmonic_mean
from prompt_robust.training import evaluate


def class_subset(data: ImageListDataset, classes: list[int]) -> ImageListDataset:
    """The examples of ``classes``, relabelled ``0..len(classes) - 1`` in that order (a base or new split)."""
    relabel = {c: i for i, c in enumerate(classes)}
    keep = [i for i, y in enumerate(data.labels) if y in relabel]
    return ImageListDataset(
        [data.paths[i] for i in keep],
        [relabel[data.labels[i]] for i in keep],
        [data.classnames[c] for c in classes],
        transform=data.transform,
        root=data.root,
        source=data.source,
    )


def base_to_new_data(
    backbone: pr.ClipBackbone,
    *,
    k: int,
    seed: int,
    split_file: str | None = None,
    image_dir: str | None = None,
    pool_per_class: int = 32,
    test_per_class: int = 50,
):
    """``(k-shot base training set, base test set, new test set, chosen training indices)``: from a CoOp/Dassl
    split file (``split_file`` + ``image_dir``; the first half of the classes, rounded up, are base) or the
    embedded world (``pool_per_class`` / ``test_per_class`` images rendered per class)."""
    if split_file:
        transform = transform_for(backbone)
        train = load_coop_split(split_file, image_dir, "train", transform=transform)
        test = load_coop_split(split_file, image_dir, "test", transform=transform)
        n_base = math.ceil(len(train.classnames) / 2)
        base, new = list(range(n_base)), list(range(n_base, len(train.classnames)))
        shots = sample_few_shot(train.labels, k, seed, classes=base, allow_fewer=True)
        return class_subset(train.subset(shots), base), class_subset(test, base), class_subset(test, new), shots
    tasks = WorldTasks(
        backbone.image_size,
        backbone.image_mean,
        backbone.image_std,
        pool_per_class=pool_per_class,
        test_per_class=test_per_class,
    )
    train, shots = tasks.base_to_new_train(k, seed)
    base_test, new_test = tasks.base_to_new_test()
    return train, base_test, new_test, shots


def base_new_accuracy(model: pr.RobustPromptModel, base_test, new_test) -> dict[str, float]:
    """Accuracy on the base classes, on the new classes (the prompt applied to their names) and the HM."""
    base = evaluate(model, base_test)["accuracy"]
    model.learner.set_classnames(new_test.classnames)
    new = evaluate(model, new_test)["accuracy"]
    model.learner.set_classnames(base_test.classnames)
    return {"base": base, "new": new, "hm": harmonic_mean(base, new)}


def few_shot_data(
    backbone: pr.ClipBackbone,
    *,
    k: int,
    seed: int,
    split_file: str | None = None,
    image_dir: str | None = None,
    pool_per_class: int = 32,
    test_per_class: int = 50,
):
    """``(k-shot training set, test set, chosen training indices)`` over every class: the split file's train and
    test subsets, or the embedded world's 24 classes in the photo style (held-out photos as the test set)."""
    if split_file:
        transform = transform_for(backbone)
        train = load_coop_split(split_file, image_dir, "train", transform=transform)
        shots = sample_few_shot(train.labels, k, seed, allow_fewer=True)
        return train.subset(shots), load_coop_split(split_file, image_dir, "test", transform=transform), shots
    tasks = WorldTasks(
        backbone.image_size,
        backbone.image_mean,
        backbone.image_std,
        pool_per_class=pool_per_class,
        test_per_class=test_per_class,
    )
    train, shots = tasks.dg_train(k, seed)
    return train, tasks.dg_source_test(), shots
