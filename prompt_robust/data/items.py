"""Dataset items as the add-ons read them: dicts ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)``
pairs, and a collate function for the image + label passes the add-ons make over a training set."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checks import check_batch

__all__ = ["collate_images_labels", "hash_items", "item_as_dict", "ordered_loader"]


def item_as_dict(item: Any) -> dict[str, Any]:
    """A dataset item as a dict: mappings are copied, ``(pixel_values, label)`` pairs get those two keys.

    Example:
        >>> sorted(item_as_dict((torch.zeros(3, 2, 2), 1)))
        ['labels', 'pixel_values']
    """
    if isinstance(item, Mapping):
        return dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"pixel_values": item[0], "labels": item[1]}
    raise TypeError(
        "dataset items must be dicts with 'pixel_values' and 'labels' (plus optional keys) or (pixel_values, label) "
        f"pairs; got {type(item).__name__}."
    )


def collate_images_labels(items: list[Any]) -> dict[str, torch.Tensor]:
    """Stack items into ``{"pixel_values": (b, 3, H, W), "labels": (b,) long}`` (other keys are dropped).

    Example:
        >>> batch = collate_images_labels([(torch.zeros(3, 2, 2), 0), {"pixel_values": torch.ones(3, 2, 2), "labels": 1}])
        >>> batch["pixel_values"].shape, batch["labels"].tolist()
        (torch.Size([2, 3, 2, 2]), [0, 1])
    """
    dicts = [item_as_dict(item) for item in items]
    pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in dicts])
    labels = torch.as_tensor([int(item["labels"]) for item in dicts], dtype=torch.long)
    check_batch(pixel_values, labels)  # the add-ons' passes over a training set refuse what forward() refuses
    return {"pixel_values": pixel_values, "labels": labels}


def ordered_loader(dataset: Any, batch_size: int) -> DataLoader:
    """Batches ``{"pixel_values", "labels"}`` of consecutive items, in dataset order (the add-ons' passes over a
    training set)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images_labels)


def hash_items(digest: Any, dataset: Any, indices: Iterable[int]) -> None:
    """Feed the images (as float32 bytes) and labels of ``dataset[i]`` for ``i`` in ``indices`` to ``digest`` (a
    ``hashlib`` object): the data part of the add-ons' cache keys.

    Example:
        >>> import hashlib
        >>> a, b = hashlib.sha256(), hashlib.sha256()
        >>> hash_items(a, [(torch.zeros(3, 2, 2), 0)], [0]); hash_items(b, [(torch.zeros(3, 2, 2), 1)], [0])
        >>> a.hexdigest() == b.hexdigest()
        False
    """
    for index in indices:
        item = item_as_dict(dataset[index])
        digest.update(torch.as_tensor(item["pixel_values"]).to(torch.float32).contiguous().numpy().tobytes())
        digest.update(str(int(item["labels"])).encode())
