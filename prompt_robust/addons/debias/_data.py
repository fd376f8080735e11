"""Dataset plumbing of the debiasing add-on: an index key on training items, batched passes, label columns."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ...data.items import item_as_dict

__all__ = ["INDEX_KEY", "IndexedDataset", "with_index"]

#: the item key :func:`with_index` adds: the example's position in the training set
INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """A dataset whose items also carry their position, ``item["index"] = i``.

    Per-example add-on state (JTT's error set, the pseudo-labels computed in ``prepare``) is looked up by this key
    during training; :func:`prompt_robust.training.fit` passes it to the model with the other item keys.
    Attributes of the wrapped dataset (``labels``, ``groups``, ``classnames``, ...) stay readable.

    Args:
        dataset: a map-style dataset of dict items or ``(pixel_values, label)`` pairs.
        key: the item key the position is stored under.

    Example:
        >>> data = IndexedDataset([(torch.zeros(3), 0), (torch.ones(3), 1)])
        >>> data[1]["index"], data[1]["labels"]
        (1, 1)
    """

    def __init__(self, dataset: Dataset, key: str = INDEX_KEY) -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = item_as_dict(self.dataset[index])
        if self.key in item:
            raise ValueError(
                f"the dataset's items already have a {self.key!r} key; wrap the original dataset once, or rename "
                "that key."
            )
        item[self.key] = int(index) % len(self)
        return item

    def __getattr__(self, name: str) -> Any:
        # only called for names not found normally: delegate (labels, groups, classnames, ...) to the dataset
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


def with_index(dataset: Dataset) -> IndexedDataset:
    """Wrap ``dataset`` so every item carries ``"index"``: its position (needed by mode ``"jtt"``; lets mode
    ``"pseudo"`` look up the pseudo-labels computed in ``prepare`` instead of recomputing them per batch).

    Args:
        dataset: the training set, items as for :func:`prompt_robust.training.fit`.

    Example:
        >>> with_index([(torch.zeros(3), 0)])[0]["index"]
        0
    """
    return dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)


def column(dataset: Dataset, key: str) -> torch.Tensor:
    """Integer ids ``(n,)`` of one item key (``labels``, ``groups``): from the dataset's attribute of that name
    when it has one of the right length (no image is loaded), else read item by item."""
    values = getattr(dataset, key, None)
    if values is not None and not callable(values):
        try:
            out = torch.as_tensor(values if isinstance(values, torch.Tensor) else list(values)).long().flatten()
        except (TypeError, ValueError):
            out = None
        if out is not None and out.numel() == len(dataset):
            return out
    ids = []
    for index in range(len(dataset)):
        item = item_as_dict(dataset[index])
        if key not in item:
            raise KeyError(key)
        ids.append(int(item[key]))
    return torch.tensor(ids, dtype=torch.long)
