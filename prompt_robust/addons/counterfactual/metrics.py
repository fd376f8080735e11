"""How good are counterfactual features: validity (a held-out probe sees the target class) and proximity (how
small the change is relative to the nearest real feature of the target class)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...eval.probe import LinearProbe

__all__ = ["CounterfactualQuality", "counterfactual_quality", "fit_linear_probe"]


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> nn.Linear:
    """A multinomial logistic-regression probe fitted by full-batch L-BFGS (deterministic): the library's
    :class:`prompt_robust.eval.LinearProbe` in float32 on the features' device, on unnormalised features, with
    L-BFGS's default stopping rules and ``nn.Linear``'s kernel, returned as that module.

    Fit it on features the feature flow was *not* trained on (a held-out split), so validity measures whether
    the counterfactuals carry the target class's features, not whether they copy the flow's training points.

    Args:
        features: ``(n, d)``.
        labels: ``(n,)`` class indices.
        num_classes: number of classes (default: ``labels.max() + 1``).
        weight_decay: L2 penalty ``weight_decay · ||W||²`` on the weights.
        max_iter: L-BFGS iterations.

    Returns:
        A frozen ``nn.Linear(d, num_classes)``; ``probe(features)`` gives logits.

    Example:
        >>> x = torch.cat([torch.randn(20, 2) - 3, torch.randn(20, 2) + 3]); y = torch.arange(40) // 20
        >>> (fit_linear_probe(x, y)(x).argmax(1) == y).float().mean().item()
        1.0
    """
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(
            f"fit_linear_probe needs features (n, d) and labels (n,); got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    fitted = LinearProbe(
        2 * weight_decay,  # LinearProbe's penalty is reg/2 · ||W||²
        max_iter=max_iter,
        normalize=False,
        dtype=torch.float32,
        device=None,
        tolerance_grad=1e-7,  # torch.optim.LBFGS's defaults
        tolerance_change=1e-9,
        history_size=100,
        fused=True,  # the returned nn.Linear's own kernel
    ).fit(features, labels, num_classes)
    probe = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        probe.weight.copy_(fitted.weight)
        probe.bias.copy_(fitted.bias)
    return probe.requires_grad_(False).eval()


@dataclass
class CounterfactualQuality:
    """What :func:`counterfactual_quality` returns.

    Attributes:
        validity: fraction of counterfactuals the probe assigns to their target class.
        proximity: median of ``‖z' - z‖ / ‖z - nearest real feature of the target class‖`` (< 1: the
            counterfactual is closer to the factual feature than any real target-class feature is).
        factual_validity: fraction of the *factual* features the probe assigns to the target class (the baseline
            validity of "no change"; near 0 for a good probe).
        num_samples: number of (factual, counterfactual) pairs.
    """

    validity: float
    proximity: float
    factual_validity: float
    num_samples: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def counterfactual_quality(
    factual: torch.Tensor,
    counterfactual: torch.Tensor,
    targets: torch.Tensor,
    *,
    probe: Callable[[torch.Tensor], torch.Tensor],
    reference_features: torch.Tensor,
    reference_labels: torch.Tensor,
) -> CounterfactualQuality:
    """Validity and median proximity of counterfactual features (DiCap, https://arxiv.org/abs/2507.19882).

    Args:
        factual: ``(n, d)`` factual features ``z``.
        counterfactual: ``(n, d)`` or ``(n, K, d)`` counterfactuals ``z'``.
        targets: ``(n,)`` or ``(n, K)`` their target classes ``y'``.
        probe: maps ``(m, d)`` features to ``(m, n_classes)`` logits, trained on held-out features (see
            :func:`fit_linear_probe`).
        reference_features: ``(r, d)`` real features the nearest target-class neighbour is searched in (e.g. the
            training features).
        reference_labels: ``(r,)`` their classes; every target class needs at least one.

    Returns:
        :class:`CounterfactualQuality`.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]]); real = torch.tensor([[4.0, 0.0], [0.0, 1.0]])
        >>> probe = lambda x: torch.stack([-x[:, 0], x[:, 0] - 1], dim=1)  # class 1 when x > 0.5
        >>> q = counterfactual_quality(z, torch.tensor([[2.0, 0.0]]), torch.tensor([1]), probe=probe,
        ...                            reference_features=real, reference_labels=torch.tensor([1, 0]))
        >>> q.validity, q.proximity
        (1.0, 0.5)
    """
    if counterfactual.dim() == 2:
        counterfactual = counterfactual.unsqueeze(1)  # (n, 1, d)
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)  # (n, 1)
    n, k, d = counterfactual.shape
    if tuple(factual.shape) != (n, d) or tuple(targets.shape) != (n, k):
        raise ValueError(
            f"shapes do not match: factual {tuple(factual.shape)} should be ({n}, {d}) and targets "
            f"{tuple(targets.shape)} should be ({n}, {k}) for counterfactuals {(n, k, d)}."
        )
    if n == 0:
        raise ValueError("counterfactual_quality needs at least one counterfactual; got none.")
    flat_z = factual.unsqueeze(1).expand(n, k, d).reshape(-1, d).float()  # (n K, d)
    flat_cf = counterfactual.reshape(-1, d).float()  # (n K, d)
    flat_t = targets.reshape(-1).long().to(flat_cf.device)  # (n K,)
    validity = (probe(flat_cf).argmax(-1) == flat_t).float().mean()
    factual_validity = (probe(flat_z).argmax(-1) == flat_t).float().mean()
    reference = reference_features.float().to(flat_cf.device)
    ref_labels = reference_labels.long().to(flat_cf.device)
    missing = sorted(set(flat_t.tolist()) - set(ref_labels.tolist()))
    if missing:
        raise ValueError(
            f"target classes {missing} have no reference feature; pass reference features that cover every target "
            "class (e.g. the training features)."
        )
    distances = torch.cdist(flat_z, reference)  # (n K, r)
    other = ref_labels.unsqueeze(0) != flat_t.unsqueeze(1)  # (n K, r): not of the target class
    nearest = distances.masked_fill(other, float("inf")).min(dim=1).values  # (n K,)
    ratio = (flat_cf - flat_z).norm(dim=1) / nearest.clamp_min(1e-12)
    return CounterfactualQuality(
        validity=float(validity),
        proximity=float(ratio.median()),
        factual_validity=float(factual_validity),
        num_samples=int(flat_t.numel()),
    )
