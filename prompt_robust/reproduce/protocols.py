"""The four protocols of the seed papers' tables: what is trained on what, and what is measured on what.

* ``base2new`` (CoCoOp, https://arxiv.org/abs/2203.05557, Table 1): on each of the 11 datasets, the classes (labels
  in the dataset's order) are split as CoCoOp's ``subsample_classes`` does: the first ``ceil(n / 2)`` are *base*, the
  rest *new*; prompts are tuned on 16 shots of each base class of the training split and tested on the test split's
  base classes (over the base names) and new classes (over the new names); HM is their harmonic mean, and the
  average row is the mean base and new accuracy over the datasets with the HM of those two means.
* ``cross_dataset`` (Table 2): tuned on 16 shots of each of ImageNet's 1000 classes, tested on ImageNet and on the
  test split of each of the other ten datasets over that dataset's class names.
* ``domain_generalization`` (Table 3): the same ImageNet prompts, tested on ImageNet and on ImageNet-V2, -Sketch,
  -A and -R (A and R over their own 200 class names).
* ``spurious``: tuned on 16 shots of each class of the training split of Waterbirds and of CelebA (Blond_Hair,
  spurious attribute Male), tested on their test splits; worst-group and average accuracy and their gap. The seed
  papers give no few-shot protocol for these sets; this one is ours (``--shots 0`` trains on the whole split).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import unknown_name_error
from .datasets import BASE_TO_NEW, CROSS_DATASET_TARGETS, DG_TARGETS, SPURIOUS

__all__ = ["PROTOCOLS", "Protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """One table: the datasets prompts are trained on and those they are tested on.

    Attributes:
        name: the ``--protocol`` value.
        title: the table's title.
        sources: datasets trained on (one training per dataset, method and seed).
        targets: datasets tested with the prompts trained on the source (empty: the source itself).
        classes: ``"base"`` (train on the base half of the classes) or ``"all"``.
        metrics: the metric keys of one result, in table order.
        train_group: folder the trainings live in under ``<out>/train/``; protocols with the same group share them
            (cross-dataset and domain generalisation train the same ImageNet prompts).
    """

    name: str
    title: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    classes: str
    metrics: tuple[str, ...]
    train_group: str

    def units(self, source: str) -> tuple[str, ...]:
        """The datasets evaluated for a training on ``source``: the source itself, then the targets."""
        return (source, *self.targets)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "base2new",
            "Base-to-new generalisation (CoCoOp, Table 1)",
            BASE_TO_NEW,
            (),
            "base",
            ("base", "new", "hm"),
            "base2new",
        ),
        Protocol(
            "cross_dataset",
            "Cross-dataset transfer (CoCoOp, Table 2)",
            ("imagenet",),
            CROSS_DATASET_TARGETS,
            "all",
            ("acc",),
            "imagenet",
        ),
        Protocol(
            "domain_generalization",
            "Domain generalisation (CoCoOp, Table 3)",
            ("imagenet",),
            DG_TARGETS,
            "all",
            ("acc",),
            "imagenet",
        ),
        Protocol(
            "spurious",
            "Spurious correlations (worst-group accuracy)",
            SPURIOUS,
            (),
            "all",
            ("worst_group", "avg", "gap"),
            "spurious",
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is answered with the valid ones.

    Example:
        >>> get_protocol("base2new").classes
        'base'
    """
    if name not in PROTOCOLS:
        raise unknown_name_error("protocol", name, list(PROTOCOLS))
    return PROTOCOLS[name]
