"""Interventional pairs of training images, encoded and cached: ``Z`` and ``f(do(x))`` for CLIP-ICM.

Every training image ``x`` is encoded together with its intervened copies ``do_j(x)`` (one column per
intervention, several for the random ones when ``pairs_per_image > 1``) by the learner's prompt-free
``image_features``. The result is cached as one safetensors file named by a fingerprint of everything it
depends on (the backbone's weights, the data, the interventions, the seed), so a rerun loads it instead of
encoding ``(1 + m) x n`` images again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ... import cache
from ...backbones.base import find_backbone
from ...config import field_default
from ...data.items import ordered_loader
from ...layers import module_device
from .config import InvarianceConfig
from .interventions import get_intervention, intervene

__all__ = ["InterventionalFeatures", "interventional_features", "split_fit_val"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass
class InterventionalFeatures:
    """Features of training images and of their intervened copies.

    Attributes:
        clean: ``(n, d)`` features ``f(x)``.
        intervened: ``(n, m, d)`` features ``f(do_j(x))``, one column per entry of ``names``.
        labels: ``(n,)``.
        names: ``m`` column names, ``"<intervention>"`` or ``"<intervention>#<draw>"``.
        cache_path: the cache file they were read from or written to (None without a cache).

    Example:
        >>> feats = InterventionalFeatures(torch.ones(2, 4), torch.zeros(2, 3, 4), torch.tensor([0, 1]), ["a", "b", "c"])
        >>> feats.deltas().shape, feats.intervened_flat()[1].tolist()
        (torch.Size([6, 4]), [0, 0, 0, 1, 1, 1])
    """

    clean: torch.Tensor
    intervened: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    cache_path: Path | None = None

    def __post_init__(self) -> None:
        n, d = self.clean.shape
        if self.intervened.shape != (n, len(self.names), d) or self.labels.shape != (n,):
            raise ValueError(
                f"inconsistent interventional features: clean {tuple(self.clean.shape)}, intervened "
                f"{tuple(self.intervened.shape)} (expected ({n}, {len(self.names)}, {d})), labels "
                f"{tuple(self.labels.shape)}."
            )

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def dim(self) -> int:
        return self.clean.shape[1]

    def deltas(self) -> torch.Tensor:
        """``Δ = f(x) - f(do(x))`` of every pair, ``(n * m, d)``."""
        return (self.clean.unsqueeze(1) - self.intervened).reshape(-1, self.dim)

    def intervened_flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Intervened features ``(n * m, d)`` and their labels ``(n * m,)``."""
        labels = self.labels.repeat_interleave(len(self.names))
        return self.intervened.reshape(-1, self.dim), labels

    def subset(self, index: torch.Tensor | Sequence[int]) -> InterventionalFeatures:
        """The images at ``index`` with all their pairs."""
        index = torch.as_tensor(index, dtype=torch.long)
        return InterventionalFeatures(self.clean[index], self.intervened[index], self.labels[index], list(self.names))


