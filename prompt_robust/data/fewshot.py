"""Few-shot splits: k examples per class, reproducible from a seed and storable as JSON.

The protocol follows CoOp ("Learning to Prompt for Vision-Language Models", https://arxiv.org/abs/2109.01134):
k images per class drawn at random from the training set, one split per seed. The draw uses only
``random.Random(str_seed).random()``, whose output Python guarantees across versions, and a string seed that
combines ``seed`` and the class, so a split depends neither on the hash seed nor on the torch/NumPy version, and a
class's examples do not change when other classes are added or removed. Saving the split (``save_split``) pins it
exactly for later runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .._io import atomic_write

__all__ = ["FewShotSubset", "check_split", "load_split", "sample_few_shot", "save_split", "unused_indices"]

logger = logging.getLogger(__name__)


def _int_list(name: str, values: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor; got shape {tuple(values.shape)}, {values.dtype}.")
        return [int(v) for v in values.tolist()]
    out = []
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                import numpy as np
            except ImportError:  # pragma: no cover
                np = None
            if np is None or not isinstance(value, np.integer):
                raise ValueError(f"{name} must hold integers; got {value!r} ({type(value).__name__}) at {position}.")
        out.append(int(value))
    return out


def unused_indices(size: int, used: Sequence[int]) -> list[int]:
    """The indices of a pool of ``size`` items that a split did not draw, ascending (a validation set).

    Example:
        >>> unused_indices(5, [3, 0])
        [1, 2, 4]
    """
    return sorted(set(range(size)) - set(_int_list("used", used)))


def sample_few_shot(
    labels: Sequence[int] | torch.Tensor,
    k: int,
    seed: int,
    classes: Sequence[int] | None = None,
    *,
    allow_fewer: bool = False,
) -> list[int]:
    """Indices of ``k`` examples per class, drawn reproducibly from ``seed``.

    Args:
        labels: class index of every example of the full dataset, ``(n,)``.
        k: examples per class (the "shots").
        seed: split seed; the same seed always gives the same indices.
        classes: classes to sample (e.g. the base classes of a base-to-new split); all classes present in
            ``labels`` when None.
        allow_fewer: take all examples of a class that has fewer than ``k`` (with a logged warning) instead of
            raising.

    Returns:
        The chosen dataset indices, sorted ascending.

    Raises:
        ValueError: a class has fewer than ``k`` examples and ``allow_fewer`` is False.

    Example:
        >>> idx = sample_few_shot([0, 0, 0, 1, 1, 1], k=2, seed=1)
        >>> len(idx), sorted({[0, 0, 0, 1, 1, 1][i] for i in idx})
        (4, [0, 1])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    label_list = _int_list("labels", labels)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(label_list):
        by_class.setdefault(label, []).append(index)
    wanted = sorted(by_class) if classes is None else sorted(set(_int_list("classes", classes)))

    chosen: list[int] = []
    for cls in wanted:
        pool = list(by_class.get(cls, []))  # ascending dataset indices of this class
        if len(pool) < k:
            if not allow_fewer:
                raise ValueError(
                    f"class {cls} has only {len(pool)} example(s) but k={k} were requested; lower k, drop the class "
                    "via classes=..., or pass allow_fewer=True to take all of them."
                )
            logger.warning("class %d has only %d example(s) < k=%d; taking all of them", cls, len(pool), k)
        # partial Fisher-Yates shuffle driven by random() only (its output is stable across Python versions)
        rng = random.Random(f"prompt_robust.fewshot:{seed}:{cls}")
        take = min(k, len(pool))
        for i in range(take):
            j = i + int(rng.random() * (len(pool) - i))
            pool[i], pool[j] = pool[j], pool[i]
        chosen.extend(pool[:take])
    return sorted(chosen)


