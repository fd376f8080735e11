"""Group weights of the reweighting methods, as pure tensor functions (the add-on only keeps their state).

* DPT (https://arxiv.org/abs/2503.08368): ``w_g ∝ (1/N_g)·exp[η(1 − p̄_{y|g})]``, :func:`dpt_group_weights`,
  with the EMA of :func:`ema_update`;
* balanced groups ("oracle" reweighting): ``w_g ∝ 1/N_g``, :func:`balanced_group_weights`;
* group DRO (Sagawa et al., "Distributionally Robust Neural Networks", https://arxiv.org/abs/1911.08731):
  exponentiated-gradient ascent on the group distribution, :func:`groupdro_update`.

Group weights are normalised to mean 1 over the *training samples*: ``Σ_g N_g w_g = Σ_g N_g``, so a loss
averaged with them keeps the scale of the plain mean.
"""

from __future__ import annotations

import torch

__all__ = [
    "balanced_group_weights",
    "dpt_group_weights",
    "ema_update",
    "group_means",
    "groupdro_update",
    "normalize_per_sample",
]


def normalize_per_sample(raw: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Scale group weights so that their mean over the samples is 1: ``Σ_g N_g w_g / Σ_g N_g = 1``.

    Args:
        raw: ``(G,)`` unnormalised group weights.
        counts: ``(G,)`` training samples per group.

    Example:
        >>> [round(w, 4) for w in normalize_per_sample(torch.tensor([1.0, 3.0]), torch.tensor([3, 1])).tolist()]
        [0.6667, 2.0]
    """
    counts = counts.to(raw.dtype)
    total = counts.sum()
    if total <= 0:
        raise ValueError("group counts sum to 0: the training set assigned no sample to any group.")
    return raw * total / (raw * counts).sum()


def balanced_group_weights(counts: torch.Tensor) -> torch.Tensor:
    """``w_g ∝ 1/N_g`` (every non-empty group gets the same total weight), normalised to mean 1 over samples.

    Empty groups (``N_g = 0``) get the weight of a one-sample group; they carry no training sample, so they do
    not change the normalisation.

    Args:
        counts: ``(G,)`` training samples per group.

    Returns:
        ``(G,)`` float64 weights.

    Example:
        >>> balanced_group_weights(torch.tensor([6, 2])).tolist()
        [0.6666666666666666, 2.0]
    """
    counts = counts.to(torch.float64)
    return normalize_per_sample(1.0 / counts.clamp_min(1.0), counts)


def dpt_group_weights(counts: torch.Tensor, mean_true_prob: torch.Tensor, eta: float) -> torch.Tensor:
    """DPT's group weights ``w_g ∝ (1/N_g)·exp[η(1 − p̄_{y|g})]``, normalised to mean 1 over samples.

    Rare groups (small ``N_g``) and hard groups (low mean probability of the true class ``p̄``) weigh more;
    ``η = 0`` gives balanced groups.

    Paper: https://arxiv.org/abs/2503.08368

    Args:
        counts: ``(G,)`` training samples per group (groups g = (class, pseudo-attribute)).
        mean_true_prob: ``(G,)`` the groups' (EMA-smoothed) mean predicted probability of the true class.
        eta: sharpness of the difficulty term, ``>= 0``.

    Returns:
        ``(G,)`` float64 weights.

    Example:
        >>> w = dpt_group_weights(torch.tensor([3, 1]), torch.tensor([1.0, 0.0]), eta=1.0)
        >>> [round(v, 4) for v in w.tolist()]
        [0.3586, 2.9242]
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta!r}.")
    counts = counts.to(torch.float64)
    difficulty = torch.exp(eta * (1.0 - mean_true_prob.to(torch.float64)))  # (G,)
    return normalize_per_sample(difficulty / counts.clamp_min(1.0), counts)


def group_means(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` within each group of a batch.

    Args:
        values: ``(b,)`` per-sample values (e.g. the true-class probability, or the loss).
        groups: ``(b,)`` group ids in ``0..n_groups - 1``.
        n_groups: ``G``.

    Returns:
        ``(means (G,), present (G,) bool)``; the mean of an absent group is 0.

    Example:
        >>> means, present = group_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
        >>> means.tolist(), present.tolist()
        ([2.0, 0.0, 5.0], [True, False, True])
    """
    values = values.detach().to(torch.float64)
    sums = torch.zeros(n_groups, dtype=torch.float64, device=values.device).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=n_groups).to(values.device)  # (G,)
    present = counts > 0
    return sums / counts.clamp_min(1), present


def ema_update(running: torch.Tensor, observed: torch.Tensor, present: torch.Tensor, ema: float) -> torch.Tensor:
    """``running_g ← ema·running_g + (1 − ema)·observed_g`` for the groups present in the batch; others unchanged.

    Args:
        running: ``(G,)`` current estimates.
        observed: ``(G,)`` this batch's group means (ignored where ``present`` is False).
        present: ``(G,)`` bool, groups seen in the batch.
        ema: smoothing factor in ``[0, 1)`` (0: the last batch only).

    Example:
        >>> ema_update(torch.tensor([0.5, 0.8]), torch.tensor([0.9, 0.0]), torch.tensor([True, False]), 0.9)
        tensor([0.5400, 0.8000])
    """
    if not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1); got {ema!r}.")
    observed = observed.to(running.dtype)
    return torch.where(present, ema * running + (1.0 - ema) * observed, running)


def groupdro_update(q: torch.Tensor, group_losses: torch.Tensor, present: torch.Tensor, step: float) -> torch.Tensor:
    """One exponentiated-gradient step of group DRO: ``q_g ← q_g·exp(step·L_g)`` for the groups in the batch,
    then renormalised to sum 1 (absent groups keep their mass before renormalisation).

    Paper: Sagawa et al., https://arxiv.org/abs/1911.08731 (Algorithm 1)

    Args:
        q: ``(G,)`` group distribution (sums to 1).
        group_losses: ``(G,)`` this batch's mean loss per group.
        present: ``(G,)`` bool, groups seen in the batch.
        step: the step size ``η_q > 0``.

    Example:
        >>> q = groupdro_update(torch.full((2,), 0.5), torch.tensor([0.0, 1.0]), torch.tensor([True, True]), 1.0)
        >>> [round(v, 4) for v in q.tolist()]
        [0.2689, 0.7311]
    """
    if step <= 0:
        raise ValueError(f"the group DRO step size must be > 0; got {step!r}.")
    losses = torch.where(present, group_losses.to(q.dtype), torch.zeros_like(q))
    # in log space, so a large step times a large loss cannot overflow
    logits = torch.log(q.clamp_min(1e-300)) + step * losses
    return torch.softmax(logits, dim=0)