def split_fit_val(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of image indices into a fit part and a held-out validation part.

    Each class with ``n_c >= 2`` images gives ``round(val_fraction · n_c)`` of them, clipped to ``1..n_c - 1``, to
    validation; a class with one image stays in the fit part.

    Returns:
        ``(fit_index, val_index)``, sorted.

    Example:
        >>> fit, val = split_fit_val(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)
        >>> len(fit), len(val)
        (6, 2)
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}.")
    labels = torch.as_tensor(labels).cpu()
    generator = torch.Generator().manual_seed(int(seed))
    val: list[int] = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val.extend(order[:n_val].tolist())
    if not val:
        raise ValueError(
            f"cannot hold out validation images: no class has 2 or more of the {len(labels)} training images. "
            "Give InvarianceConfig lam and dim explicitly, or use more shots."
        )
    val_index = torch.tensor(sorted(val), dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return torch.nonzero(keep).flatten(), val_index


def _columns(interventions: Sequence[str], pairs_per_image: int) -> list[tuple[str, str]]:
    """``(column name, intervention)``: random interventions get ``pairs_per_image`` draws, others one."""
    columns = []
    for name in interventions:
        draws = pairs_per_image if get_intervention(name).random else 1
        columns += [(name if draws == 1 else f"{name}#{i}", name) for i in range(draws)]
    return columns


def _fingerprint(learner: nn.Module, dataset: Dataset, meta: dict[str, Any]) -> str:
    """The cache key: the settings, the encoder and the dataset (:func:`prompt_robust.cache.cache_key`)."""
    from ...learners.base import PromptLearner

    backbone = find_backbone(learner)
    # a reference learner's image_features is its backbone's; a custom one's may depend on any of its tensors
    encoder = backbone if isinstance(learner, PromptLearner) and backbone is not None else learner
    settings = {**meta, "version": _CACHE_VERSION}
    return cache.cache_key("invariance-features", settings, encoder, cache.dataset_digest(dataset))


def interventional_features(
    learner: nn.Module,
    dataset: Dataset,
    interventions: Sequence[str],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pairs_per_image: int = field_default(InvarianceConfig, "pairs_per_image"),
    seed: int = 0,
    batch_size: int = field_default(InvarianceConfig, "feature_batch_size"),
    cache_dir: str | Path | None = None,
    progress: bool = True,
    params: dict[str, dict[str, Any]] | None = None,
) -> InterventionalFeatures:
    """Encode every training image and its intervened copies with ``learner.image_features``.

    Interventions are drawn from one CPU generator seeded with ``seed``, batch after batch in dataset order,
    so the pairs are the same on every run (and device). With ``cache_dir`` the result is stored as
    ``cache_dir/invariance-features-<fingerprint>.safetensors`` and reused by later calls with the same
    backbone, data, interventions, seed and batch size (the data by the library's dataset identity:
    :mod:`prompt_robust.cache`). A cache file that is unreadable, altered or from another entry is recomputed
    and replaced with a warning.

    Args:
        learner: a learner of the contract (its prompt-free ``image_features`` is used).
        dataset: items ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)``; images normalised with
            ``mean``/``std``.
        interventions: names from :data:`~prompt_robust.addons.invariance.IMAGE_INTERVENTIONS`.
        mean / std: the backbone's normalisation.
        pairs_per_image: draws of every random intervention per image.
        seed: seed of the random interventions.
        batch_size: images per batch.
        cache_dir: cache folder; None: no cache.
        progress: show a progress bar.
        params: strength overrides per intervention (``InvarianceConfig.intervention_params``).

    Example:
        >>> feats = interventional_features(learner, train_data, ["grayscale", "invert"],  # doctest: +SKIP
        ...                                 mean=backbone.image_mean, std=backbone.image_std)
        >>> feats.intervened.shape  # doctest: +SKIP
        torch.Size([96, 2, 512])
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: CLIP-ICM needs training images to build interventional pairs.")
    if not interventions:
        raise ValueError("name at least one intervention (see InvarianceConfig.INTERVENTIONS).")
    if pairs_per_image < 1 or batch_size < 1:
        raise ValueError(f"pairs_per_image and batch_size must be >= 1; got {pairs_per_image} and {batch_size}.")
    columns = _columns(interventions, pairs_per_image)
    path = None
    if cache_dir is not None:
        meta = {
            "learner": type(learner).__name__,
            "columns": columns,
            "seed": int(seed),
            "batch_size": int(batch_size),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        }
        if params:  # only when set, so caches written before strength overrides existed stay valid
            meta["params"] = {name: params[name] for name in sorted(params)}
        key = _fingerprint(learner, dataset, meta)
        path = Path(cache_dir) / f"{key}.safetensors"
        names, n = [c for c, _ in columns], len(dataset)
        loaded: list[InterventionalFeatures] = []

        def build(entry: cache.CacheEntry) -> str | None:
            t = entry.tensors
            try:
                loaded.append(InterventionalFeatures(t["clean"], t["intervened"], t["labels"], names, path))
            except ValueError as err:
                return str(err)
            return None

        rows = {"clean": n, "intervened": n, "labels": n}
        place = {"columns": ",".join(names)}
        entry = cache.read_cached(path, key=key, place=place, rows=rows, validate=build, what="interventional features")
        if entry is not None:
            logger.info("interventional features loaded from %s", path)
            return loaded[0]
    device = module_device(learner)
    generator = torch.Generator().manual_seed(int(seed))
    loader = ordered_loader(dataset, batch_size)
    clean, intervened, labels = [], [], []
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="interventional pairs", disable=not progress):
                pixel_values, label = batch["pixel_values"], batch["labels"]
                pixel_values = pixel_values.to(device)
                clean.append(learner.image_features(pixel_values).float().cpu())  # (b, d)
                row = []
                for _, name in columns:
                    changed = intervene(
                        pixel_values, name, mean=mean, std=std, generator=generator, **(params or {}).get(name, {})
                    )
                    row.append(learner.image_features(changed).float().cpu())  # (b, d)
                intervened.append(torch.stack(row, dim=1))  # (b, m, d)
                labels.append(label)
    finally:
        learner.train(was_training)
    feats = InterventionalFeatures(
        torch.cat(clean), torch.cat(intervened), torch.cat(labels), [c for c, _ in columns], path
    )
    if path is not None:
        tensors = {"clean": feats.clean, "intervened": feats.intervened, "labels": feats.labels}
        cache.write_cached(path, tensors, key=key, place={"columns": ",".join(feats.names)})
        logger.info("interventional features cached in %s", path)
    return feats
