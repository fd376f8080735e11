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
  states, loss history and the :class:`FitConfig`.

Each checkpoint is written into a temporary directory beside it and renamed into place, so a directory named
``checkpoint-<step>`` is always complete. The data order is a pure function of ``(seed, epoch)``, so a resumed
run replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from .config import ConfigMixin, _check, help_field, unknown_name_error
from .eval.metrics import accuracy, accuracy_gap, per_group_accuracy, worst_group_accuracy

__all__ = ["FitConfig", "FitResult", "evaluate", "fit"]

logger = logging.getLogger(__name__)

TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
#: add-ons' running training state (RobustPromptModel.training_state), written only when there is some
ADDON_STATE_NAME = "addon_training_state.safetensors"
STATE_NAME = "trainer_state.json"
_CHECKPOINT_FILES = (TRAINABLE_NAME, OPTIMIZER_NAME, RNG_NAME, STATE_NAME)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_STATE_FORMAT = 1


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

    steps: int | None = help_field(None, "Total optimizer steps. When set, overrides epochs.")
    epochs: int = help_field(1, "Passes over the dataset (used when steps is None).")
    batch_size: int = help_field(32, "Examples per optimizer step (the last batch of an epoch may be smaller).")
    lr: float = help_field(2e-3, "Peak learning rate (CoOp: 0.002 with SGD).")
    optimizer: str = help_field("sgd", "Optimizer: 'sgd' (momentum, as in CoOp) or 'adamw'.")
    momentum: float = help_field(0.9, "SGD momentum (ignored by adamw).")
    weight_decay: float = help_field(5e-4, "Weight decay (L2 for sgd, decoupled for adamw).")
    warmup_steps: int = help_field(0, "Warm-up steps before the cosine decay to 0.")
    warmup: str = help_field(
        "linear", "Warm-up kind: 'linear' (0 -> lr) or 'constant' (hold warmup_lr, as CoOp's 1e-5 for one epoch)."
    )
    warmup_lr: float = help_field(1e-5, "Learning rate held during a 'constant' warm-up.")
    grad_clip: float | None = help_field(None, "Max global L2 norm of the gradients; None: no clipping.")
    seed: int = help_field(0, "Seeds the data order (per epoch) and torch/random/numpy at the start of a fresh run.")
    checkpoint_every: int | None = help_field(
        None, "Save a checkpoint every this many steps (and at the end); 0 or None: off. Needs checkpoint_dir."
    )
    keep_checkpoints: int = help_field(2, "Most recent checkpoints kept on disk; older ones are deleted.")
    log_every: int = help_field(10, "Log the mean loss every this many steps (0: off).")
    progress: bool = help_field(True, "Show a tqdm progress bar.")
    num_workers: int = help_field(0, "DataLoader worker processes.")

    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("sgd", "adamw")
    WARMUPS: ClassVar[tuple[str, ...]] = ("linear", "constant")
    # fields that do not change the trajectory of a run; resuming with other values is fine
    _NON_TRAJECTORY: ClassVar[frozenset[str]] = frozenset(
        {"checkpoint_every", "keep_checkpoints", "log_every", "progress", "num_workers"}
    )

    def __post_init__(self) -> None:
        if self.steps is not None:
            _int_at_least("steps", self.steps, 1)
        _int_at_least("epochs", self.epochs, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _check(self.lr > 0, f"lr must be > 0; got {self.lr!r}.")
        if self.optimizer not in self.OPTIMIZERS:
            raise unknown_name_error("optimizer", self.optimizer, self.OPTIMIZERS)
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1); got {self.momentum!r}.")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay!r}.")
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        if self.steps is not None:
            _check(
                self.warmup_steps < self.steps,
                f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps}); lower warmup_steps.",
            )
        if self.warmup not in self.WARMUPS:
            raise unknown_name_error("warm-up kind", self.warmup, self.WARMUPS)
        _check(self.warmup_lr > 0, f"warmup_lr must be > 0; got {self.warmup_lr!r}.")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, f"grad_clip must be > 0 or None; got {self.grad_clip!r}.")
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed must be an int; got {self.seed!r}."
        )
        if self.checkpoint_every is not None:
            _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        _int_at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _int_at_least("log_every", self.log_every, 0)
        _int_at_least("num_workers", self.num_workers, 0)


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


def _as_batch(batch: Any) -> dict[str, Any]:
    """A collated batch as a dict with 'pixel_values' and 'labels' (plus any extra keys)."""
    if isinstance(batch, Mapping):
        out = dict(batch)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        out = {"pixel_values": batch[0], "labels": batch[1]}
    else:
        raise TypeError(
            "a batch must be a dict with 'pixel_values' and 'labels' (plus optional extra keys) or a "
            f"(pixel_values, labels) pair; got {type(batch).__name__}. Make dataset items (or collate_fn) return one."
        )
    if "pixel_values" not in out:
        raise ValueError(f"the batch has no 'pixel_values'; got keys {sorted(out)}. Rename the input key.")
    return out


