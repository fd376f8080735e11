"""Data: loaders for real datasets in their standard layouts, few-shot splits and input checks.

The embedded procedural world and its tasks belong to the synthetic benchmark (:mod:`prompt_robust.bench`).
"""

from __future__ import annotations

from .fewshot import FewShotSubset, load_split, sample_few_shot, save_split
from .loaders import (
    ImageListDataset,
    image_transform,
    load_celeba,
    load_coop_split,
    load_domainbed,
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
    "load_split",
    "load_waterbirds",
    "sample_few_shot",
    "save_split",
    "split_by_domain",
    "transform_for",
]
