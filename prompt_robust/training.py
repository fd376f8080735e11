"""A small, resumable training loop for prompt learners (and any module following the same contract).

The model contract: ``model(pixel_values=..., labels=..., **extra)`` returns an object with ``.loss`` (a scalar
tensor when labels are given) and ``.logits`` ``(batch, n_classes)``; dict-style outputs (``{"loss", "logits"}``)
work too. Only parameters with ``requires_grad=True`` are optimized and checkpointed.

Defaults follow CoOp ("Learning to Prompt for Vision-Language Models", https://arxiv.org/abs/2109.01134):
SGD with momentum 0.9, lr 0.002, weight decay 5e-4, cosine decay after a warm-up.

Checkpoints (``checkpoint_dir/checkpoint-<step>/``, never pickled):

- ``trainable.safetensors``: the trainable parameters by name;
- ``optimizer.safetensors``: optimizer state tensors as ``state.<param_index>.<name>``;
- ``rng_state.safetensors``: torch CPU (and CUDA) RNG states as uint8 tensors;
- ``trainer_state.json``: step, epoch, scalar optimizer state, param groups, scheduler step, Python/NumPy RNG
  states, loss history, the :class:`FitConfig`, the run's fingerprint (dataset, class names, trajectory settings,
  trainable tensors) and the SHA-256 of every tensor file;
- ``diverged.json`` (added later, only to a checkpoint whose weights made the next step non-finite): why it is
  no longer a resume point.

Each checkpoint is written into a temporary directory beside it, fsynced and renamed into place, so a directory
named ``checkpoint-<step>`` is always complete. The data order is a pure function of ``(seed, epoch)``, so a
resumed run replays exactly the batches an uninterrupted run would have seen. Resuming refuses a checkpoint
whose fingerprint differs from the call's (:class:`CheckpointMismatchError`), skips damaged or diverged
checkpoints with a warning, and never rotates away the last checkpoint known to be good. While :func:`fit`
runs, ``checkpoint_dir/fit.lock`` (PID, host, start time) keeps a second run off the directory
(:class:`CheckpointLockedError`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import _io, cache
from .config import ConfigMixin, _check, help_field
from .data.items import batch_as_dict, collate_items
from .eval.metrics import accuracy, accuracy_gap, per_group_accuracy, worst_group_accuracy
from .layers import module_device, non_finite

__all__ = [
    "CheckpointDamagedError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "FitConfig",
    "FitResult",
    "evaluate",
    "fit",
]

logger = logging.getLogger(__name__)

TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
#: add-ons' running training state (RobustPromptModel.training_state), written only when there is some
ADDON_STATE_NAME = "addon_training_state.safetensors"
STATE_NAME = "trainer_state.json"
#: written into a checkpoint whose weights made the next step non-finite: it is skipped when resuming
DIVERGED_NAME = "diverged.json"
#: the lock a running fit holds on its checkpoint_dir
LOCK_NAME = "fit.lock"
_CHECKPOINT_FILES = (TRAINABLE_NAME, OPTIMIZER_NAME, RNG_NAME, STATE_NAME)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_STATE_FORMAT = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another dataset, class list, trainable tensors or training settings.

    Raised by :func:`fit` instead of silently mixing two runs. The message lists every differing item and the
    ways out: another ``checkpoint_dir``; ``resume=False`` after moving the old run away; or
    ``resume="new-settings"`` to continue from the checkpoint's weights with the settings passed now.

    Example:
        >>> issubclass(CheckpointMismatchError, ValueError)
        True
    """


class CheckpointLockedError(RuntimeError):
    """Another live run (this process or another one) holds the lock on the ``checkpoint_dir``.

    The message names the holder's PID, host and start time and how to proceed.

    Example:
        >>> issubclass(CheckpointLockedError, RuntimeError)
        True
    """


class CheckpointDamagedError(RuntimeError):
    """No checkpoint in ``checkpoint_dir`` can be resumed from: each one is damaged or marked diverged.

    The message names every checkpoint folder tried and why it was unusable.

    Example:
        >>> issubclass(CheckpointDamagedError, RuntimeError)
        True
    """


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _check(ok, f"{name} must be an integer >= {minimum}; got {value!r}.")