def _collate(items: list[Any]) -> dict[str, Any]:
    first = items[0]
    if isinstance(first, (tuple, list)) and len(first) == 2 and not isinstance(first, Mapping):
        pixel_values, labels = default_collate([tuple(item) for item in items])
        return {"pixel_values": pixel_values, "labels": labels}
    return _as_batch(default_collate(items))


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
        collate_fn=collate_fn or _collate,
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


def _save_checkpoint(
    directory: Path,
    step: int,
    *,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    addon_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=directory))
    try:
        save_file({name: p.detach().cpu().contiguous() for name, p in params.items()}, str(tmp / TRAINABLE_NAME))
        if addon_state:
            save_file(addon_state, str(tmp / ADDON_STATE_NAME))

        state_dict = optimizer.state_dict()
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, dict[str, Any]] = {}
        for index, entries in state_dict["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    opt_scalars.setdefault(str(index), {})[name] = _json_safe(value)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME))

        rng_tensors, rng_json = _rng_states()
        save_file(rng_tensors, str(tmp / RNG_NAME))

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
        )
        with open(tmp / STATE_NAME, "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # a rerun reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def _check_params_match(path: Path, saved: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    missing = [name for name in params if name not in saved]
    unexpected = [name for name in saved if name not in params]
    shapes = [
        f"{name}: checkpoint {tuple(saved[name].shape)} vs model {tuple(p.shape)}"
        for name, p in params.items()
        if name in saved and saved[name].shape != p.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"trainable in the model but not in the checkpoint: {', '.join(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not trainable in the model: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes)}")
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters ({'; '.join(parts)}). It was written "
            "by a different model or set of trainable parameters; use another checkpoint_dir or pass resume=False "
            "with an empty directory."
        )


def _load_checkpoint(
    path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, config: FitConfig
) -> dict[str, Any]:
    saved = load_file(str(path / TRAINABLE_NAME))
    _check_params_match(path, saved, params)
    with open(path / STATE_NAME) as fh:
        state = json.load(fh)
    if state.get("format_version") != _STATE_FORMAT:
        raise ValueError(
            f"{path / STATE_NAME} has format_version {state.get('format_version')!r}; this prompt_robust reads "
            f"{_STATE_FORMAT}. Resume with the version that wrote it ({state.get('prompt_robust_version')})."
        )
    opt_class = state["optimizer"]["class"]
    if opt_class != type(optimizer).__name__:
        raise ValueError(
            f"checkpoint {path} holds {opt_class} state but the config asks for {type(optimizer).__name__} "
            f"(optimizer={config.optimizer!r}); resume with the same optimizer or start a fresh checkpoint_dir."
        )
    saved_config = state.get("config", {})
    changed = [
        f"{name}: {saved_config[name]!r} -> {value!r}"
        for name, value in config.to_dict().items()
        if name in saved_config and name not in FitConfig._NON_TRAJECTORY and saved_config[name] != value
    ]
    if changed:
        warnings.warn(
            f"resuming from {path} with a changed FitConfig ({'; '.join(changed)}); the run will not match an "
            "uninterrupted one.",
            stacklevel=3,
        )

    # indices in the saved optimizer state follow the saved parameter order; map them by name to the current one
    current_index = {name: i for i, name in enumerate(params)}
    remap = {str(i): current_index[name] for i, name in enumerate(state["param_names"])}
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(path / OPTIMIZER_NAME)).items():
        _, index, name = key.split(".", 2)
        opt_state.setdefault(remap[index], {})[name] = value
    for index, entries in state["optimizer"]["scalar_state"].items():
        opt_state.setdefault(remap[index], {}).update(entries)
    groups = []
    current_groups, saved_groups = optimizer.state_dict()["param_groups"], state["optimizer"]["param_groups"]
    if len(current_groups) != len(saved_groups):
        raise ValueError(
            f"checkpoint {path} holds {len(saved_groups)} optimizer param group(s); the optimizer has "
            f"{len(current_groups)}. Start a fresh checkpoint_dir."
        )
    for group, saved_group in zip(current_groups, saved_groups, strict=True):
        restored = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items() if k != "params"}
        groups.append({**restored, "params": group["params"]})
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
    _set_rng_states(load_file(str(path / RNG_NAME)), state.get("rng", {}))
    return state


# ----------------------------------------------------------------------------------------------------------------
# fit / evaluate


