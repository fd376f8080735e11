"""Dataset items as the library reads them: dicts ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)``
pairs, and the one way items become a batch (:func:`collate_items`), used by :func:`prompt_robust.training.fit`,
``evaluate`` and the add-ons' passes over a training set."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from .checks import check_batch

__all__ = [
    "batch_as_dict",
    "collate_images_labels",
    "collate_items",
    "item_as_dict",
    "iterate_batches",
    "ordered_loader",
]


def _pair_or_mapping(value: Any) -> dict[str, Any] | None:
    """A mapping as a dict, a ``(pixel_values, labels)`` pair as those two keys; None for anything else."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"pixel_values": value[0], "labels": value[1]}
    return None


def item_as_dict(item: Any) -> dict[str, Any]:
    """A dataset item as a dict: mappings are copied, ``(pixel_values, label)`` pairs get those two keys.

    Example:
        >>> sorted(item_as_dict((torch.zeros(3, 2, 2), 1)))
        ['labels', 'pixel_values']
    """
    out = _pair_or_mapping(item)
    if out is None:
        raise TypeError(
            "dataset items must be dicts with 'pixel_values' and 'labels' (plus optional keys) or (pixel_values, "
            f"label) pairs; got {type(item).__name__}."
        )
    return out


def batch_as_dict(batch: Any) -> dict[str, Any]:
    """A collated batch (the output of a ``collate_fn``) as a dict with ``"pixel_values"`` and ``"labels"`` (plus
    any extra keys): dicts are copied, ``(pixel_values, labels)`` pairs get those two keys.

    Example:
        >>> sorted(batch_as_dict((torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))))
        ['labels', 'pixel_values']
    """
    out = _pair_or_mapping(batch)
    if out is None:
        raise TypeError(
            "a batch must be a dict with 'pixel_values' and 'labels' (plus optional extra keys) or a "
            f"(pixel_values, labels) pair; got {type(batch).__name__}. Make dataset items (or collate_fn) return one."
        )
    if "pixel_values" not in out:
        raise ValueError(f"the batch has no 'pixel_values'; got keys {sorted(out)}. Rename the input key.")
    return out


def collate_items(items: Sequence[Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Items (dicts or ``(pixel_values, label)`` pairs) -> one batch dict, each key collated by torch's
    ``default_collate`` (tensors and arrays stacked, numbers into a tensor, strings into a list).

    Args:
        items: the batch's dataset items.
        keys: the keys to collate, the only ones read from an item; None: every key of the first item (the extra
            keys :func:`prompt_robust.fit` passes to the model, e.g. group ids or an example's index).

    Raises:
        ValueError: an item lacks one of ``keys``.

    Example:
        >>> items = [{"pixel_values": torch.zeros(3, 2, 2), "labels": 0, "groups": 1}, (torch.ones(3, 2, 2), 1)]
        >>> batch = collate_items(items, keys=["pixel_values", "labels"])
        >>> batch["pixel_values"].shape, batch["labels"].tolist()
        (torch.Size([2, 3, 2, 2]), [0, 1])
        >>> sorted(collate_items(items[:1]))
        ['groups', 'labels', 'pixel_values']
    """
    if keys is None:
        dicts = [item_as_dict(item) for item in items]
        keys = list(dicts[0])
    else:
        dicts = [_pick(item, keys) for item in items]
    return {key: default_collate([item[key] for item in dicts]) for key in keys}


def _pick(item: Any, keys: Sequence[str]) -> dict[str, Any]:
    """Only ``keys`` of an item: no other value of a mapping is read (e.g. a true attribute that must stay unseen)."""
    if not isinstance(item, Mapping):
        item = item_as_dict(item)
    missing = [key for key in keys if key not in item]
    if missing:
        raise ValueError(f"dataset items have no {missing} key(s); got keys {sorted(item)}.")
    return {key: item[key] for key in keys}


def collate_images_labels(items: list[Any]) -> dict[str, torch.Tensor]:
    """Stack items into ``{"pixel_values": (b, 3, H, W), "labels": (b,) long}`` (other keys are dropped), checked
    as ``forward()`` checks its inputs.

    Example:
        >>> batch = collate_images_labels([(torch.zeros(3, 2, 2), 0), {"pixel_values": torch.ones(3, 2, 2), "labels": 1}])
        >>> batch["pixel_values"].shape, batch["labels"].tolist()
        (torch.Size([2, 3, 2, 2]), [0, 1])
    """
    batch = collate_items(items, keys=("pixel_values", "labels"))
    pixel_values, labels = batch["pixel_values"], torch.as_tensor(batch["labels"]).long()
    check_batch(pixel_values, labels)  # the add-ons' passes over a training set refuse what forward() refuses
    return {"pixel_values": pixel_values, "labels": labels}


def ordered_loader(dataset: Any, batch_size: int) -> DataLoader:
    """Batches ``{"pixel_values", "labels"}`` of consecutive items, in dataset order (the add-ons' passes over a
    training set)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images_labels)


def iterate_batches(
    dataset: Dataset, batch_size: int, keys: Sequence[str], *, desc: str, progress: bool
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(start, {key: batch})`` over ``dataset`` in order, reading only ``keys`` of each item."""
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty.")
    # only ``keys`` of an item are collated: nothing else (e.g. a true attribute) is ever read
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=partial(collate_items, keys=keys))
    start = 0
    for batch in tqdm(loader, desc=desc, disable=not progress):
        yield start, batch
        start += len(batch[keys[0]])
