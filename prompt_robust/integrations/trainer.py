"""Hugging Face ``Trainer`` integration: a thin callback plus the metric function for robust evaluation.

Nothing in the core imports this module (or ``transformers.Trainer``). The wrapped model's ``forward`` already
returns the loss (task loss, add-on reweighting and regularizers), so the Trainer needs no custom
``compute_loss``; the callback only schedules the add-ons' own stages, and saves adapter files.

Typical use::

    args = TrainingArguments(output_dir="out", remove_unused_columns=False, label_names=["labels", "groups"], ...)
    trainer = Trainer(
        model=wrapped,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=robust_metrics,
        callbacks=[RobustCallback(train, addon_start_step=100)],
    )
    trainer.train()
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..model import RobustPromptModel

__all__ = ["ADAPTER_SUBDIR", "TRAINING_STATE_FILE", "RobustCallback", "robust_metrics"]

logger = logging.getLogger(__name__)

#: where the callback writes adapter files inside each Trainer checkpoint folder
ADAPTER_SUBDIR = "robust_adapter"
#: the add-ons' running training state inside each Trainer checkpoint folder (when there is some)
TRAINING_STATE_FILE = "robust_training_state.safetensors"


def _unwrap(model: Any) -> RobustPromptModel:
    """The RobustPromptModel inside a DDP / Accelerate wrapper."""
    while not isinstance(model, RobustPromptModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, RobustPromptModel):
        raise TypeError(
            f"RobustCallback needs a model built by prompt_robust.wrap(); the Trainer holds a {type(model).__name__}."
        )
    return model


def _sync_addons(robust: RobustPromptModel) -> None:
    """Under distributed training, give every rank rank 0's add-on state (and prompt, if an add-on stage moved it).

    Every rank fits the add-ons on the full training set with the same seed, which gives the same result on
    identical hardware; the broadcast makes that a guarantee (different kernels or BLAS builds per rank would
    otherwise let the ranks drift apart unnoticed, since DDP only synchronises the gradients of the prompt).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*robust.addons.parameters(), *robust.addons.buffers(), *robust._learner_trainable]:
            if tensor.is_floating_point() or tensor.dtype in (torch.long, torch.int):
                dist.broadcast(tensor.data, src=0)


