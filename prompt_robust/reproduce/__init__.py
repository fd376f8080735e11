"""Reproduce the seed papers' tables on real data: ``prompt-robust reproduce`` and its Python API.

Four protocols (:data:`PROTOCOLS`): base-to-new generalisation on the 11 CoOp datasets, cross-dataset transfer and
domain generalisation from ImageNet (CoCoOp's Tables 1-3), and spurious correlations (Waterbirds, CelebA). Each
learner trains with its reference recipe (:data:`PRESETS`, read from the CoOp, CoCoOp and MaPLe repositories'
configs), with or without add-ons (``coop+refiner``), over several seeds; every (dataset, method, seed) is saved as
it finishes, so an interrupted run resumes. See ``docs/reproduce.md``.

Example:
    >>> from prompt_robust.reproduce import ReproduceConfig, run_reproduce
    >>> config = ReproduceConfig("base2new", "/data", ["coop", "coop+refiner"])
    >>> report = run_reproduce(config, load_backbone("hf:/models/clip-vit-base-patch16"), "runs/b2n")  # doctest: +SKIP
"""

from __future__ import annotations

from .datasets import DATASETS, DatasetSpec
from .paper import PAPER_NUMBERS, is_paper_backbone
from .presets import PRESETS, LearnerPreset, parse_overrides, resolve_preset
from .protocols import PROTOCOLS, Protocol
from .runner import ReproduceConfig, ReproduceConflictError, ReproduceReport, run_reproduce

__all__ = [
    "DATASETS",
    "PAPER_NUMBERS",
    "PRESETS",
    "PROTOCOLS",
    "DatasetSpec",
    "LearnerPreset",
    "Protocol",
    "ReproduceConfig",
    "ReproduceConflictError",
    "ReproduceReport",
    "is_paper_backbone",
    "parse_overrides",
    "resolve_preset",
    "run_reproduce",
]
