"""A linear probe: multinomial logistic regression fit by full-batch L-BFGS, the library's one probe (CLIP-ICM's
linear-probe predictors, the counterfactual validity probe, the benchmark's calibration probe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import accuracy

__all__ = ["LinearProbe"]


class LinearProbe:
    """Multinomial logistic regression with an L2 penalty, fit deterministically by full-batch L-BFGS.

    Minimises ``mean CE(xWᵀ + b, y) + reg/2 · ||W||²`` from zero, with the strong-Wolfe line search (a strictly
    convex problem for ``reg > 0``: one optimum, the same on every run). By default in float64 on the CPU; rows
    are L2-normalised first when ``normalize`` (CLIP features are compared by angle).

    Args:
        reg: L2 strength on the weights (not the bias), >= 0.
        max_iter: L-BFGS iterations.
        normalize: L2-normalise the input rows.
        dtype: dtype of the fit (and of the fitted weights).
        device: device of the fit; None keeps the features' device.
        tolerance_grad / tolerance_change / history_size: :class:`torch.optim.LBFGS`'s stopping rules and memory.
        fused: compute the logits with one fused ``addmm`` (``nn.Linear``'s kernel) instead of ``x @ Wᵀ + b``.
            The two round differently for wide features (d >= 256 in float32, any d in float64), and L-BFGS carries
            a last-bit difference on, so a caller keeps one form to keep its numbers.

    Example:
        >>> x = torch.randn(40, 5); y = (x[:, 0] > 0).long()
        >>> probe = LinearProbe(reg=1e-3).fit(x, y)
        >>> probe.predict(x).shape, probe.score(x, y) > 0.9
        (torch.Size([40]), True)
    """

    def __init__(
        self,
        reg: float = 1e-3,
        *,
        max_iter: int = 200,
        normalize: bool = True,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = "cpu",
        tolerance_grad: float = 1e-9,
        tolerance_change: float = 1e-12,
        history_size: int = 20,
        fused: bool = False,
    ) -> None:
        if not reg >= 0:
            raise ValueError(f"reg must be >= 0; got {reg!r}.")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1; got {max_iter!r}.")
        self.reg = float(reg)
        self.max_iter = int(max_iter)
        self.normalize = normalize
        self.dtype = dtype
        self.device = device
        self.lbfgs = {
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
        }
        self.fused = fused
        self.weight: torch.Tensor | None = None  # (n_cls, d)
        self.bias: torch.Tensor | None = None  # (n_cls,)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias) if self.fused else x @ weight.t() + bias  # (n, n_cls)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"features must be (n, d); got {tuple(x.shape)}.")
        x = x.detach()
        x = x.to(x.device if self.device is None else self.device, self.dtype)
        return F.normalize(x, dim=-1) if self.normalize else x

    def fit(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> LinearProbe:
        """Fit on ``features`` ``(n, d)`` and ``labels`` ``(n,)``; returns ``self``.

        Args:
            features: training features.
            labels: class indices in ``0..num_classes-1``.
            num_classes: number of classes (default: ``labels.max() + 1``).
        """
        x = self._inputs(features)
        y = labels.detach().to(x.device, torch.long)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be ({x.shape[0]},); got {tuple(y.shape)}.")
        n_cls = int(num_classes) if num_classes is not None else int(y.max()) + 1
        if int(y.min()) < 0 or int(y.max()) >= n_cls:
            raise ValueError(f"labels must be in 0..{n_cls - 1}; got the range {int(y.min())}..{int(y.max())}.")
        weight = torch.zeros(n_cls, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        bias = torch.zeros(n_cls, dtype=x.dtype, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe", **self.lbfgs
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(self._linear(x, weight, bias), y) + 0.5 * self.reg * weight.pow(2).sum()
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
        out = self._linear(self._inputs(features).to(self.weight.device), self.weight, self.bias)
        return out.to(features.device, torch.float32)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(n,)`` predicted classes."""
        return self.logits(features).argmax(dim=-1)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy on ``features``/``labels`` (see :func:`prompt_robust.eval.accuracy`)."""
        return accuracy(self.logits(features), labels)
