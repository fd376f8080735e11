"""One home for what the library derives from a training set and keeps: dataset identity, cache keys, checked files.

Every cache of the library (the refiner's target prompts, CLIP-ICM's interventional features, the counterfactual
feature flow) and the resume check of :func:`prompt_robust.fit` need the same three things, done here once:

* :func:`dataset_identity` / :func:`dataset_digest`: what identifies a dataset, by the one policy below;
* :func:`cache_key`: the name of a cache entry, a hash of its kind and of everything it depends on (settings,
  tensors, the backbone and learner by :func:`module_fingerprint`, dataset digests);
* :func:`write_cached` / :func:`read_cached`: safetensors files (plus an optional JSON sidecar) that carry their
  key, their place in the cache and a sha256 of their tensors, all verified on load. A file that is unreadable,
  altered, copied from another entry or swapped with another shard is reported with a :class:`RuntimeWarning` and
  the caller recomputes and replaces it. Nothing is ever unpickled.

**The dataset identity policy** (one for every user):

1. the number of items;
2. every item's label (from the dataset's ``labels``/``targets`` list when it has one, else from its items);
3. every item's identity. When the dataset lists its image files (a ``paths`` or ``files`` list, as the loaders'
   :class:`~prompt_robust.data.ImageListDataset`; torchvision's ``samples``/``imgs`` pairs), it is each file's
   path, size and modification time, read by ``stat`` without opening an image: a renamed, replaced or rewritten
   image changes it. Otherwise it is the item's pixel values *in full* (label, shape and float32 bytes of every
   item, each item read once);
4. for datasets that list their files, the full pixel values of 16 evenly spaced items (the first and the last
   included) as the dataset's transform makes them, which catches a changed transform.

``Subset`` views (:class:`~prompt_robust.data.FewShotSubset` too) map the labels and files of the dataset they view
through their indices. Class names (``classnames``/``classes``) are recorded when the dataset or the one it views
has them.

Why the full pixels rather than a strided sample of them: the item has to be read for its label anyway, and
hashing all of a 224 px image's values (0.6 MB as float32, about 0.3 ms at SHA-256's speed) costs less than
decoding it, while a sample would miss a change confined to a small region (an object patch of a synthetic scene).
Why file identities rather than pixels where the dataset lists its files: reading every image would cost a full
pass of decoding for every cache lookup, and unchanged files under an unchanged transform give unchanged pixels.

The checkpoint fingerprint of :func:`prompt_robust.fit` applies the same policy with ``read_items=False``: fit
computes it on every call, so it never loads an item (an in-memory list's labels are read from its items, which
costs nothing), and records points 2 and 3 only as far as the dataset's own lists give them.

Not covered: anything an item carries besides its pixels and label, randomness in a transform (a random transform
changes item 4, so such a cache is never hit) and the code that turns the data into the cached result.

Example:
    >>> data = [(torch.zeros(3, 2, 2), 0), (torch.ones(3, 2, 2), 1)]
    >>> relabelled = [(torch.zeros(3, 2, 2), 0), (torch.ones(3, 2, 2), 0)]
    >>> dataset_digest(data) == dataset_digest(list(data)), dataset_digest(data) == dataset_digest(relabelled)
    (True, False)
    >>> cache_key("toy-cache", {"steps": 5}, dataset_digest(data))[:10]
    'toy-cache-'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import _io
from .backbones.base import ClipBackbone, find_backbone
from .data.items import item_as_dict
from .layers import non_finite

__all__ = [
    "CacheEntry",
    "cache_key",
    "checksum",
    "dataset_digest",
    "dataset_identity",
    "digest_values",
    "module_fingerprint",
    "read_cached",
    "write_cached",
]

#: bump when what a key hashes changes: entries written under another version are not found again (recomputed)
KEY_VERSION = 1
#: hex digits of a key (80 bits: no accidental collision among any number of cache entries one machine holds)
KEY_DIGITS = 20
#: items whose pixels are hashed in full for a dataset that lists its files (the transform check)
FULL_ITEMS = 16
#: the one safetensors metadata entry of a cached file (a JSON record: safetensors writes several entries in a
#: random order, and an entry recomputed from the same inputs must be the same bytes)
RECORD_KEY = "prompt_robust.cache"

_LABEL_ATTRIBUTES = ("labels", "targets")
_FILE_ATTRIBUTES = ("paths", "files", "samples", "imgs")
_CLASSNAME_ATTRIBUTES = ("classnames", "classes")
_KIND = re.compile(r"[a-z0-9][a-z0-9-]*")


# ----------------------------------------------------------------------------------------------------------------
# digests of values and tensors


def _token(value: Any) -> str:
    """A deterministic, cheap text form of a label or item identity (never an object's address, never pixels)."""
    if isinstance(value, torch.Tensor):
        return repr(value.item()) if value.numel() == 1 else f"tensor{tuple(value.shape)}"
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k!r}:{_token(value[k])}" for k in sorted(value, key=str)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_token(v) for v in value) + "]"
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # a NumPy scalar or one-element array
        return repr(value.item())
    return type(value).__qualname__


