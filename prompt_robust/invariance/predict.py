"""Predictors in CLIP's feature space, with or without the CLIP-ICM projection: zero-shot and a linear probe.

CLIP-ICM (https://arxiv.org/abs/2405.15289) predicts in the projected space ``Pᵀz``: zero-shot against the
projected class text features, or with a linear probe trained on projected features. The four variants a
benchmark compares are :func:`compare_predictors`: ``zero_shot``, ``icm_zero_shot``, ``linear_probe`` and
``icm_linear_probe``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..learners.base import cosine_logits
from .icm import ICMProjection

__all__ = ["LinearProbe", "accuracy", "compare_predictors", "zero_shot_logits"]


def zero_shot_logits(
    image: torch.Tensor,
    text: torch.Tensor,
    projection: torch.Tensor | None = None,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``scale · normalize(Pᵀz) · normalize(Pᵀt)``: zero-shot logits, in the projected space if ``projection``.

    Args:
        image: ``(b, d)`` image features.
        text: ``(n_cls, d)`` class text features, or ``(b, n_cls, d)`` per sample.
        projection: ``P`` ``(d, k)``; None: CLIP's own space.
        scale: logit scale (e.g. ``backbone.logit_scale``).

    Returns:
        ``(b, n_cls)``.

    Example:
        >>> image, text = torch.randn(4, 8), torch.randn(3, 8)
        >>> zero_shot_logits(image, text, torch.eye(8)[:, :2], scale=100.0).shape
        torch.Size([4, 3])
    """
    if image.dim() != 2 or text.dim() not in (2, 3) or text.shape[-1] != image.shape[-1]:
        raise ValueError(
            f"image must be (b, d) and text (n_cls, d) or (b, n_cls, d) with the same d; got {tuple(image.shape)} "
            f"and {tuple(text.shape)}."
        )
    if projection is not None:
        if projection.dim() != 2 or projection.shape[0] != image.shape[-1]:
            raise ValueError(f"projection must be (d={image.shape[-1]}, k); got {tuple(projection.shape)}.")
        projection = projection.to(image.device, image.dtype)
        image = image @ projection  # (b, k)
        text = text @ projection.to(text.dtype)  # (n_cls, k) or (b, n_cls, k)
    return cosine_logits(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``(n, n_cls)`` logits.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        0.5
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} labels.")
    return float((logits.argmax(dim=-1) == labels.to(logits.device)).float().mean())


class LinearProbe:
    """Multinomial logistic regression with an L2 penalty, fit deterministically by full-batch L-BFGS.

    Minimises ``mean CE(xWᵀ + b, y) + reg/2 · ||W||²`` from zero in float64 on the CPU (a strictly convex
    problem for ``reg > 0``: one optimum, the same on every run). Rows are L2-normalised first when
    ``normalize`` (CLIP features are compared by angle).

    Args:
        reg: L2 strength on the weights (not the bias), >= 0.
        max_iter: L-BFGS iterations.
        normalize: L2-normalise the input rows.

    Example:
        >>> x = torch.randn(40, 5); y = (x[:, 0] > 0).long()
        >>> probe = LinearProbe(reg=1e-3).fit(x, y)
        >>> probe.predict(x).shape, probe.score(x, y) > 0.9
        (torch.Size([40]), True)
    """

    def __init__(self, reg: float = 1e-3, *, max_iter: int = 200, normalize: bool = True) -> None:
        if not reg >= 0:
            raise ValueError(f"reg must be >= 0; got {reg!r}.")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1; got {max_iter!r}.")
        self.reg = float(reg)
        self.max_iter = int(max_iter)
        self.normalize = normalize
        self.weight: torch.Tensor | None = None  # (n_cls, d)
        self.bias: torch.Tensor | None = None  # (n_cls,)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"features must be (n, d); got {tuple(x.shape)}.")
        x = x.detach().to("cpu", torch.float64)
        return F.normalize(x, dim=-1) if self.normalize else x

    def fit(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> LinearProbe:
        """Fit on ``features`` ``(n, d)`` and ``labels`` ``(n,)``; returns ``self``.

        Args:
            features: training features.
            labels: class indices in ``0..num_classes-1``.
            num_classes: number of classes (default: ``labels.max() + 1``).
        """
        x = self._inputs(features)
        y = labels.detach().to("cpu", torch.long)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},); got {tuple(y.shape)}.")
        n_cls = int(num_classes) if num_classes is not None else int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= n_cls:
            raise ValueError(f"labels must be in 0..{n_cls - 1}; got the range {int(y.min())}..{int(y.max())}.")
        weight = torch.zeros(n_cls, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_cls, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.t() + bias, y) + 0.5 * self.reg * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(n, n_cls)`` logits (float32, on ``features``' device)."""
        if self.weight is None or self.bias is None:
            raise RuntimeError("the probe is not fitted; call fit(features, labels) first.")
        if features.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"features have size {features.shape[-1]}; the probe was fit on {self.weight.shape[1]}.")
        out = self._inputs(features) @ self.weight.t() + self.bias
        return out.to(features.device, torch.float32)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(n,)`` predicted classes."""
        return self.logits(features).argmax(dim=-1)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on ``features``/``labels``."""
        return accuracy(self.logits(features), labels)


def compare_predictors(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    icm: ICMProjection,
    text_features: torch.Tensor,
    tests: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    probe_reg: float = 1e-3,
    methods: Sequence[str] = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe"),
) -> dict[str, dict[str, float]]:
    """Accuracy of zero-shot and linear-probe prediction, each without and with the ICM projection.

    Args:
        train_features: ``(n, d)`` features of the (clean) training images (for the probes).
        train_labels: ``(n,)``.
        icm: a fitted :class:`ICMProjection`.
        text_features: ``(n_cls, d)`` class text features (for zero-shot).
        tests: ``{name: (features (n_t, d), labels (n_t,))}``, e.g. one entry per test domain.
        probe_reg: L2 strength of both probes.
        methods: which of the four variants to run.

    Returns:
        ``{method: {test name: accuracy}}``.

    Example:
        >>> z, y = torch.randn(30, 6), torch.arange(30) % 3
        >>> icm = ICMProjection.fit(z, torch.randn(10, 6), lam=1.0, dim=3)
        >>> out = compare_predictors(z, y, icm, torch.randn(3, 6), {"test": (z, y)})
        >>> sorted(out)
        ['icm_linear_probe', 'icm_zero_shot', 'linear_probe', 'zero_shot']
    """
    known = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(known)}.")
    n_cls = text_features.shape[0]
    projection = icm.projection
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        use_icm = method.startswith("icm_")
        proj = projection if use_icm else None
        if method.endswith("zero_shot"):
            out[method] = {
                name: accuracy(zero_shot_logits(z, text_features, proj), y) for name, (z, y) in tests.items()
            }
        else:
            prep = icm.project if use_icm else (lambda x: x)
            probe = LinearProbe(probe_reg).fit(prep(train_features), train_labels, num_classes=n_cls)
            out[method] = {name: probe.score(prep(z), y) for name, (z, y) in tests.items()}
    return out