def _checkpoint(args: Any, step: int) -> Path:
    """The Trainer's checkpoint folder of ``step``."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


class RobustCallback(TrainerCallback):
    """Schedules the add-ons' stages inside a ``transformers.Trainer`` run and saves adapter files.

    * at the start of training: ``model.fit_addons(train_dataset, phase="before_prompt")`` — what add-ons need
      before the prompt is tuned (on resume too: it is deterministic and cached; the add-ons' running state, such
      as the debias EMA, is then restored from ``<checkpoint>/robust_training_state.safetensors``, written on
      every save);
    * after ``addon_start_step`` prompt steps (the warm-up): ``model.fit_addons(train_dataset,
      phase="after_prompt")`` — e.g. the refiner's targets and generator; the Trainer then continues tuning the prompt with the add-ons active;
    * on every save: the adapter files (``adapter_config.json`` + ``adapter_model.safetensors``) in
      ``<checkpoint>/robust_adapter``; at the end of training in ``<output_dir>/robust_adapter``.

    The Trainer must keep extra dataset keys (``remove_unused_columns=False``, checked at start-up) so that
    group labels reach the model and the metrics.

    Args:
        train_dataset: the training set the add-ons fit on (the Trainer's own).
        addon_start_step: optimizer step after which ``fit_addons`` runs; None: at the end of training.
        cache_dir: where add-ons cache derived data (default ``<output_dir>/addon_cache``).
        save_adapter: write adapter files on save and at the end.

    Example:
        >>> callback = RobustCallback(train_data, addon_start_step=100)  # doctest: +SKIP
    """

    def __init__(
        self,
        train_dataset: Any,
        *,
        addon_start_step: int | None = None,
        cache_dir: str | Path | None = None,
        save_adapter: bool = True,
    ) -> None:
        if addon_start_step is not None and addon_start_step < 0:
            raise ValueError(f"addon_start_step must be >= 0 or None; got {addon_start_step!r}.")
        self.train_dataset = train_dataset
        self.addon_start_step = addon_start_step
        self.cache_dir = cache_dir
        self.save_adapter = save_adapter
        self.logs: dict[str, float] = {}

    def _cache(self, args: Any) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(args.output_dir) / "addon_cache"

    def on_init_end(self, args, state, control, **kwargs):
        if args.remove_unused_columns:
            raise ValueError(
                "RobustCallback: set TrainingArguments(remove_unused_columns=False). The Trainer would otherwise drop "
                "dataset keys the model's forward does not name, such as the 'groups' the add-ons and robust "
                "metrics read."
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        robust = _unwrap(model)
        # also on resume: what these fits derive is deterministic (and cached), and add-ons whose fitted state is
        # not in the checkpoint's weights (the debias groups) need it; their running state is restored next
        self.logs.update(
            robust.fit_addons(self.train_dataset, phase="before_prompt", seed=args.seed, cache_dir=self._cache(args))
        )
        if state.global_step > 0:
            saved = _checkpoint(args, state.global_step) / TRAINING_STATE_FILE
            if saved.is_file():
                robust.load_training_state(load_file(str(saved)))
            elif running := robust.training_state():
                logger.warning(
                    "RobustCallback: resuming at step %d without %s; the add-ons' running state (%s) restarts from "
                    "its fitted values.",
                    state.global_step,
                    saved,
                    ", ".join(sorted(running)),
                )
        _sync_addons(robust)
        if self.addon_start_step == 0 and state.global_step == 0:
            self._fit_addons(robust, args)

    def _fit_addons(self, robust: RobustPromptModel, args: Any) -> None:
        if len(robust.stages()) == 1:
            return
        logger.info("RobustCallback: training the add-ons' stages %s", robust.stages()[1:])
        was_training = robust.training
        self.logs.update(
            robust.fit_addons(
                self.train_dataset, phase="after_prompt", seed=args.seed, cache_dir=self._cache(args), progress=False
            )
        )
        _sync_addons(robust)
        robust.train(was_training)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.addon_start_step and state.global_step == self.addon_start_step:
            self._fit_addons(_unwrap(model), args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        robust = _unwrap(model)
        if self.addon_start_step is None or self.addon_start_step > state.global_step:
            self._fit_addons(robust, args)
        if self.save_adapter and state.is_world_process_zero:
            robust.save_pretrained(Path(args.output_dir) / ADAPTER_SUBDIR, overwrite=True)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        robust = _unwrap(model)
        checkpoint = _checkpoint(args, state.global_step)
        training_state = robust.training_state()
        if training_state:
            checkpoint.mkdir(parents=True, exist_ok=True)
            save_file(training_state, str(checkpoint / TRAINING_STATE_FILE))
        if self.save_adapter:
            robust.save_pretrained(checkpoint / ADAPTER_SUBDIR, overwrite=True)


def robust_metrics(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: accuracy, and with group labels worst-group accuracy and the gap.

    Pass ``label_names=["labels", "groups"]`` in ``TrainingArguments`` so the Trainer collects the groups; the
    label ids then arrive as ``(labels, groups)``.
    """
    from ..eval.metrics import accuracy_gap, per_group_accuracy, worst_group_accuracy

    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    label_ids = eval_prediction.label_ids
    groups = None
    if isinstance(label_ids, (tuple, list)):
        label_ids, groups = label_ids[0], (label_ids[1] if len(label_ids) > 1 else None)
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(label_ids)
    metrics = {"accuracy": float((predictions == labels).mean())}
    if groups is not None:
        per_group = per_group_accuracy(torch.as_tensor(predictions), torch.as_tensor(labels), torch.as_tensor(groups))
        metrics["worst_group_accuracy"] = worst_group_accuracy(per_group)
        metrics["gap"] = accuracy_gap(metrics["accuracy"], metrics["worst_group_accuracy"])
        for group, value in sorted(per_group.items()):
            metrics[f"group_{group}_accuracy"] = value
    return metrics
