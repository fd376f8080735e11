"""Data: loaders for real datasets in their standard layouts, few-shot splits and input checks.

The embedded procedural world and its tasks belong to the synthetic benchmark (:mod:`prompt_robust.bench`).
"""

from __future__ import annotations

from .fewshot import FewShotSubset, load_split, sample_few_shot, save_split
from .imagenet import (
    load_imagenet,
    load_imagenet_a,
    load_imagenet_r,
    load_imagenet_sketch,
    load_imagenet_targets,
    load_imagenet_v2,
    read_imagenet_classnames,
)
from .loaders import (
    ImageListDataset,
    image_transform,
    load_celeba,
    load_coop_split,
    load_domainbed,
    load_fgvc_aircraft,
    load_waterbirds,
    split_by_domain,
    transform_for,
)

__all__ = [
    "FewShotSubset",
    "ImageListDataset",
    "image_transform",
    "load_celeba",
    "load_coop_split",
    "load_domainbed",
    "load_fgvc_aircraft",
    "load_imagenet",
    "load_imagenet_a",
    "load_imagenet_r",
    "load_imagenet_sketch",
    "load_imagenet_targets",
    "load_imagenet_v2",
    "load_split",
    "load_waterbirds",
    "read_imagenet_classnames",
    "sample_few_shot",
    "save_split",
    "split_by_domain",
    "transform_for",
]
