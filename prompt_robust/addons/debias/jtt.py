"""Just Train Twice (Liu et al., "Just Train Twice: Improving Group Robustness without Training Group
Information", https://arxiv.org/abs/2107.09044): the identification stage.

JTT trains in two stages. (1) An ERM model is trained for a short while; the training examples it misclassifies
form the *error set*. (2) A fresh model is trained with the error set upweighted by ``λ_up``. Stage (2) is the
``"jtt"`` mode of :class:`~prompt_robust.addons.debias.DebiasReweighting`; this module provides stage (1)'s error set.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from ...config import field_default
from ...data.items import iterate_batches
from ...layers import module_device
from .config import DebiasConfig

__all__ = ["jtt_error_set"]


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = output["logits"] if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"the model returned a {type(output).__name__} without logits.")
    return logits


@torch.no_grad()
def jtt_error_set(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = field_default(DebiasConfig, "batch_size"),
    progress: bool = True,
) -> torch.Tensor:
    """Positions of the training examples ``model`` misclassifies (JTT's error set), in eval mode.

    Paper: https://arxiv.org/abs/2107.09044

    Args:
        model: the ERM model of the identification run (a wrapped model, a learner, any module returning logits
            or an object with ``.logits``).
        dataset: the training set, in the order the second run will index it (items with ``pixel_values`` and
            ``labels``; nothing else is read).
        batch_size: examples per forward pass.
        progress: show a progress bar.

    Returns:
        Sorted ``(n_errors,)`` long tensor of positions in ``dataset``.

    Example:
        >>> erm = pr.wrap(pr.build_learner("coop", backbone, classnames))  # doctest: +SKIP
        >>> fit(erm, train, FitConfig(steps=60))  # a short identification run  # doctest: +SKIP
        >>> errors = jtt_error_set(erm, train)  # doctest: +SKIP
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    errors = []
    try:
        keys = ["pixel_values", "labels"]
        for start, batch in iterate_batches(dataset, batch_size, keys, desc="JTT error set", progress=progress):
            logits = _logits(model(batch["pixel_values"].to(device)))  # (b, n_cls)
            wrong = logits.argmax(dim=-1).cpu() != torch.as_tensor(batch["labels"]).long()  # (b,)
            errors.append(torch.nonzero(wrong).flatten() + start)
    finally:
        model.train(was_training)
    return torch.cat(errors).sort().values