@dataclass
class FitConfig(ConfigMixin):
    """Options of :func:`fit`.

    Example:
        >>> FitConfig(steps=200, optimizer="adamw", lr=1e-3).optimizer
        'adamw'
    """

    steps: int | None = help_field(None, "Total optimizer steps. When set, overrides epochs.", ge=1)
    epochs: int = help_field(1, "Passes over the dataset (used when steps is None).", ge=1)
    batch_size: int = help_field(32, "Examples per optimizer step (the last batch of an epoch may be smaller).", ge=1)
    lr: float = help_field(2e-3, "Peak learning rate (CoOp: 0.002 with SGD).", gt=0)
    optimizer: str = help_field(
        "sgd", "Optimizer: 'sgd' (momentum, as in CoOp) or 'adamw'.", choices="OPTIMIZERS", kind="optimizer"
    )
    momentum: float = help_field(0.9, "SGD momentum (ignored by adamw).", ge=0, lt=1)
    weight_decay: float = help_field(5e-4, "Weight decay (L2 for sgd, decoupled for adamw).", ge=0)
    warmup_steps: int = help_field(0, "Warm-up steps before the cosine decay to 0.", ge=0)
    warmup: str = help_field(
        "linear",
        "Warm-up kind: 'linear' (0 -> lr) or 'constant' (hold warmup_lr, as CoOp's 1e-5 for one epoch).",
        choices="WARMUPS",
        kind="warm-up kind",
    )
    warmup_lr: float = help_field(1e-5, "Learning rate held during a 'constant' warm-up.", gt=0)
    grad_clip: float | None = help_field(None, "Max global L2 norm of the gradients; None: no clipping.", gt=0)
    seed: int = help_field(
        0,
        "Seeds the data order (per epoch) and torch/random/numpy at the start of a fresh run.",
        ge=0,
        le=2**32 - 1,
        hint="NumPy takes seeds in [0, 2**32 - 1].",
    )
    checkpoint_every: int | None = help_field(
        None, "Save a checkpoint every this many steps (and at the end); 0 or None: off. Needs checkpoint_dir.", ge=0
    )
    keep_checkpoints: int = help_field(2, "Most recent checkpoints kept on disk; older ones are deleted.", ge=1)
    log_every: int = help_field(10, "Log the mean loss every this many steps (0: off).", ge=0)
    progress: bool = help_field(True, "Show a tqdm progress bar.")
    num_workers: int = help_field(0, "DataLoader worker processes.", ge=0)

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("sgd", "adamw")
    WARMUPS: ClassVar[tuple[str, ...]] = ("linear", "constant")
    # fields that do not change the trajectory of a run; resuming with other values is fine
    _NON_TRAJECTORY: ClassVar[frozenset[str]] = frozenset(
        {"checkpoint_every", "keep_checkpoints", "log_every", "progress", "num_workers"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is not None:
            _check(
                self.warmup_steps < self.steps,
                f"FitConfig.warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps}); lower "
                "warmup_steps.",
            )


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        steps: global optimizer step reached (the total, including steps done before a resume).
        final_loss: loss of the last step (NaN if no step was ever taken).
        losses: per-step training loss for every step of the run, ``losses[i]`` is step ``i + 1``
            (restored from the checkpoint when resuming).
        resumed_from: step of the checkpoint this call resumed from, or None for a fresh run.
        last_checkpoint: directory of the last checkpoint written or loaded, or None.
    """

    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    last_checkpoint: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# optimizers and the learning-rate schedule


def _sgd(params: list[nn.Parameter], config: FitConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _adamw(params: list[nn.Parameter], config: FitConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], FitConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


def _lr_at(step: int, total_steps: int, config: FitConfig) -> float:
    """Learning rate of the update made at 0-based ``step``: warm-up, then cosine decay reaching 0 at total_steps."""
    if step < config.warmup_steps:
        if config.warmup == "constant":
            return config.warmup_lr
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# batches


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation that depends only on (seed, epoch), cut into batch_size pieces."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _output_field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    if hasattr(output, name):
        return getattr(output, name)
    raise TypeError(
        f"the model returned a {type(output).__name__} without a {name!r} field; forward must return an object "
        "(or dict) with 'loss' and 'logits'."
    )


def _loader(dataset: Dataset, batches: list[list[int]], collate_fn: Callable | None, config: FitConfig) -> DataLoader:
    # a private generator: creating a DataLoader iterator otherwise draws from the global torch RNG, which would
    # make a resumed run (new iterator mid-epoch) diverge from an uninterrupted one.
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn or collate_items,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in directory, sorted by step."""
    found = []
    if not directory.is_dir():
        return found
    for entry in directory.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if not match or not entry.is_dir():
            continue
        missing = [name for name in _CHECKPOINT_FILES if not (entry / name).is_file()]
        if missing:
            logger.warning("ignoring incomplete checkpoint %s (missing %s)", entry, ", ".join(missing))
            continue
        found.append((int(match.group(1)), entry))
    return sorted(found)


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}  # (n_bytes,) uint8
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    json_states: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency, but stay importable without it
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        json_states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, json_states


def _set_rng_states(tensors: dict[str, torch.Tensor], json_states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds RNG states of {len(cuda)} CUDA device(s) that are not available here; "
                "random ops on the GPU (dropout) will not replay exactly.",
                stacklevel=3,
            )
    if "python" in json_states:
        version, internal, gauss = json_states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in json_states:
        import numpy as np

        kind, keys, pos, has_gauss, cached = json_states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _library_version() -> str | None:
    import prompt_robust

    return getattr(prompt_robust, "__version__", None)


# ----------------------------------------------------------------------------------------------------------------
# fingerprints: what a checkpoint was written for


#: keys of a checkpoint's dataset fingerprint written before the shared dataset identity (prompt_robust.cache)
_LEGACY_DATASET_KEYS = ("items", "indices")


def _dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """The dataset part of a run's fingerprint: its type and :func:`prompt_robust.cache.dataset_identity` without
    reading any item (fit computes it on every call): length, labels, listed files, class names."""
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    return {"type": kind, **cache.dataset_identity(dataset, read_items=False)}


def _model_classnames(model: nn.Module) -> list[str] | None:
    for owner in (model, getattr(model, "learner", None)):
        names = getattr(owner, "classnames", None) if owner is not None else None
        if isinstance(names, Sequence) and not isinstance(names, str):
            return [str(name) for name in names]
    return None


def _config_fingerprint(config: FitConfig) -> dict[str, Any]:
    """The FitConfig fields that define the trajectory (not checkpoint_every, keep_checkpoints, logging...)."""
    out = {k: v for k, v in config.to_dict().items() if k not in FitConfig._NON_TRAJECTORY}
    if config.steps is not None:
        out.pop("epochs")  # ignored when steps is set
    return out


def _tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {name: [list(t.shape), str(t.dtype)] for name, t in tensors.items()}


def _fingerprint(
    model: nn.Module, dataset: Any, config: FitConfig, params: Mapping[str, nn.Parameter]
) -> dict[str, Any]:
    fingerprint = {
        "dataset": _dataset_fingerprint(dataset),
        "classnames": _model_classnames(model),
        "config": _config_fingerprint(config),
        "trainable": _tensor_specs(params),
    }
    return json.loads(json.dumps(_json_safe(fingerprint)))  # as it reads back from trainer_state.json


def _trainable_diff(saved: Mapping[str, list[Any]], current: Mapping[str, list[Any]]) -> list[str]:
    """Differences between two ``{name: [shape, dtype]}`` maps, in the words of the mismatch errors."""
    diffs = []
    missing = [name for name in current if name not in saved]
    unexpected = [name for name in saved if name not in current]
    if missing:
        diffs.append(f"trainable in the model but not in the checkpoint: {', '.join(missing)}")
    if unexpected:
        diffs.append(f"in the checkpoint but not trainable in the model: {', '.join(unexpected)}")
    shapes = [
        f"{name}: checkpoint {tuple(saved[name][0])} vs model {tuple(spec[0])}"
        for name, spec in current.items()
        if name in saved and list(saved[name][0]) != list(spec[0])
    ]
    if shapes:
        diffs.append(f"shape mismatch: {'; '.join(shapes)}")
    return diffs


def _show(value: Any, limit: int = 60) -> str:
    text = "absent" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every item in which the run ``current`` differs from the checkpoint's ``saved`` fingerprint."""
    diffs = []
    saved_data, data = saved.get("dataset") or {}, current["dataset"]
    keys = set(saved_data) | set(data)
    if any(key in _LEGACY_DATASET_KEYS or key.startswith("dataset.") for key in saved_data):
        keys = set(saved_data) & set(data)  # written by an older version: compare the parts both record
    for key in sorted(keys):
        if saved_data.get(key) != data.get(key):
            diffs.append(f"dataset {key}: {_show(saved_data.get(key))} -> {_show(data.get(key))}")
    if saved.get("classnames") != current["classnames"]:
        before, after = saved.get("classnames"), current["classnames"]
        changed = [] if before is None or after is None else sorted(set(before) ^ set(after))[:6]
        detail = f" (differing: {', '.join(changed)})" if changed else ""
        diffs.append(f"model class names: {_show(before)} -> {_show(after)}{detail}")
    saved_config, config = saved.get("config") or {}, current["config"]
    for key in sorted(set(saved_config) | set(config)):
        if saved_config.get(key) != config.get(key):
            diffs.append(f"FitConfig.{key}: {_show(saved_config.get(key))} -> {_show(config.get(key))}")
    saved_specs, specs = saved.get("trainable") or {}, current["trainable"]
    diffs += _trainable_diff(saved_specs, specs)
    dtypes = [
        f"{name}: checkpoint {saved_specs[name][1]} vs model {spec[1]}"
        for name, spec in specs.items()
        if name in saved_specs and saved_specs[name][0] == spec[0] and saved_specs[name][1] != spec[1]
    ]
    if dtypes:
        diffs.append(f"dtype mismatch: {'; '.join(dtypes)}")
    return diffs


def _mismatch_error(path: Path, diffs: list[str], *, new_settings_ok: bool = True) -> CheckpointMismatchError:
    fixes = (
        "pass another checkpoint_dir to start a separate run; or move the old run's checkpoints away and pass "
        "resume=False to start over here"
    )
    if new_settings_ok:
        fixes += (
            "; or pass resume='new-settings' to continue from this checkpoint's weights and step with the settings "
            "passed now (fresh optimizer state, the learning-rate schedule restarts at that step)"
        )
    else:
        fixes += "; resume='new-settings' cannot help: it loads the checkpoint's trainable tensors, which differ"
    return CheckpointMismatchError(
        f"checkpoint {path} was written for another run; resuming would mix two runs. It differs in: "
        f"{'; '.join(diffs)}. To proceed: {fixes}."
    )


# ----------------------------------------------------------------------------------------------------------------
# the directory lock

_HELD_LOCKS: set[str] = set()  # lock files held by fit calls of this process


def _process_start_ticks(pid: int) -> int | None:
    """Start time of a process on this host in clock ticks since boot (proc(5) field 22), or None where /proc
    cannot tell (not Linux). With the PID it identifies a process even when the PID is reused later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields 3.. follow ')': 'comm' may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether the process that wrote a lock (``pid``, started at ``start_ticks``) still runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, run by another user
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie: dead, only not reaped yet
    except (OSError, IndexError):
        pass
    now = _process_start_ticks(pid)
    # another start time: the lock's process is gone and an unrelated one reuses its PID
    return start_ticks is None or now is None or now == start_ticks


class _DirectoryLock:
    """``<directory>/fit.lock``, created with O_CREAT | O_EXCL, holding JSON ``{pid, hostname, started,
    start_ticks}`` (``start_ticks``: the process's start in /proc, to tell a reused PID)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.content = b""

    def _holder(self) -> tuple[bytes, dict[str, Any] | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return b"", {}
        try:
            info = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return raw, None
        return raw, info if isinstance(info, dict) else None

    def _locked_error(self, info: dict[str, Any], why: str) -> CheckpointLockedError:
        started = info.get("started")
        known = isinstance(started, (int, float))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if known else "an unknown time"
        return CheckpointLockedError(
            f"{self.path.parent} is locked by another training run: PID {info.get('pid')} on host "
            f"{info.get('hostname')!r}, started {when} ({why}). Two runs in one checkpoint_dir would merge their "
            "trajectories and delete each other's checkpoints. Wait for it to finish, stop it, or give this run "
            f"another checkpoint_dir; if you are sure no run uses the directory any more, delete {self.path}."
        )

    def acquire(self) -> None:
        host = socket.gethostname()
        for _ in range(200):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                info = {
                    "pid": os.getpid(),
                    "hostname": host,
                    "started": time.time(),
                    "start_ticks": _process_start_ticks(os.getpid()),
                }
                self.content = json.dumps(info).encode()
                with os.fdopen(fd, "wb") as fh:
                    fh.write(self.content)
                    fh.flush()
                    os.fsync(fh.fileno())
                _HELD_LOCKS.add(str(self.path.resolve()))
                return
            raw, info = self._holder()
            if info == {}:
                continue  # released in between: try again
            if info is None:
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10.0:  # its owner is writing it right now
                    time.sleep(0.05)
                    continue
                reason = f"an unreadable lock file {age:.0f} s old"
            else:
                pid, ticks = info.get("pid"), info.get("start_ticks")
                pid = pid if isinstance(pid, int) else -1
                ticks = ticks if isinstance(ticks, int) else None
                if info.get("hostname") != host:
                    raise self._locked_error(info, f"another host: {host!r} cannot tell whether it still runs")
                if pid == os.getpid():
                    if str(self.path.resolve()) in _HELD_LOCKS:
                        raise self._locked_error(
                            info,
                            "another fit call of this very process is using it; a nested fit needs its own "
                            "checkpoint_dir, such as a subfolder",
                        )
                    reason = "this PID, but no fit of this process holds it: left by an earlier process"
                elif _pid_alive(pid, ticks):
                    raise self._locked_error(info, "that process is still running")
                else:
                    reason = f"process {pid} is no longer running"
            self._take_over(raw, reason)
        raise CheckpointLockedError(
            f"could not take the lock {self.path}: other processes keep creating it. Make sure a single run uses "
            "this checkpoint_dir."
        )

    def _take_over(self, raw: bytes, reason: str) -> None:
        """Remove the stale lock ``raw`` unless another process replaced it meanwhile (then put that one back)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != raw:  # a live run took the lock between our read and the rename
            with suppress(FileExistsError):  # a third run took it meanwhile: it is the holder now
                os.link(aside, self.path)
            aside.unlink()
            return
        aside.unlink()
        warnings.warn(
            f"taking over the stale lock {self.path} ({reason}); the run that held it ended without releasing it.",
            stacklevel=6,  # the caller of fit
        )

    def release(self) -> None:
        _HELD_LOCKS.discard(str(self.path.resolve()))
        try:
            if self.path.read_bytes() == self.content:
                self.path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def _directory_lock(directory: Path | None) -> Iterator[None]:
    """Hold ``directory``'s lock for the duration of the block (nothing when directory is None)."""
    if directory is None:
        yield
        return
    lock = _DirectoryLock(directory)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# writing and reading checkpoints


def _write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` durably (fsync) and return its SHA-256."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def _save_checkpoint(
    directory: Path,
    step: int,
    *,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    addon_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically: files fsynced in a temporary folder, then renamed into place."""
    bad = non_finite(params)
    if bad:  # fit checks every update; this guards the rule that a checkpoint never holds non-finite weights
        raise FloatingPointError(
            f"refusing to write checkpoint-{step}: non-finite values in {', '.join(bad)}. Resume from the last good "
            "checkpoint with a lower lr: fit(..., resume='new-settings')."
        )
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=directory))
    try:
        files = {}
        trainable = {name: p.detach().cpu().contiguous() for name, p in params.items()}
        files[TRAINABLE_NAME] = _write_bytes(tmp / TRAINABLE_NAME, save_tensors(trainable))
        if addon_state:
            files[ADDON_STATE_NAME] = _write_bytes(tmp / ADDON_STATE_NAME, save_tensors(addon_state))

        state_dict = optimizer.state_dict()
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for index, entries in state_dict["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(index), {})[name] = _json_safe(value)
        files[OPTIMIZER_NAME] = _write_bytes(tmp / OPTIMIZER_NAME, save_tensors(opt_tensors))

        rng_tensors, rng_json = _rng_states()
        files[RNG_NAME] = _write_bytes(tmp / RNG_NAME, save_tensors(rng_tensors))

        state = dict(trainer_state)
        state.update(
            format_version=_STATE_FORMAT,
            prompt_robust_version=_library_version(),
            step=step,
            param_names=list(params),
            optimizer={
                "class": type(optimizer).__name__,
                "param_groups": _json_safe(state_dict["param_groups"]),
                "scalar_state": opt_scalars,
            },
            scheduler={"step": step, "last_lr": [group["lr"] for group in optimizer.param_groups]},
            rng=rng_json,
            files=files,
        )
        _write_bytes(tmp / STATE_NAME, json.dumps(state).encode())
        _io.fsync_directory(tmp)
        if final.exists():  # a rerun reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _io.fsync_directory(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    return final


def _rotate(directory: Path, keep: int, *, protect: Path | None, written: set[Path], base_step: int) -> None:
    """Delete checkpoints beyond the ``keep`` newest, but never ``protect`` (the last one known good).

    Checkpoints newer than ``base_step`` (the step this call started from) that this call did not write belong to
    an abandoned trajectory (diverged or damaged, or they would have been resumed from) and are deleted too.
    """
    ours = []
    for step, path in _checkpoints(directory):
        if step > base_step and path not in written:
            logger.warning("removing %s: a checkpoint of an abandoned trajectory (newer than the resume point)", path)
            shutil.rmtree(path, ignore_errors=True)
        else:
            ours.append(path)
    for path in ours[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


def _mark_diverged(path: Path, step: int, reason: str) -> None:
    """Record in checkpoint ``path`` that its weights led to the non-finite step ``step`` (atomic write)."""
    tmp = path / f".{DIVERGED_NAME}.tmp"
    try:
        _write_bytes(tmp, json.dumps({"step": step, "reason": reason, "time": time.time()}).encode())
        os.replace(tmp, path / DIVERGED_NAME)
    except OSError as exc:  # the error about the divergence matters more than the marker
        logger.warning("could not mark %s as diverged: %s", path, exc)


class _Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class _Loaded:
    """The files of one checkpoint, read and checked, nothing applied yet."""

    step: int
    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    addon: dict[str, torch.Tensor] | None


def _read_checkpoint(step: int, path: Path) -> _Loaded:
    """Read and verify a checkpoint folder; raise :class:`_Unusable` naming the damaged file or the divergence."""
    if (path / DIVERGED_NAME).exists():
        try:
            reason = json.loads((path / DIVERGED_NAME).read_text()).get("reason", "?")
        except (OSError, ValueError, AttributeError):
            reason = "?"
        raise _Unusable(f"marked as diverged in {DIVERGED_NAME}: its weights led to {reason}")
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Unusable(f"{STATE_NAME} is unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise _Unusable(f"{STATE_NAME} holds a JSON {type(state).__name__}, not an object")
    if state.get("format_version") != _STATE_FORMAT:
        raise ValueError(
            f"{path / STATE_NAME} has format_version {state.get('format_version')!r}; this prompt_robust reads "
            f"{_STATE_FORMAT}. Resume with the version that wrote it ({state.get('prompt_robust_version')})."
        )
    checksums = state.get("files") if isinstance(state.get("files"), dict) else {}
    names = [TRAINABLE_NAME, OPTIMIZER_NAME, RNG_NAME]
    if ADDON_STATE_NAME in checksums or (path / ADDON_STATE_NAME).is_file():
        names.append(ADDON_STATE_NAME)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        try:
            data = (path / name).read_bytes()
        except OSError as exc:
            raise _Unusable(f"{name} is unreadable ({type(exc).__name__}: {exc})") from exc
        expected = checksums.get(name)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise _Unusable(
                f"{name} ({len(data)} bytes) does not match the SHA-256 recorded in {STATE_NAME}: truncated or "
                "overwritten"
            )
        try:
            tensors[name] = load_tensors(data)
        except Exception as exc:  # safetensors raises SafetensorError (and others) on truncated files
            raise _Unusable(f"{name} is not a valid safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        int(state["step"])
        list(state["param_names"])
        optimizer = state["optimizer"] if isinstance(state["optimizer"], dict) else {}
        missing = [key for key in ("class", "param_groups", "scalar_state") if key not in optimizer]
    except (KeyError, TypeError, ValueError) as exc:
        raise _Unusable(f"{STATE_NAME} lacks an entry ({type(exc).__name__}: {exc})") from exc
    if missing:
        raise _Unusable(f"{STATE_NAME} lacks optimizer entries {missing}")
    bad = non_finite(tensors[TRAINABLE_NAME])
    if bad:
        raise _Unusable(f"{TRAINABLE_NAME} holds non-finite weights ({', '.join(bad)})")
    return _Loaded(
        step=step,
        path=path,
        state=state,
        trainable=tensors[TRAINABLE_NAME],
        optimizer=tensors[OPTIMIZER_NAME],
        rng=tensors[RNG_NAME],
        addon=tensors.get(ADDON_STATE_NAME),
    )


def _latest_usable(directory: Path, existing: list[tuple[int, Path]]) -> _Loaded:
    """The newest checkpoint that reads back intact and is not marked diverged; each one skipped is warned about."""
    problems = []
    for step, path in reversed(existing):
        try:
            return _read_checkpoint(step, path)
        except _Unusable as exc:
            problems.append(f"{path.name}: {exc}")
            warnings.warn(
                f"cannot resume from checkpoint {path}: {exc}. Falling back to the previous checkpoint.", stacklevel=4
            )
    raise CheckpointDamagedError(
        f"no checkpoint in {directory} can be resumed from ({'; '.join(problems)}). Restore them from a backup, or "
        "move them away and start over with resume=False."
    )


def _apply_checkpoint(
    loaded: _Loaded,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    config: FitConfig,
    *,
    restore_optimizer: bool,
) -> None:
    """Copy a checkpoint's weights (and optimizer state when ``restore_optimizer``) and RNG states into the run."""
    path, state = loaded.path, loaded.state
    if restore_optimizer:
        opt_class = state["optimizer"]["class"]
        if opt_class != type(optimizer).__name__:
            raise CheckpointMismatchError(
                f"checkpoint {path} holds {opt_class} state but the config asks for {type(optimizer).__name__} "
                f"(optimizer={config.optimizer!r}); resume with the same optimizer, pass resume='new-settings' to "
                "start a fresh optimizer from its weights, or use another checkpoint_dir."
            )
        # indices in the saved optimizer state follow the saved parameter order; map them by name to the current one
        current_index = {name: i for i, name in enumerate(params)}
        remap = {str(i): current_index[name] for i, name in enumerate(state["param_names"])}
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in loaded.optimizer.items():
            _, index, name = key.split(".", 2)
            opt_state.setdefault(remap[index], {})[name] = value
        for index, entries in state["optimizer"]["scalar_state"].items():
            opt_state.setdefault(remap[index], {}).update(entries)
        current_groups, saved_groups = optimizer.state_dict()["param_groups"], state["optimizer"]["param_groups"]
        if len(current_groups) != len(saved_groups):
            raise CheckpointMismatchError(
                f"checkpoint {path} holds {len(saved_groups)} optimizer param group(s); the optimizer has "
                f"{len(current_groups)}. Use another checkpoint_dir, or resume='new-settings' for a fresh optimizer."
            )
        groups = []
        for group, saved_group in zip(current_groups, saved_groups, strict=True):
            restored = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items() if k != "params"}
            groups.append({**restored, "params": group["params"]})
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded.trainable[name].to(device=p.device, dtype=p.dtype))
    _set_rng_states(loaded.rng, state.get("rng", {}))


def _diverged_message(
    what: str, *, step: int, epoch: int, lr: float, config: FitConfig, good: Path | None, note: str = ""
) -> str:
    fix = f"Lower lr (now {config.lr:g}), set grad_clip, or check the inputs for NaN/inf."
    if good is not None:
        fix += (
            f" The last good checkpoint is {good}: continue from it with the lower lr by calling fit again with the "
            "same checkpoint_dir and resume='new-settings'."
        )
    return f"{what} at step {step} (epoch {epoch}, lr {lr:.3g}); training diverged.{note} {fix}"


# ----------------------------------------------------------------------------------------------------------------
# fit / evaluate


def _fit_missing_addons(
    model: nn.Module, dataset: Dataset, config: FitConfig, checkpoint_dir: str | os.PathLike | None
) -> None:
    """Before the prompt stage of a wrapped model: fit the add-ons prompt tuning needs (a feature flow, a
    projection, group statistics) that are not fitted yet, as ``model.fit_addons(phase="before_prompt")`` would,
    seeded by ``config.seed`` and cached under ``<checkpoint_dir>/addon_cache``."""
    unfitted = getattr(model, "unfitted_addons", None)
    if getattr(model, "stage", None) != "prompt" or not callable(unfitted) or not unfitted("before_prompt"):
        return
    logger.info("fit: fitting the add-ons %s before tuning the prompt (model.fit_addons)", unfitted("before_prompt"))
    cache = Path(checkpoint_dir) / "addon_cache" if checkpoint_dir is not None else None
    model.fit_addons(dataset, phase="before_prompt", seed=config.seed, cache_dir=cache, progress=config.progress)


def fit(
    model: nn.Module,
    dataset: Dataset,
    config: FitConfig | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model`` on ``dataset``; resumable from checkpoints.

    Each step feeds ``model(pixel_values=..., labels=..., **extra)`` with one batch (extra dataset keys such as
    ``"groups"`` are passed through as keyword arguments), backpropagates ``.loss`` and updates every parameter
    with ``requires_grad=True``. Batches are moved to the device of the first trainable parameter. A fresh run
    seeds torch, ``random`` and NumPy with ``config.seed``; a resumed run restores their states instead, so it
    ends bit-identical to an uninterrupted run.

    For a wrapped model (:func:`prompt_robust.wrap`) in its ``"prompt"`` stage, the add-ons that prompt tuning
    needs and that are not fitted yet (the counterfactual generator, the invariant projection, the debias groups)
    are fitted on ``dataset`` first, as ``model.fit_addons(dataset, phase="before_prompt")`` does.

    Faults (see the quickstart's "What a training run guarantees"):

    - every update is checked: a non-finite loss, gradient or parameter stops the run with a
      ``FloatingPointError`` before anything non-finite is applied or checkpointed, and a checkpoint whose
      weights made the next step non-finite is marked diverged (``diverged.json``) and no longer resumed from;
    - the last checkpoint known good (its weights gave a finite next step) is never rotated away;
    - a damaged checkpoint (unreadable JSON, truncated or altered tensor file) is skipped with a warning and the
      previous one is used;
    - ``checkpoint_dir/fit.lock`` keeps a second run off the directory while this one runs.

    Args:
        model: module following the contract above, with at least one trainable parameter.
        dataset: map-style dataset of dicts with ``"pixel_values"`` and ``"labels"`` (plus optional extra keys),
            or of ``(pixel_values, label)`` pairs.
        config: optimization options; ``FitConfig()`` when None.
        checkpoint_dir: where ``checkpoint-<step>/`` directories go (needed for ``config.checkpoint_every``).
        resume: what to do with checkpoints already in ``checkpoint_dir``:

            - ``True``: continue the latest good checkpoint, exactly (optimizer state, RNG, schedule). It must
              have been written for the same dataset (length, type, labels, item paths, class names), the
              model's class names, the same trajectory settings of ``config`` (all fields but
              ``checkpoint_every``, ``keep_checkpoints``, ``log_every``, ``progress``, ``num_workers``) and
              the same trainable tensors; otherwise :class:`CheckpointMismatchError` lists what differs.
              Checkpoints of older versions, which carry no fingerprint, are resumed with a warning.
            - ``False``: start a fresh run; refuse a directory that already holds checkpoints.
            - ``"new-settings"``: continue from the latest good checkpoint's trainable weights, step, loss
              history and RNG states with the ``config`` and ``dataset`` passed now (both may differ; only the
              trainable tensors' names and shapes must match). The optimizer state starts fresh and the
              learning-rate schedule (warm-up, then cosine decay to 0) restarts at the checkpoint's step and
              spans the remaining steps up to the new total. Checkpoints written from then on carry the new
              fingerprint, and when the latest good checkpoint already matches the call, this is the same as
              ``True`` (so rerunning the same call after an interruption is still bit-identical).

        collate_fn: turns a list of items into a batch dict (or a ``(pixel_values, labels)`` pair); by default
            :func:`prompt_robust.data.items.collate_items` (tensors are stacked, numbers become tensors, every key
            of the items is kept).

    Returns:
        A :class:`FitResult` with the step reached and the loss history.

    Raises:
        FloatingPointError: the loss, a gradient or a parameter became NaN or infinite (the step and the last
            good checkpoint are named; lower ``lr`` and resume with ``resume="new-settings"``).
        CheckpointMismatchError: the checkpoint to resume was written for another dataset, class list, settings
            or trainable tensors (a ``ValueError``).
        CheckpointLockedError: another live run holds ``checkpoint_dir/fit.lock``.
        CheckpointDamagedError: checkpoints exist but none of them can be resumed from.
        ValueError: no trainable parameters, an empty dataset, an invalid ``resume``, or ``resume=False`` with a
            directory holding checkpoints.

    Example:
        >>> result = fit(model, train_set, FitConfig(steps=500, lr=2e-3), checkpoint_dir="runs/coop")  # doctest: +SKIP
        >>> result.final_loss  # doctest: +SKIP
        0.12
        >>> # diverged at step 300? continue from the last good checkpoint with a lower lr:
        >>> fit(model, train_set, FitConfig(steps=500, lr=5e-4), checkpoint_dir="runs/coop", resume="new-settings")  # doctest: +SKIP
    """
    if not (isinstance(resume, bool) or (isinstance(resume, str) and resume == "new-settings")):
        close = difflib.get_close_matches(str(resume), ["new-settings"], n=1) if isinstance(resume, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"resume must be True (continue the latest good checkpoint), False (start fresh; refuse a directory "
            f"holding checkpoints) or 'new-settings' (continue the latest good checkpoint's weights with the "
            f"settings passed now); got {resume!r}.{hint}"
        )
    config = config if config is not None else FitConfig()
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a FitConfig; got {type(config).__name__}.")
    params = _trainable(model)
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); unfreeze the "
            "prompt parameters before calling fit."
        )
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; fit needs at least one example.")
    _fit_missing_addons(model, dataset, config, checkpoint_dir)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    if config.warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({config.warmup_steps}) must be smaller than the total steps ({total_steps} = "
            f"{config.epochs} epoch(s) x {steps_per_epoch} batches); lower warmup_steps or train longer."
        )
    checkpoint_every = config.checkpoint_every or 0
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint_every and directory is None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every} needs a checkpoint_dir; pass fit(..., checkpoint_dir='...') or "
            "set checkpoint_every=None."
        )
    if directory is not None and checkpoint_every:
        directory.mkdir(parents=True, exist_ok=True)
    # nothing to read or write without the directory: no lock either (refiner stages pass a folder they may not use)
    locked = directory if directory is not None and directory.is_dir() else None
    with _directory_lock(locked):
        return _fit_locked(
            model,
            dataset,
            config,
            params=params,
            directory=directory,
            resume=resume,
            collate_fn=collate_fn,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )


def _fit_locked(
    model: nn.Module,
    dataset: Dataset,
    config: FitConfig,
    *,
    params: dict[str, nn.Parameter],
    directory: Path | None,
    resume: bool | str,
    collate_fn: Callable[[list[Any]], Any] | None,
    total_steps: int,
    steps_per_epoch: int,
) -> FitResult:
    """The body of :func:`fit`, run while holding the checkpoint directory's lock."""
    n = len(dataset)
    checkpoint_every = config.checkpoint_every or 0
    device = next(iter(params.values())).device
    optimizer = _OPTIMIZERS[config.optimizer](list(params.values()), config)
    fingerprint = _fingerprint(model, dataset, config, params)

    step, losses, resumed_from, last_checkpoint, schedule_start = 0, [], None, None, 0
    existing = _checkpoints(directory) if directory is not None else []
    if existing and resume is False:
        raise ValueError(
            f"{directory} already holds checkpoints of an earlier run ({', '.join(p.name for _, p in existing)}); "
            "pass resume=True to continue it (or resume='new-settings' to continue its weights with other "
            "settings), or use an empty checkpoint_dir (or move them away) to start over."
        )
    if existing:
        loaded = _latest_usable(directory, existing)
        saved = loaded.state.get("fingerprint")
        specs = _tensor_specs(loaded.trainable)
        shape_diffs = _trainable_diff(specs, fingerprint["trainable"])
        if saved is None:  # written before fingerprints existed: only the FitConfig can be compared
            if shape_diffs:
                raise _mismatch_error(loaded.path, shape_diffs, new_settings_ok=False)
            warnings.warn(
                f"checkpoint {loaded.path} carries no fingerprint (written by prompt_robust "
                f"{loaded.state.get('prompt_robust_version')}); resuming without checking that the dataset and "
                "settings are those it was written for.",
                stacklevel=3,
            )
            saved_config = loaded.state.get("config") or {}
            changed = [
                f"FitConfig.{name}: {saved_config[name]!r} -> {value!r}"
                for name, value in config.to_dict().items()
                if name in saved_config and name not in FitConfig._NON_TRAJECTORY and saved_config[name] != value
            ]
            if changed and resume is True:
                warnings.warn(
                    f"resuming from {loaded.path} with a changed FitConfig ({'; '.join(changed)}); the run will "
                    "not match an uninterrupted one.",
                    stacklevel=3,
                )
            diffs = changed if resume == "new-settings" else []
        else:
            diffs = _fingerprint_diff(saved, fingerprint)
        if diffs and resume is True:
            raise _mismatch_error(loaded.path, diffs)
        if diffs and shape_diffs:
            raise _mismatch_error(loaded.path, shape_diffs, new_settings_ok=False)
        exact = not diffs
        _apply_checkpoint(loaded, params, optimizer, config, restore_optimizer=exact)
        same_data = saved is None or (saved.get("dataset") == fingerprint["dataset"])
        if loaded.addon is not None and hasattr(model, "load_training_state"):
            if same_data:
                model.load_training_state(loaded.addon)
            else:
                logger.warning("the dataset changed: the add-ons' running training state starts afresh")
        resumed_from = step = loaded.step
        losses = [float(v) for v in loaded.state.get("losses", [])][:step]
        last_checkpoint = str(loaded.path)
        if exact:
            schedule_start = int(loaded.state.get("schedule_start", 0))
            logger.info("resuming from %s (step %d of %d)", loaded.path, step, total_steps)
        else:
            schedule_start = step
            logger.warning(
                "continuing from %s (step %d) with new settings (%s): fresh optimizer state, the learning-rate "
                "schedule restarts at step %d and ends at step %d",
                loaded.path,
                step,
                "; ".join(diffs),
                step,
                total_steps,
            )
        if step > total_steps:
            warnings.warn(f"the checkpoint is at step {step}, past the requested {total_steps} steps.", stacklevel=3)
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        try:
            import numpy as np

            np.random.seed(config.seed)
        except ImportError:  # pragma: no cover
            pass
    if directory is not None:
        for stale in directory.glob(f"{_TMP_PREFIX}*") if directory.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # left behind by a run killed while saving

    logger.info(
        "fit: %d trainable tensors (%d values), %d examples, %d steps (%d per epoch), optimizer %s",
        len(params),
        sum(p.numel() for p in params.values()),
        n,
        total_steps,
        steps_per_epoch,
        config.optimizer,
    )

    def trainer_state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "batch_in_epoch": step - epoch * steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "schedule_start": schedule_start,
            "n_examples": n,
            "losses": losses,
            "config": config.to_dict(),
            "fingerprint": fingerprint,
        }

    # the checkpoint whose weights the next step starts from, and the newest one whose weights gave a finite step
    pending: tuple[int, Path] | None = (step, Path(last_checkpoint)) if last_checkpoint else None
    confirmed: Path | None = None
    written: set[Path] = set()

    def diverged(what: str, *, weights_at_fault: bool, epoch: int, lr: float) -> FloatingPointError:
        good, note = confirmed, ""
        if pending is not None and pending[0] == step:
            if weights_at_fault:
                _mark_diverged(pending[1], step + 1, f"{what} at step {step + 1}")
                note = f" Its weights came from checkpoint {pending[1]}, now marked diverged ({DIVERGED_NAME})."
            else:
                good = pending[1]
        if not weights_at_fault:
            note += " The model's trainable parameters now hold these non-finite values."
        return FloatingPointError(
            _diverged_message(what, step=step + 1, epoch=epoch, lr=lr, config=config, good=good, note=note)
        )

    was_training = model.training
    model.train()
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="fit", disable=not config.progress)
    window: list[float] = []
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = _epoch_batches(n, config.batch_size, config.seed, epoch)[skip:]
            for batch in _loader(dataset, batches, collate_fn, config):
                batch = _to_device(batch_as_dict(batch), device)
                pixel_values, labels = batch.pop("pixel_values"), batch.pop("labels", None)
                if labels is None:
                    raise ValueError(f"the batch has no 'labels'; got keys {[*sorted(batch), 'pixel_values']}.")
                lr = _lr_at(step - schedule_start, total_steps - schedule_start, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                output = model(pixel_values=pixel_values, labels=labels, **batch)
                loss = _output_field(output, "loss")
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(
                        "the model must return a scalar loss tensor when labels are given; got "
                        f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}."
                    )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise diverged(f"the loss is {value}", weights_at_fault=True, epoch=epoch, lr=lr)
                optimizer.zero_grad(set_to_none=True)
                loss.reshape(()).backward()
                bad = non_finite({name: p.grad for name, p in params.items() if p.grad is not None})
                if bad:  # checked before the update, so the parameters keep their last finite values
                    what = f"the gradients of {', '.join(bad)} are non-finite (loss {value:.4g})"
                    raise diverged(what, weights_at_fault=True, epoch=epoch, lr=lr)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                optimizer.step()
                bad = non_finite(params)
                if bad:
                    what = f"the update made {', '.join(bad)} non-finite (loss {value:.4g})"
                    raise diverged(what, weights_at_fault=False, epoch=epoch, lr=lr)
                if pending is not None and pending[0] == step:
                    confirmed = pending[1]  # its weights gave a finite loss, gradients and update

                step += 1
                losses.append(value)
                window.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if config.log_every and step % config.log_every == 0:
                    logger.info("step %d/%d  loss %.4f  lr %.3e", step, total_steps, sum(window) / len(window), lr)
                    window.clear()
                if checkpoint_every and (step % checkpoint_every == 0 or step == total_steps):
                    # the epoch of the *next* step, so a resume starts at the right batch
                    path = _save_checkpoint(
                        directory,
                        step,
                        params=params,
                        optimizer=optimizer,
                        trainer_state=trainer_state(step // steps_per_epoch),
                        addon_state=model.training_state() if hasattr(model, "training_state") else None,
                    )
                    written.add(path)
                    pending, last_checkpoint = (step, path), str(path)
                    _rotate(
                        directory,
                        config.keep_checkpoints,
                        protect=confirmed,
                        written=written,
                        base_step=resumed_from or 0,
                    )
                if step >= total_steps:
                    break
    finally:
        bar.close()
        model.train(was_training)
        # no stale gradients left behind: a later optimiser (another stage, a Trainer with gradient clipping)
        # must not see this run's last gradients
        for param in params.values():
            param.grad = None

    return FitResult(
        steps=step,
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        resumed_from=resumed_from,
        last_checkpoint=last_checkpoint,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    groups_key: str | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``dataset`` (and per-group / worst-group accuracy when groups are given).

    Runs in eval mode under ``torch.no_grad`` and restores the previous train/eval mode afterwards. Labels are
    not passed to the model (no loss is computed); extra dataset keys are passed through as in :func:`fit`.

    Args:
        model: module returning ``.logits`` ``(batch, n_classes)``.
        dataset: items as for :func:`fit`.
        batch_size: examples per forward pass.
        groups_key: name of the item key holding group ids (e.g. ``"groups"``); adds ``"per_group"``
            (group id -> accuracy), ``"worst_group"`` and ``"gap"`` (accuracy - worst_group).
        collate_fn: as for :func:`fit`.

    Returns:
        ``{"accuracy": float, "n": int}`` plus the group metrics when ``groups_key`` is set.

    Raises:
        FloatingPointError: the model returned NaN or infinite logits (the count is named).

    Example:
        >>> evaluate(model, test_set, groups_key="groups")  # doctest: +SKIP
        {'accuracy': 0.91, 'n': 2000, 'per_group': {0: 0.95, 1: 0.72, ...}, 'worst_group': 0.72, 'gap': 0.19}
    """
    _int_at_least("batch_size", batch_size, 1)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; evaluate needs at least one example.")
    device = module_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or collate_items)

    predictions: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    groups: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = batch_as_dict(batch)
            if "labels" not in batch:
                raise ValueError(f"the batch has no 'labels'; got keys {sorted(batch)}.")
            if groups_key is not None:
                if groups_key not in batch:
                    raise ValueError(
                        f"groups_key={groups_key!r} is not a key of the dataset items; got keys {sorted(batch)}. "
                        "Pass the key that holds group ids, or groups_key=None."
                    )
                group = batch[groups_key]
                groups.extend(group.tolist() if isinstance(group, torch.Tensor) else list(group))
            batch_labels = batch.pop("labels")
            batch = _to_device(batch, device)
            logits = _output_field(model(pixel_values=batch.pop("pixel_values"), labels=None, **batch), "logits")
            finite = torch.isfinite(logits)  # (batch, n_classes)
            if not bool(finite.all()):
                start = sum(len(p) for p in predictions)
                raise FloatingPointError(
                    f"{int((~finite).sum())} of the {finite.numel()} logits of examples {start}-"
                    f"{start + len(logits) - 1} are non-finite (NaN or inf), so an accuracy would depend only on "
                    "the labels. Check the model's adapter weights for NaN/inf; if they come from a diverged run, "
                    "retrain with a lower lr (fit(..., resume='new-settings') continues from its last good "
                    "checkpoint)."
                )
            predictions.append(logits.argmax(dim=-1).cpu())  # (batch,)
            labels.append(torch.as_tensor(batch_labels).cpu())  # (batch,)
    finally:
        model.train(was_training)

    preds, labs = torch.cat(predictions), torch.cat(labels)  # (n,), (n,)
    result: dict[str, Any] = {"accuracy": accuracy(preds, labs), "n": int(labs.numel())}
    if groups_key is not None:
        per_group = per_group_accuracy(preds, labs, groups)
        result["per_group"] = per_group
        result["worst_group"] = worst_group_accuracy(per_group)
        result["gap"] = accuracy_gap(result["accuracy"], result["worst_group"])
    return result
