"""What the examples share (not an example itself): their common command-line options and checks, their training
schedule and their data: the embedded world by default, a dataset in CoOp/Dassl's layout
(``split_zhou_<Dataset>.json`` + image folder) when a split file is given.

A script's parser is ``add_data_args`` (backbone and dataset), the script's own options (``--k`` among them), then
``add_run_args`` (schedule, embedded-world sizes, seed and output); ``check_args`` vets what was parsed.

Base-to-new follows CoCoOp (Zhou et al., https://arxiv.org/abs/2203.05557): the classes are split in half, base
first; prompts are tuned on ``k`` shots of each base class and tested on held-out images of the base classes and,
with the class names swapped, of the new ones. On the embedded world the split is ``prompt_robust.bench.tasks``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import prompt_robust as pr
from prompt_robust.bench.tasks import WorldTasks
from prompt_robust.data import ImageListDataset, load_coop_split, sample_few_shot, save_split, transform_for
from prompt_robust.eval.metrics import harmonic_mean
from prompt_robust.training import FitConfig, evaluate

BACKBONE_HELP = "embedded, hf:<dir> or open_clip:<model>:<weights>."


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def add_data_args(parser: argparse.ArgumentParser, data: str, *, backbone_help: str = BACKBONE_HELP) -> None:
    """``--backbone`` and the options naming a dataset, ``data``: ``"split"`` (``--split-file`` + ``--image-dir``, a
    CoOp/Dassl split), ``"waterbirds"`` (``--root``) or ``"domainbed"`` (``--root`` + ``--test-domain``); without
    them a script runs on the embedded world."""
    parser.add_argument("--backbone", default="embedded", help=backbone_help)
    if data == "split":
        parser.add_argument("--split-file", help="CoOp/Dassl split_zhou_<Dataset>.json; default: the embedded world.")
        parser.add_argument("--image-dir", help="Image root the split file's paths are relative to.")
    elif data == "waterbirds":
        parser.add_argument("--root", help="Waterbirds folder with metadata.csv; default: the embedded spurious task.")
    elif data == "domainbed":
        parser.add_argument("--root", help="DomainBed folder <root>/<domain>/<class>/<image>; default: embedded world.")
        parser.add_argument("--test-domain", nargs="+", help="DomainBed: the held-out domain(s); the rest is training.")
    else:
        raise ValueError(f"data is 'split', 'waterbirds' or 'domainbed', not {data!r}")


def add_run_args(
    parser: argparse.ArgumentParser,
    data: str,
    *,
    out_default: str,
    out_help: str,
    seed_help: str | None = None,
    steps: int | None = 200,
    steps_help: str | None = "Prompt-tuning steps (AdamW, cosine decay).",
    lr: float | None = 2e-3,
    lr_help: str | None = None,
    overwrite_help: str = "Replace an adapter already saved in --out.",
    resume_help: str | None = None,
) -> None:
    """``--steps`` (left out with ``steps=None``), ``--batch-size`` and ``--lr`` (left out with ``lr=None``), the
    embedded world's sizes (``data`` as for ``add_data_args``), ``--seed``, ``--out``, ``--resume`` (only with
    ``resume_help``), ``--overwrite`` and ``--quiet``."""
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    if lr is not None:
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--lr", type=float, default=lr, help=lr_help)
    if data == "waterbirds":  # the embedded spurious task: training images per class, test images per group
        parser.add_argument("--train-per-class", type=int, default=64, help="Embedded task: training images per class.")
        parser.add_argument("--test-per-class", type=int, default=50, help="Embedded task: test images per group.")
    else:
        parser.add_argument(
            "--pool-per-class", type=int, default=32, help="Embedded world: images the shots come from."
        )
        parser.add_argument("--test-per-class", type=int, default=50, help="Embedded world: test images per class.")
    parser.add_argument("--seed", type=int, default=1, help=seed_help)
    parser.add_argument("--out", default=out_default, help=out_help)
    if resume_help:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, adapters: Sequence[str]) -> Path:
    """``--out`` as a path, once the options are found to go together (``--split-file`` with ``--image-dir``,
    DomainBed's ``--root`` with ``--test-domain``) and none of the ``adapters`` folders in it already holds an
    adapter unless ``--overwrite`` is given; ``parser.error`` (exit status 2) otherwise."""
    if "split_file" in vars(args) and bool(args.split_file) != bool(args.image_dir):
        parser.error("--split-file and --image-dir go together.")
    if "test_domain" in vars(args) and args.root and not args.test_domain:
        parser.error("--root needs --test-domain (the held-out domain or domains).")
    out = Path(args.out)
    for name in adapters:
        if (out / name / "adapter_config.json").exists() and not args.overwrite:
            parser.error(f"{out / name} already holds an adapter; pass --overwrite or choose another --out.")
    return out


def fit_config(args: argparse.Namespace, **changes) -> FitConfig:
    """The examples' schedule: ``--steps`` of AdamW at ``--lr`` (a short warm-up, then cosine decay) on batches of
    ``--batch-size``, seeded by ``--seed``, progress bars unless ``--quiet``; ``changes``: other ``FitConfig``
    fields."""
    config = FitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        warmup_steps=min(10, args.steps // 10),
        seed=args.seed,
        progress=not args.quiet,
    )
    return dataclasses.replace(config, **changes)


def save_shots(path: Path, shots, args: argparse.Namespace, world: str) -> None:
    """The chosen training indices to ``path``, with the dataset (``--split-file``, or ``world`` when there is
    none), ``--k`` and ``--seed``; an existing file is only replaced with ``--overwrite``."""
    meta = {"dataset": args.split_file or world, "k": args.k, "seed": args.seed}
    save_split(path, shots, meta=meta, overwrite=args.overwrite)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def world_tasks(backbone: pr.ClipBackbone, args: argparse.Namespace) -> WorldTasks:
    """The embedded world at the backbone's resolution and normalisation: ``--pool-per-class`` images per class
    to draw the shots from, ``--test-per-class`` test images per class."""
    return WorldTasks(
        backbone.image_size,
        backbone.image_mean,
        backbone.image_std,
        pool_per_class=args.pool_per_class,
        test_per_class=args.test_per_class,
    )


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


def base_to_new_data(backbone: pr.ClipBackbone, args: argparse.Namespace):
    """``(k-shot base training set, base test set, new test set, chosen training indices)``: from a CoOp/Dassl
    split file (``--split-file`` + ``--image-dir``; the first half of the classes, rounded up, are base) or the
    embedded world (``world_tasks``); ``--k`` shots drawn with ``--seed``."""
    if args.split_file:
        transform = transform_for(backbone)
        train = load_coop_split(args.split_file, args.image_dir, "train", transform=transform)
        test = load_coop_split(args.split_file, args.image_dir, "test", transform=transform)
        n_base = math.ceil(len(train.classnames) / 2)
        base, new = list(range(n_base)), list(range(n_base, len(train.classnames)))
        shots = sample_few_shot(train.labels, args.k, args.seed, classes=base, allow_fewer=True)
        return class_subset(train.subset(shots), base), class_subset(test, base), class_subset(test, new), shots
    tasks = world_tasks(backbone, args)
    train, shots = tasks.base_to_new_train(args.k, args.seed)
    base_test, new_test = tasks.base_to_new_test()
    return train, base_test, new_test, shots


def base_new_accuracy(model: pr.RobustPromptModel, base_test, new_test) -> dict[str, float]:
    """Accuracy on the base classes, on the new classes (the prompt applied to their names) and the HM."""
    base = evaluate(model, base_test)["accuracy"]
    model.learner.set_classnames(new_test.classnames)
    new = evaluate(model, new_test)["accuracy"]
    model.learner.set_classnames(base_test.classnames)
    return {"base": base, "new": new, "hm": harmonic_mean(base, new)}


def print_base_new(results: dict[str, dict[str, float]], k: int, seed: int) -> None:
    """The base / new / HM accuracy table, a row per method of ``results`` (as ``base_new_accuracy`` gives them)."""
    width = max(len(name) for name in [*results, "method"]) + 2
    print(f"base-to-new, {k} shots per base class, seed {seed} (accuracy)")
    print(f"{'method':{width}s} {'base':>6s} {'new':>6s} {'hm':>6s}")
    for method, values in results.items():
        print(f"{method:{width}s} " + " ".join(f"{values[key]:6.3f}" for key in ("base", "new", "hm")))


def few_shot_data(backbone: pr.ClipBackbone, args: argparse.Namespace):
    """``(k-shot training set, test set, chosen training indices)`` over every class: the split file's train and
    test subsets, or the embedded world's 24 classes in the photo style (held-out photos as the test set); ``--k``
    shots drawn with ``--seed``."""
    if args.split_file:
        transform = transform_for(backbone)
        train = load_coop_split(args.split_file, args.image_dir, "train", transform=transform)
        shots = sample_few_shot(train.labels, args.k, args.seed, allow_fewer=True)
        test = load_coop_split(args.split_file, args.image_dir, "test", transform=transform)
        return train.subset(shots), test, shots
    tasks = world_tasks(backbone, args)
    train, shots = tasks.dg_train(args.k, args.seed)
    return train, tasks.dg_source_test(), shots