def check_split(indices: Sequence[int] | torch.Tensor, dataset_len: int) -> None:
    """Raise if a split does not fit a dataset: out-of-range or duplicate indices.

    Args:
        indices: dataset indices of the split.
        dataset_len: number of examples in the dataset the split is applied to.

    Raises:
        ValueError: an index is negative, ``>= dataset_len``, or repeated.

    Example:
        >>> check_split([0, 3, 7], dataset_len=10)  # fine, returns None
    """
    values = _int_list("indices", indices)
    bad = [i for i in values if not 0 <= i < dataset_len]
    if bad:
        raise ValueError(
            f"split indices out of range for a dataset of {dataset_len} examples: {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}. The split was made for a different (larger) dataset; "
            "re-sample it with sample_few_shot on this dataset's labels."
        )
    if len(set(values)) != len(values):
        seen: set[int] = set()
        repeated = sorted({i for i in values if i in seen or seen.add(i)})
        raise ValueError(f"split indices must be unique; repeated: {repeated[:10]}.")


def save_split(
    path: str | os.PathLike,
    indices: Sequence[int] | torch.Tensor,
    *,
    meta: dict[str, Any],
    overwrite: bool = False,
) -> None:
    """Write a few-shot split as JSON ``{"indices": [...], **meta}``, atomically.

    Args:
        path: destination ``.json`` file; parent directories are created.
        indices: dataset indices of the split.
        meta: JSON-serializable description stored beside the indices; record at least ``k``, ``seed``, the
            dataset name and ``n_total`` (its size) so the split can be checked later.
        overwrite: replace an existing file (refused by default, to protect published splits).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> save_split("splits/pets_k16_s1.json", idx, meta={"dataset": "pets", "k": 16, "seed": 1,
        ...            "n_total": 3680})  # doctest: +SKIP
    """
    path = Path(path)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict; got {type(meta).__name__}.")
    if "indices" in meta:
        raise ValueError("meta must not contain the key 'indices' (it holds the split itself); rename it.")
    values = _int_list("indices", indices)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace the split stored there.")
    try:
        text = json.dumps({"indices": values, **meta}, indent=1)
    except TypeError as err:
        raise TypeError(f"meta must be JSON-serializable: {err}") from err
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_split(path: str | os.PathLike) -> tuple[list[int], dict[str, Any]]:
    """Read a split written by :func:`save_split`.

    Args:
        path: the ``.json`` file.

    Returns:
        ``(indices, meta)``: the indices as saved and every other stored key.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not valid JSON or has no integer list under ``"indices"``.

    Example:
        >>> indices, meta = load_split("splits/pets_k16_s1.json")  # doctest: +SKIP
        >>> meta["k"]  # doctest: +SKIP
        16
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no few-shot split at {path}; create one with sample_few_shot(...) and save_split({str(path)!r}, ...)."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid few-shot split file (invalid JSON: {err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("indices"), list):
        raise ValueError(
            f"{path} is not a few-shot split file: expected a JSON object with an 'indices' list, got "
            f"{type(data).__name__}{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''}."
        )
    indices = _int_list(f"'indices' in {path}", data.pop("indices"))
    return indices, data


class FewShotSubset(Subset):
    """A dataset restricted to a few-shot split (indices are checked against the dataset's length).

    Args:
        dataset: the full dataset.
        indices: dataset indices of the split, e.g. from :func:`sample_few_shot` or :func:`load_split`.

    Example:
        >>> train = FewShotSubset(full_train, sample_few_shot(labels, k=16, seed=1))  # doctest: +SKIP
        >>> train = FewShotSubset.from_file(full_train, "splits/pets_k16_s1.json")  # doctest: +SKIP
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> None:
        values = _int_list("indices", indices)
        check_split(values, len(dataset))
        super().__init__(dataset, values)

    @classmethod
    def from_file(cls, dataset: Dataset, path: str | os.PathLike) -> FewShotSubset:
        """The subset stored at ``path`` (see :func:`save_split`); checks ``n_total`` when the file records it.

        Args:
            dataset: the full dataset the split was drawn from.
            path: the split's ``.json`` file.

        Example:
            >>> FewShotSubset.from_file(full_train, "splits/pets_k16_s1.json")  # doctest: +SKIP
        """
        indices, meta = load_split(path)
        n_total = meta.get("n_total")
        if n_total is not None and n_total != len(dataset):
            raise ValueError(
                f"split {path} was drawn from a dataset of {n_total} examples but this one has {len(dataset)}; "
                "use the matching dataset or re-sample the split."
            )
        return cls(dataset, indices)