def fit(
    model: nn.Module,
    dataset: Dataset,
    config: FitConfig | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> FitResult:
    """Train the trainable parameters of ``model`` on ``dataset``; resumable from checkpoints.

    Each step feeds ``model(pixel_values=..., labels=..., **extra)`` with one batch (extra dataset keys such as
    ``"groups"`` are passed through as keyword arguments), backpropagates ``.loss`` and updates every parameter
    with ``requires_grad=True``. Batches are moved to the device of the first trainable parameter. A fresh run
    seeds torch, ``random`` and NumPy with ``config.seed``; a resumed run restores their states instead, so it
    ends bit-identical to an uninterrupted run.

    Args:
        model: module following the contract above, with at least one trainable parameter.
        dataset: map-style dataset of dicts with ``"pixel_values"`` and ``"labels"`` (plus optional extra keys),
            or of ``(pixel_values, label)`` pairs.
        config: optimization options; ``FitConfig()`` when None.
        checkpoint_dir: where ``checkpoint-<step>/`` directories go (needed for ``config.checkpoint_every``).
        resume: continue from the latest complete checkpoint in ``checkpoint_dir`` if there is one. With
            ``resume=False`` the directory must not hold checkpoints of an earlier run.
        collate_fn: turns a list of items into a batch dict (or a ``(pixel_values, labels)`` pair); by default
            tensors are stacked and numbers become tensors.

    Returns:
        A :class:`FitResult` with the step reached and the loss history.

    Raises:
        FloatingPointError: the loss became NaN or infinite (the step is named; lower ``lr``).
        ValueError: no trainable parameters, an empty dataset, or a checkpoint that does not match the model.

    Example:
        >>> result = fit(model, train_set, FitConfig(steps=500, lr=2e-3), checkpoint_dir="runs/coop")  # doctest: +SKIP
        >>> result.final_loss  # doctest: +SKIP
        0.12
    """
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

    device = next(iter(params.values())).device
    optimizer = _OPTIMIZERS[config.optimizer](list(params.values()), config)

    step, losses, resumed_from, last_checkpoint = 0, [], None, None
    existing = _checkpoints(directory) if directory is not None else []
    if existing and not resume:
        raise ValueError(
            f"{directory} already holds checkpoints of an earlier run ({', '.join(p.name for _, p in existing)}); "
            "pass resume=True to continue it, or use an empty checkpoint_dir (or delete them) to start over."
        )
    if existing:
        resumed_from, path = existing[-1]
        state = _load_checkpoint(path, params, optimizer, config)
        if (path / ADDON_STATE_NAME).is_file() and hasattr(model, "load_training_state"):
            model.load_training_state(load_file(str(path / ADDON_STATE_NAME)))
        step, losses, last_checkpoint = resumed_from, list(state.get("losses", [])), str(path)
        if state.get("n_examples") not in (None, n):
            warnings.warn(
                f"the checkpoint was written for a dataset of {state['n_examples']} examples; this one has {n}, "
                "so the data order after resuming differs from the original run.",
                stacklevel=2,
            )
        logger.info("resuming from %s (step %d of %d)", path, step, total_steps)
        if step > total_steps:
            warnings.warn(f"the checkpoint is at step {step}, past the requested {total_steps} steps.", stacklevel=2)
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
            "n_examples": n,
            "losses": losses,
            "config": config.to_dict(),
        }

    was_training = model.training
    model.train()
    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="fit", disable=not config.progress)
    window: list[float] = []
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            batches = _epoch_batches(n, config.batch_size, config.seed, epoch)[skip:]
            for batch in _loader(dataset, batches, collate_fn, config):
                batch = _to_device(_as_batch(batch), device)
                pixel_values, labels = batch.pop("pixel_values"), batch.pop("labels", None)
                if labels is None:
                    raise ValueError(f"the batch has no 'labels'; got keys {[*sorted(batch), 'pixel_values']}.")
                lr = _lr_at(step, total_steps, config)
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
                    raise FloatingPointError(
                        f"the loss is {value} at step {step + 1} (epoch {epoch}, lr {lr:.3g}); training diverged. "
                        f"Lower lr (now {config.lr:g}), set grad_clip, or check the inputs for NaN/inf."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.reshape(()).backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                optimizer.step()

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
                    last_checkpoint = str(
                        _save_checkpoint(
                            directory,
                            step,
                            params=params,
                            optimizer=optimizer,
                            trainer_state=trainer_state(step // steps_per_epoch),
                            keep=config.keep_checkpoints,
                            addon_state=model.training_state() if hasattr(model, "training_state") else None,
                        )
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

    Example:
        >>> evaluate(model, test_set, groups_key="groups")  # doctest: +SKIP
        {'accuracy': 0.91, 'n': 2000, 'per_group': {0: 0.95, 1: 0.72, ...}, 'worst_group': 0.72, 'gap': 0.19}
    """
    _int_at_least("batch_size", batch_size, 1)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty; evaluate needs at least one example.")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or _collate)

    predictions: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    groups: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = _as_batch(batch)
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
