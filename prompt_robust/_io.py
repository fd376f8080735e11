"""Safe file writing and reading: atomic replaces, no silent overwrite, safetensors and JSON only.

Temporary files are written next to their target as ``.<target name>.<pid>-<host tag>.<random>.tmp`` (the
writer's process id and a hash of its host name), so a later write can tell an orphan of a killed writer, which
it removes (:func:`remove_stale_temps`), from the live file of a concurrent writer, which it keeps.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _load_safetensors_bytes
from safetensors.torch import load_file
from safetensors.torch import save as _save_safetensors_bytes

__all__ = [
    "HOST_TAG",
    "atomic_write",
    "commit",
    "directory_lock",
    "fsync_directory",
    "parse_json",
    "read_bytes",
    "read_json",
    "read_safetensors",
    "remove_stale_temps",
    "safetensors_bytes",
    "safetensors_from_bytes",
    "stage_bytes",
    "write_json",
    "write_safetensors",
]

#: hash of this machine's host name in temporary file names (a pid is only meaningful on its own host)
HOST_TAG = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
#: default bounds of :func:`read_json` (the files this library writes are far smaller and flatter)
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
#: a temporary file whose writer cannot be checked (another host, or a name without a pid) is an orphan once it
#: has not been modified for this long; one of a live process of this host only after a day (pid reuse)
STALE_AFTER_S = 15 * 60
LIVE_STALE_AFTER_S = 24 * 3600
# what mkstemp puts between prefix and suffix
_RANDOM = r"[a-z0-9_]{8}"
# between ".<target>." and ".tmp": the writer's pid and host tag, then mkstemp's part (older versions: that only)
_MIDDLE = re.compile(rf"(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})\.)?{_RANDOM}")
# a temporary file with a pid, of any target
_TEMP_NAME = re.compile(rf"\.(?P<target>.+)\.\d+-[0-9a-f]{{8}}\.{_RANDOM}\.tmp")
#: folder -> (its modification time when this process last swept it or wrote there, the temporary files it kept
#: then because their writers were alive or they were young); see :func:`atomic_write`
_SWEPT: dict[str, tuple[int | None, tuple[tuple[str, str], ...]]] = {}


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, which other threads would see)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{HOST_TAG}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: never probe there
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # no such process (or no valid pid)
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _is_temp_of(name: str, target: str) -> bool:
    """Whether ``name`` may be a temporary file of ``target`` (the cheap test before any stat)."""
    return name.startswith(f".{target}.") and name.endswith(".tmp")


def _writer(name: str, target: str) -> re.Match | None:
    """The writer part of ``name`` when it is a temporary file of ``target`` by the library's naming: ``pid`` and
    ``host`` groups, both None for a name written by an older version (no pid); None for any other name."""
    return _MIDDLE.fullmatch(name[len(target) + 2 : -len(".tmp")]) if _is_temp_of(name, target) else None


def _is_stale(name: str, target: str, age_s: float) -> bool:
    """Whether ``name`` is an orphaned temporary file of ``target`` (by the library's naming only)."""
    match = _writer(name, target)
    if match is None:
        return False
    if match["pid"] is not None and match["host"] == HOST_TAG:
        return not _pid_alive(int(match["pid"])) or age_s > LIVE_STALE_AFTER_S
    return age_s > STALE_AFTER_S  # another host's, or an older version's: only its age tells


def _remove_if_stale(path: str, target: str, now: float) -> bool | None:
    """Remove ``path`` if it is an orphaned temporary file of ``target``: True when removed, False when kept (it
    may still become one), None when it is gone or not the library's."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:  # renamed into place or removed by its writer meanwhile
        return None
    name = os.path.basename(path)
    if not stat.S_ISREG(info.st_mode) or _writer(name, target) is None:
        return None
    if not _is_stale(name, target, now - info.st_mtime):
        return False
    try:
        os.unlink(path)
    except OSError:  # removed by its writer meanwhile, or not ours to remove
        return None
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the orphaned temporary files of ``path`` left by killed writes; keep live ones.

    Only names of the library's own pattern for this target are considered. A temporary file is an orphan when its
    writer process (same host) is dead, or when it has not been modified for :data:`STALE_AFTER_S` seconds and
    its writer cannot be checked (another host, or a name written by an older version without a pid).

    Args:
        path: the target file (``dir/adapter_model.safetensors``), not the temporary file.

    Returns:
        The files removed.
    """
    path = Path(path)
    try:
        names = [entry.name for entry in os.scandir(path.parent)]
    except OSError:
        return []
    now = time.time()
    candidates = [os.path.join(path.parent, name) for name in names if _is_temp_of(name, path.name)]
    return [Path(p) for p in candidates if _remove_if_stale(p, path.name, now)]


def _sweep(path: Path) -> tuple[tuple[str, str], ...]:
    """Remove the orphans in ``path``'s folder: those of every target (names with a pid) and those of ``path``
    (older names too); return the temporary files kept, as ``(file, target)``."""
    try:
        names = [entry.name for entry in os.scandir(path.parent)]
    except OSError:
        return ()
    now, kept = time.time(), []
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp")):  # the common case: no stat, no regex
            continue
        match = _TEMP_NAME.fullmatch(name)
        target = match["target"] if match is not None else path.name
        if not _is_temp_of(name, target):
            continue
        file = os.path.join(path.parent, name)
        if _remove_if_stale(file, target, now) is False:
            kept.append((file, target))
    return tuple(kept)


def _folder_mtime(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def fsync_directory(directory: str | Path) -> None:
    """Make renames in ``directory`` durable (best effort: some platforms cannot open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_bytes(path: str | Path, data: bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (bytes, or a ``writer(tmp_path)``) to a new temporary file next to ``path``, on disk
    (fsynced) with the usual permissions, and return its path; :func:`commit` renames it into place.

    The caller owns the temporary file: it commits it or deletes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        else:
            os.close(fd)
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files; give the usual permissions instead
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: str | Path, path: str | Path) -> None:
    """Rename the staged ``tmp`` onto ``path`` (atomic: readers see the old or the new file) and make it durable."""
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Write ``path`` through ``writer(tmp_path)`` into a temporary file of the same folder, then rename it in
    place, so a crash never leaves a half-written file where a good one was. Orphans of earlier killed writes
    of ``path`` are removed afterwards (what counts as one: :func:`remove_stale_temps`).

    The folder is listed only when it may hold a new orphan, so that n writes into one folder (a cache of many
    shards) cost O(n), not O(n²): on this process's first write there, and whenever the folder's modification
    time shows a change this process did not make; in between, only the temporary files kept at the last listing
    (live writers, young files) are checked again. A listing removes the orphans of every file of the folder.
    Best effort where modification times are coarse or cached (some network filesystems): an orphan is then
    removed by a later listing, at the latest on the next process's first write there.
    """
    path = Path(path)
    folder = path.parent
    before = _folder_mtime(folder)
    tmp = stage_bytes(path, writer)
    try:
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    last = _SWEPT.get(str(folder))
    if last is None or before is None or last[0] != before:
        kept = _sweep(path)
    else:  # nothing but this process's own writes since the last listing
        now = time.time()
        kept = tuple((file, target) for file, target in last[1] if _remove_if_stale(file, target, now) is False)
    _SWEPT[str(folder)] = (_folder_mtime(folder), kept)


@contextlib.contextmanager
def directory_lock(directory: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory`` (``flock`` on the folder itself: no lock file is left).

    Writers of a multi-file unit (an adapter) take it so two of them never interleave; readers need none. Where
    folders cannot be locked (Windows, some network filesystems) this is a no-op.
    """
    fd = None
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # Windows, or a filesystem without flock: no lock
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` (atomically, see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` (detached contiguous CPU copies: safetensors refuses shared
    or non-contiguous storage)."""
    data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return _save_safetensors_bytes(data, metadata=metadata)


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file to ``path`` (atomically, see :func:`atomic_write`)."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_bytes(path: str | Path, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The content of ``path``, refusing more than ``max_bytes`` without reading them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    with open(path, "rb") as handle:
        if max_bytes is None:
            return handle.read()
        data = handle.read(max_bytes + 1)  # the file may grow after a stat: bound the read itself
    if len(data) > max_bytes:
        raise ValueError(
            f"{what} {str(path)!r} is larger than {max_bytes / (1 << 20):.0f} MiB (at most {max_bytes} bytes are "
            "read); it is not a file this library wrote. Check the path, or re-save the file."
        )
    return data


def _depth_over(value: Any, max_depth: int) -> bool:
    """Whether parsed JSON nests deeper than ``max_depth`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_json(
    path: str | Path, what: str = "file", *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse the JSON file ``path``; every way it can be unreadable raises a ValueError naming the file.

    Args:
        path: the file.
        what: how messages name it (``"adapter config"``).
        max_bytes: refuse larger files (before reading them).
        max_depth: refuse objects and lists nested deeper than this.
    """
    return parse_json(read_bytes(path, what, max_bytes), path, what, max_depth=max_depth)


def parse_json(data: bytes, path: str | Path, what: str = "file", *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON already read from ``path`` (named in errors), as :func:`read_json` does."""
    path = Path(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); JSON "
            "files are UTF-8. The file is damaged or not JSON: re-save it."
        ) from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err}); the file is damaged.") from err
    except RecursionError as err:
        raise ValueError(
            f"{what} {str(path)!r} is nested too deeply to parse (at most {max_depth} levels are accepted); it is "
            "not a file this library wrote. Re-save it."
        ) from err
    if _depth_over(value, max_depth):
        raise ValueError(
            f"{what} {str(path)!r} is nested deeper than {max_depth} levels; it is not a file this library wrote. "
            "Re-save it."
        )
    return value


def safetensors_from_bytes(data: bytes, path: str | Path, what: str = "file") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file already read into ``data`` (from ``path``, named in errors), on the CPU."""
    try:
        return _load_safetensors_bytes(bytes(data))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({err}).") from err


def read_safetensors(
    path: str | Path, what: str = "file", device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of the safetensors file ``path`` (named ``what`` in errors) on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file ({err}).") from err


def move_aside(out: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> Path | None:
    """Move the existing ``paths`` (files or folders under ``out``, absolute or relative to it) into a new
    ``out/replaced-<UTC YYYYmmdd-HHMMSS>/`` (suffixed -2, -3 ... within the same second), keeping their paths
    relative to ``out``; nothing is deleted or copied (a rename on the same file system).

    Returns:
        The new folder, or None when none of ``paths`` exists.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "adapter").mkdir()
        >>> moved = move_aside(out, ["adapter", "missing.json"])
        >>> moved.name.startswith("replaced-"), (moved / "adapter").is_dir(), (out / "adapter").exists()
        (True, True, False)
    """
    out = Path(out)
    present = [out / path for path in paths if (out / path).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target, n = out / f"replaced-{stamp}", 2
    while target.exists():
        target, n = out / f"replaced-{stamp}-{n}", n + 1
    for path in present:
        destination = target / path.relative_to(out)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)
    return target