def digest_values(values: Any) -> str:
    """16 hex digits of SHA-256 over a sequence of labels or identities: a tensor by its values, a list of ints as
    the same int64 tensor, anything else by a text form of each element.

    Example:
        >>> digest_values([0, 1, 1]) == digest_values(torch.tensor([0, 1, 1]))
        True
    """
    h = hashlib.sha256()
    if isinstance(values, torch.Tensor):
        flat = values.detach().cpu().reshape(-1)  # (n,)
        flat = flat.to(torch.float64) if flat.is_floating_point() else flat.to(torch.int64)
        h.update(f"tensor{tuple(values.shape)}:".encode())
        h.update(flat.numpy().tobytes())
    else:
        if hasattr(values, "tolist"):  # a NumPy array
            values = values.tolist()
        if isinstance(values, list) and all(type(v) is int for v in values):
            return digest_values(torch.tensor(values, dtype=torch.int64))
        for value in values:
            h.update(_token(value).encode())
            h.update(b"\0")
    return h.hexdigest()[:16]


def _update_tensor(h: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and exact bytes to the hashlib object ``h``."""
    data = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes (what a cached file's record holds and
    :func:`read_cached` verifies).

    Example:
        >>> checksum({"a": torch.zeros(2)}) == checksum({"a": torch.zeros(2, dtype=torch.float64)})
        False
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        _update_tensor(h, name, tensors[name])
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# dataset identity


def _attribute(obj: Any, names: tuple[str, ...]) -> Any:
    """The first of ``names`` that ``obj`` has as a sized, non-callable, non-string value, or None."""
    for name in names:
        try:
            value = getattr(obj, name, None)
        except Exception:  # a property that fails is no identity to record
            continue
        if value is None or callable(value) or isinstance(value, (str, bytes)):
            continue
        if isinstance(value, torch.Tensor) or (hasattr(value, "__len__") and hasattr(value, "__iter__")):
            return value
    return None


def _viewed(dataset: Any) -> tuple[Any, list[int]] | None:
    """``(parent, indices)`` of a ``Subset``-like view (``.dataset`` and ``.indices``), else None."""
    parent, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if parent is None or parent is dataset or indices is None or not hasattr(parent, "__getitem__"):
        return None
    try:
        return parent, [int(i) for i in indices]
    except (TypeError, ValueError):
        return None


def _column(dataset: Any, names: tuple[str, ...], depth: int = 0) -> Any:
    """The per-item list ``names`` of ``dataset``, or of the dataset a ``Subset`` views picked by its indices."""
    value = _attribute(dataset, names)
    if value is not None or depth >= 4:
        return value
    view = _viewed(dataset)
    column = _column(view[0], names, depth + 1) if view is not None else None
    if column is None:
        return None
    indices = view[1]
    try:
        if isinstance(column, torch.Tensor):
            return column[torch.tensor(indices, dtype=torch.long)]
        return [column[i] for i in indices]
    except (IndexError, TypeError, KeyError):
        return None


def _file_path(entry: Any) -> str | os.PathLike | None:
    if isinstance(entry, (str, os.PathLike)):
        return entry
    if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], (str, os.PathLike)):
        return entry[0]  # torchvision's (path, class_index) samples
    return None


def _files(dataset: Any) -> list[str | os.PathLike] | None:
    """The image file of every item, when the dataset (or the one it views) lists them; else None."""
    column = _column(dataset, _FILE_ATTRIBUTES)
    if column is None or isinstance(column, torch.Tensor):
        return None
    paths = [_file_path(entry) for entry in column]
    return paths if paths and all(p is not None for p in paths) else None


def _file_identity(path: str | os.PathLike) -> list[Any]:
    """Path, size and modification time: a file renamed, replaced or rewritten in place changes it."""
    try:
        stat = os.stat(path)
    except OSError:  # reported when the image is read; the identity only has to differ from an existing file's
        return [os.fspath(path), None, None]
    return [os.fspath(path), stat.st_size, stat.st_mtime_ns]


def _item_label(item: Any) -> Any:
    if isinstance(item, Mapping):
        return item.get("labels")
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[1]
    return None


def _evenly_spaced(n: int, count: int) -> list[int]:
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)}) if n > 1 else [0]


def _items_digest(dataset: Any, indices: Sequence[int]) -> tuple[str, list[Any]]:
    """16 hex digits over the label, shape and full float32 pixel values of ``dataset[i]`` for ``i`` in ``indices``
    (each item read once), and the labels read."""
    h = hashlib.sha256()
    labels = []
    for index in indices:
        item = item_as_dict(dataset[index])
        label = item.get("labels")
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()  # a 0-dim tensor label is the same label as the int
        labels.append(label)
        pixels = torch.as_tensor(item["pixel_values"]).detach().to("cpu", torch.float32).contiguous()
        h.update(f"{index}:{_token(label)}:{tuple(pixels.shape)};".encode())
        h.update(pixels.numpy())
    return h.hexdigest()[:16], labels


def dataset_identity(dataset: Any, *, read_items: bool = True) -> dict[str, Any]:
    """The identity of ``dataset`` by the module's policy, as named parts (so a difference can be named).

    Args:
        dataset: a map-style dataset (items ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)`` pairs)
            or a list of items.
        read_items: False: load no item (the checkpoint fingerprint of :func:`prompt_robust.fit`); the parts the
            dataset's own lists do not give are then left out.

    Returns:
        ``{"length": n, "labels": ..., "files": ..., "pixels": ..., "classnames": ...}``: the length, and 16 hex
        digits per part the dataset has (``"files"`` only for datasets that list their files; ``"pixels"`` only
        with ``read_items``).

    Example:
        >>> data = [(torch.zeros(3, 2, 2), 0), (torch.ones(3, 2, 2), 1)]
        >>> sorted(dataset_identity(data)), sorted(dataset_identity(data, read_items=False))
        (['labels', 'length', 'pixels'], ['labels', 'length'])
    """
    out: dict[str, Any] = {}
    try:
        n = len(dataset)
    except TypeError:
        if read_items:
            raise TypeError(
                f"a cached result needs a dataset with a length; got {type(dataset).__name__}, which has none. "
                "Pass a map-style dataset (or a list of items)."
            ) from None
        n = None
    else:
        out["length"] = n
    labels = _column(dataset, _LABEL_ATTRIBUTES)
    files = _files(dataset)
    if files is not None:
        out["files"] = digest_values([_file_identity(path) for path in files])
        if read_items and n:
            out["pixels"] = _items_digest(dataset, _evenly_spaced(n, FULL_ITEMS))[0]  # the transform check
    elif read_items:
        out["pixels"], read_labels = _items_digest(dataset, range(n))
        if labels is None:
            labels = read_labels
    if labels is None and isinstance(dataset, (list, tuple)):  # in memory: the labels cost nothing to read
        labels = [_item_label(item) for item in dataset]
    if labels is not None:
        out["labels"] = digest_values(labels)
    classnames = _attribute(dataset, _CLASSNAME_ATTRIBUTES)
    view = _viewed(dataset)
    if classnames is None and view is not None:
        classnames = _attribute(view[0], _CLASSNAME_ATTRIBUTES)
    if classnames is not None:
        out["classnames"] = digest_values(classnames)
    return out


def dataset_digest(dataset: Any) -> str:
    """16 hex digits over :func:`dataset_identity` (every item read at most once): the dataset part of a
    :func:`cache_key`."""
    return digest_values([json.dumps(dataset_identity(dataset), sort_keys=True)])


# ----------------------------------------------------------------------------------------------------------------
# keys


def module_fingerprint(module: nn.Module) -> str:
    """What a model computes with, cheaply: the fingerprint of the CLIP backbone inside it (its weight hash and
    PEFT adapters, see :meth:`~prompt_robust.backbones.base.ClipBackbone.fingerprint`) and the exact bytes of every
    other tensor of its ``state_dict`` (a learner's prompt and meta-net, trainable or not). A backbone alone is its
    fingerprint.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> module_fingerprint(a) == module_fingerprint(b)
        True
    """
    backbone = module if isinstance(module, ClipBackbone) else find_backbone(module)
    h = hashlib.sha256()
    skip: set[int] = set()
    if backbone is not None:
        h.update(f"backbone:{backbone.fingerprint()}|{backbone.peft_description()};".encode())
        skip = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    if module is not backbone:
        for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
            if id(tensor) not in skip:
                _update_tensor(h, name, tensor)
    return h.hexdigest()[:KEY_DIGITS]


def cache_key(kind: str, *parts: Any) -> str:
    """The name of a cache entry: ``"<kind>-<20 hex digits>"`` over :data:`KEY_VERSION`, ``kind`` and ``parts``.

    Args:
        kind: what is cached, lower-case words joined by ``-`` (``"refiner-targets"``); the key starts with it.
        parts: what the entry depends on, in order: JSON-able settings (dicts, lists, strings, numbers; dicts are
            hashed with sorted keys), tensors (dtype, shape and exact values), modules (:func:`module_fingerprint`)
            and dataset digests (:func:`dataset_digest`, a string).

    Raises:
        ValueError: ``kind`` is not a lower-case name; TypeError: a part is none of the above.

    Example:
        >>> key = cache_key("toy-cache", {"lr": 0.1}, torch.arange(3))
        >>> key.startswith("toy-cache-"), key == cache_key("toy-cache", {"lr": 0.2}, torch.arange(3))
        (True, False)
    """
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"a cache kind is lower-case words joined by '-' (e.g. 'refiner-targets'); got {kind!r}.")
    h = hashlib.sha256(f"prompt_robust.cache/{KEY_VERSION}/{kind}".encode())
    for index, part in enumerate(parts):
        h.update(f"\0{index}:".encode())
        if isinstance(part, torch.Tensor):
            _update_tensor(h, "tensor", part)
        elif isinstance(part, nn.Module):
            h.update(f"module:{module_fingerprint(part)}".encode())
        else:
            try:
                text = json.dumps(part, sort_keys=True)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"cache_key part {index} is a {type(part).__name__}, which it cannot hash ({err}); pass JSON-able "
                    "settings, tensors, modules, and dataset_digest(dataset) for a dataset."
                ) from err
            h.update(f"json:{text}".encode())
    return f"{kind}-{h.hexdigest()[:KEY_DIGITS]}"


# ----------------------------------------------------------------------------------------------------------------
# checked files


@dataclass
class CacheEntry:
    """What :func:`read_cached` returns.

    Attributes:
        tensors: the file's tensors (CPU).
        info: the JSON sidecar's values (without its cache record), or None when none was asked for.
    """

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] | None = None


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_cached(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    key: str,
    place: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> None:
    """Write a cache file (atomically): ``tensors`` as safetensors whose metadata record holds ``key``, ``place``
    and the :func:`checksum` of the tensors; with ``info``, also ``<path stem>.json`` (the values plus the same key
    and checksum, which bind it to the tensor file).

    Args:
        path: the ``.safetensors`` file.
        tensors: what is cached.
        key: the entry's :func:`cache_key`.
        place: where in the entry this file belongs (e.g. ``{"batch": "3", "samples": "15..19"}`` for one shard of
            many); :func:`read_cached` refuses the file elsewhere.
        info: JSON-able values stored beside the tensors (e.g. a final loss).
    """
    path = Path(path)
    record = {**(place or {}), "key": key, "sha256": checksum(tensors)}
    _io.write_safetensors(path, tensors, metadata={RECORD_KEY: json.dumps(record, sort_keys=True)})
    if info is not None:
        _io.write_json(_sidecar(path), {**info, "cache": {"key": key, "sha256": record["sha256"]}})


def _problem(
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    key: str,
    place: Mapping[str, Any],
    rows: Mapping[str, int],
    finite: bool,
) -> str | None:
    """Why a read file is not the one expected (None: it is)."""
    if record.get("key") != key:
        return f"it belongs to cache entry {record.get('key')!r}, not {key!r} (copied or renamed from another entry)"
    found = {name: record.get(name) for name in place}
    if found != dict(place):
        return (
            f"it was written for {found} but this file must hold {dict(place)}: shards were swapped, renamed or "
            "copied from another cache"
        )
    if "sha256" not in record:
        return "it carries no checksum"
    if checksum(tensors) != record["sha256"]:
        return "its checksum does not match its contents (a flipped bit or a partial copy)"
    bad = non_finite(tensors) if finite else []
    if bad:
        return f"it holds NaN or Inf (in {', '.join(bad)})"
    wrong = {name: n for name, n in rows.items() if name not in tensors or tensors[name].shape[:1] != (n,)}
    if wrong:
        return f"it lacks tensors or rows (expected first dimensions {wrong})"
    return None


def read_cached(
    path: str | Path,
    *,
    key: str,
    place: Mapping[str, Any] | None = None,
    rows: Mapping[str, int] | None = None,
    finite: bool = False,
    info: bool = False,
    validate: Callable[[CacheEntry], str | None] | None = None,
    what: str = "cache file",
) -> CacheEntry | None:
    """The content of a file :func:`write_cached` wrote, when it is intact and the one expected at ``path``.

    A missing file returns None silently (nothing cached yet). Any other reason not to use the file returns None
    after a :class:`RuntimeWarning` that names the file and the reason, and the caller recomputes and replaces it:
    unreadable, no record (another tool or an older version), another ``key`` or ``place``, a checksum that does
    not match, NaN/Inf (with ``finite``), missing tensors or rows, an unreadable or foreign JSON sidecar (with
    ``info``), or a reason given by ``validate``.

    Args:
        path: the ``.safetensors`` file.
        key / place: what :func:`write_cached` was given.
        rows: tensor name -> expected first dimension; the names must all be present.
        finite: refuse floating-point tensors holding NaN or Inf.
        info: read the JSON sidecar into :attr:`CacheEntry.info` (it must exist and belong to this file).
        validate: a further check of the entry, returning why it cannot be used (or None).
        what: how the warning names the file (``"refiner target cache file"``).
    """
    path = Path(path)
    if not path.is_file():
        return None
    entry, reason = None, None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        reason = f"it is not readable as a safetensors file ({err})"
    else:
        try:
            record = json.loads(metadata[RECORD_KEY])
            if not isinstance(record, dict):
                raise TypeError(type(record).__name__)
        except (KeyError, ValueError, TypeError):
            reason = "it carries no cache record with a checksum (written by another tool or an older version)"
        else:
            reason = _problem(record, tensors, key, place or {}, rows or {}, finite)
            if reason is None:
                entry = CacheEntry(tensors)
                if info:
                    entry.info, reason = _read_sidecar(path, record)
                if reason is None and validate is not None:
                    reason = validate(entry)
    if reason is None:
        return entry
    warnings.warn(
        f"{what} {str(path)!r} is not used: {reason}; recomputing it (the file is replaced).",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _read_sidecar(path: Path, record: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    sidecar = _sidecar(path)
    try:
        values = _io.read_json(sidecar, "cache sidecar")
    except (OSError, ValueError) as err:
        return None, f"its sidecar {sidecar.name} cannot be read ({err})"
    if not isinstance(values, dict) or not isinstance(values.get("cache"), dict):
        return None, f"its sidecar {sidecar.name} carries no cache record"
    bound = values.pop("cache")
    if bound != {"key": record.get("key"), "sha256": record.get("sha256")}:
        return None, f"its sidecar {sidecar.name} belongs to other tensors (a partial write or a copied file)"
    return values, None
