"""The closed-form invariant projection of CLIP-ICM and the choice of its ``λ`` and ``k``.

"Learning Invariant Causal Mechanism from Vision-Language Models" (https://arxiv.org/abs/2405.15289): with
features ``Z`` ``(n, d)`` of training images and intervention differences ``Δ`` ``(m, d)``
(``f(x) - f(do(x))``), the invariant directions are those with much feature variance that interventions do not
move. They are the top eigenvectors of

    M = ZᵀZ / n - λ · ΔᵀΔ / m

and the projection ``P`` ``(d, k)`` keeps the ``k`` eigenvectors of the **largest** eigenvalues.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "ICMProjection",
    "Selection",
    "class_subspace_share",
    "dims_from_fractions",
    "intervention_covariance",
    "lam_scale",
    "second_moment",
    "select_lam_dim",
]

logger = logging.getLogger(__name__)


def _check_matrix(x: torch.Tensor, what: str, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a non-empty (rows, d) tensor; got {shape}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} has feature size {x.shape[1]}; the features have {dim}. Use the same encoder.")
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{what} holds NaN or inf values.")


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX / n`` in float64 on the CPU, ``(d, d)``.

    Args:
        x: ``(n, d)`` rows (features or differences).

    Example:
        >>> second_moment(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]], dtype=torch.float64)
    """
    _check_matrix(x, "x")
    x = x.detach().to("cpu", torch.float64)
    return x.t() @ x / x.shape[0]


def intervention_covariance(
    deltas: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``Σ_Δ = Σ_i w_i Δ_iᵀΔ_i / m_i``: the (weighted) second moment of one or several sets of differences.

    Several sets (e.g. image pairs and text pairs) are weighted by ``weights`` (normalised to sum 1; default:
    equal), so a large set does not drown a small one.

    Args:
        deltas: ``(m, d)`` differences, or a sequence of ``(m_i, d)``.
        weights: one non-negative weight per set.

    Returns:
        ``(d, d)`` float64.

    Example:
        >>> intervention_covariance([torch.ones(4, 2), torch.zeros(1, 2)], weights=[0.5, 0.5])
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]], dtype=torch.float64)
    """
    sets = [deltas] if isinstance(deltas, torch.Tensor) else list(deltas)
    if not sets:
        raise ValueError("intervention_covariance needs at least one (m, d) tensor of differences.")
    if weights is None:
        weights = [1.0] * len(sets)
    weights = [float(w) for w in weights]
    if len(weights) != len(sets) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights must hold one non-negative value per set of differences ({len(sets)}) with a positive sum; "
            f"got {weights!r}."
        )
    total = sum(weights)
    dim = sets[0].shape[-1] if isinstance(sets[0], torch.Tensor) and sets[0].dim() == 2 else None
    out = None
    for i, (delta, weight) in enumerate(zip(sets, weights, strict=True)):
        _check_matrix(delta, f"deltas[{i}]", dim)
        term = (weight / total) * second_moment(delta)
        out = term if out is None else out + term
    return out


def lam_scale(feature_cov: torch.Tensor, delta_cov: torch.Tensor) -> float:
    """``tr(ZᵀZ/n) / tr(Σ_Δ)``: the ``λ`` at which both terms of ``M`` carry the same total variance.

    A relative ``λ`` (``InvarianceConfig.lam``) is multiplied by this to get the absolute one, which makes it
    independent of the feature scale and of how strong the interventions are. Returns 1.0 (with a warning) when
    the interventions change nothing (``tr(Σ_Δ) = 0``: ``λ`` then has no effect).

    Example:
        >>> lam_scale(torch.eye(2), 0.25 * torch.eye(2))
        4.0
    """
    num, den = float(torch.trace(feature_cov)), float(torch.trace(delta_cov))
    if not math.isfinite(num) or not math.isfinite(den):
        raise FloatingPointError(f"non-finite traces: tr(ZᵀZ/n)={num}, tr(ΔᵀΔ/m)={den}.")
    if den <= 1e-12 * max(num, 1e-30):
        logger.warning("the interventions do not change the features (tr(ΔᵀΔ/m) = %g): λ has no effect", den)
        return 1.0
    return num / den


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(d,)`` in DESCENDING order and the matching eigenvectors as columns ``(d, d)``."""
    matrix = 0.5 * (matrix + matrix.t())  # exact symmetry for eigh
    values, vectors = torch.linalg.eigh(matrix)
    # torch.linalg.eigh returns ASCENDING eigenvalues. The invariant subspace is spanned by the eigenvectors of
    # the LARGEST eigenvalues of M = ZᵀZ/n - λΔᵀΔ/m (much feature variance, little intervention variance), i.e.
    # the LAST columns. The public CLIP-ICM reference code keeps the first columns (the smallest eigenvalues):
    # that is the intervention-SENSITIVE subspace, the opposite of what the method asks for. Flip explicitly.
    values, vectors = values.flip(0), vectors.flip(1)
    # eigenvectors are defined up to sign: make each column's largest-magnitude entry positive (reproducible)
    pivot = vectors.abs().argmax(dim=0)  # (d,)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return values, vectors * signs


@dataclass
class ICMProjection:
    """An orthonormal eigenbasis of ``M = ZᵀZ/n - λ·Σ_Δ`` and how many of its leading columns are kept.

    Paper: https://arxiv.org/abs/2405.15289 (CLIP-ICM).

    Attributes:
        basis: ``(d, d)`` eigenvectors as columns, sorted by DESCENDING eigenvalue.
        eigenvalues: ``(d,)`` descending.
        dim: ``k``, the number of leading columns kept.
        lam: the absolute ``λ`` used.
        lam_relative: ``λ`` in units of :func:`lam_scale` (None when ``λ`` was given absolutely).

    Example:
        >>> z = torch.randn(100, 8)
        >>> delta = torch.randn(50, 8) * torch.tensor([5.0] + [0.1] * 7)
        >>> icm = ICMProjection.fit(z, delta, lam=1.0, dim=4)
        >>> icm.projection.shape, icm.project(z).shape
        (torch.Size([8, 4]), torch.Size([100, 4]))
        >>> bool(icm.projection[0].abs().max() < 0.2)  # the direction interventions move is dropped
        True
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    dim: int
    lam: float
    lam_relative: float | None = None

    def __post_init__(self) -> None:
        d = self.basis.shape[0]
        if self.basis.dim() != 2 or self.basis.shape[1] != d or self.eigenvalues.shape != (d,):
            raise ValueError(
                f"basis must be (d, d) and eigenvalues (d,); got {tuple(self.basis.shape)} and "
                f"{tuple(self.eigenvalues.shape)}."
            )
        if not isinstance(self.dim, int) or not 1 <= self.dim <= d:
            raise ValueError(f"dim must be an integer in 1..{d} (the feature size); got {self.dim!r}.")

    @classmethod
    def from_moments(
        cls,
        feature_cov: torch.Tensor,
        delta_cov: torch.Tensor,
        *,
        lam: float,
        dim: int | None = None,
        relative: bool = True,
    ) -> ICMProjection:
        """Fit from precomputed ``ZᵀZ/n`` and ``Σ_Δ`` (both ``(d, d)``); see :meth:`fit`."""
        if lam < 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be a finite number >= 0; got {lam!r}.")
        scale = lam_scale(feature_cov, delta_cov) if relative else 1.0
        absolute = float(lam) * scale
        matrix = feature_cov.to(torch.float64) - absolute * delta_cov.to(torch.float64)  # (d, d)
        values, vectors = _descending_eigh(matrix)
        d = matrix.shape[0]
        return cls(
            basis=vectors.to(torch.float32),
            eigenvalues=values,
            dim=d if dim is None else int(dim),
            lam=absolute,
            lam_relative=float(lam) if relative else None,
        )

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        deltas: torch.Tensor | Sequence[torch.Tensor],
        *,
        lam: float = 1.0,
        dim: int | None = None,
        relative: bool = True,
        weights: Sequence[float] | None = None,
    ) -> ICMProjection:
        """Eigendecomposition of ``M = ZᵀZ/n - λ·Σ_Δ``, keeping the ``dim`` leading (largest) eigenvectors.

        Args:
            features: ``Z`` ``(n, d)``, features of the (clean) training images.
            deltas: ``Δ`` ``(m, d)`` = ``f(x) - f(do(x))``, or several sets (image pairs, text pairs).
            lam: weight of the intervention term; relative (in units of :func:`lam_scale`) unless
                ``relative=False``.
            dim: kept dimension ``k``; None: all ``d`` (a rotation: zero-shot predictions are unchanged).
            relative: read ``lam`` as relative.
            weights: weights of several sets of differences (:func:`intervention_covariance`).

        Returns:
            The projection.
        """
        _check_matrix(features, "features")
        sets = [deltas] if isinstance(deltas, torch.Tensor) else list(deltas)
        for i, delta in enumerate(sets):
            _check_matrix(delta, f"deltas[{i}]", features.shape[1])
        return cls.from_moments(
            second_moment(features), intervention_covariance(sets, weights), lam=lam, dim=dim, relative=relative
        )

    @property
    def projection(self) -> torch.Tensor:
        """``P`` ``(d, k)`` with orthonormal columns."""
        return self.basis[:, : self.dim]

    def with_dim(self, dim: int) -> ICMProjection:
        """The same eigenbasis keeping ``dim`` columns."""
        return ICMProjection(self.basis, self.eigenvalues, int(dim), self.lam, self.lam_relative)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x P``: ``(..., d) -> (..., k)`` (in ``x``'s dtype and device; not normalised)."""
        if x.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"x has feature size {x.shape[-1]}; the projection was fit on {self.basis.shape[0]}.")
        return x @ self.projection.to(x.device, x.dtype)


def class_subspace_share(clean: torch.Tensor, intervened: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the intervention differences' energy inside the span of the class means (centred).

    ICM keeps the directions interventions do not move. When the differences ``intervened − clean`` lie in the
    directions that separate the classes, discarding them discards the classes too, and no projection can help.
    A value near ``(n_classes − 1) / d`` is what differences in random directions give; near 1, the nuisance
    moves the features only along class directions.

    Args:
        clean: ``(n, d)`` features.
        intervened: ``(n, d)`` features of the same images after one intervention each.
        labels: ``(n,)`` classes of the images.

    Example:
        >>> clean = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
        >>> class_subspace_share(clean, clean + torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0, 1]))
        0.0
        >>> round(class_subspace_share(clean, clean * 0.5, torch.tensor([0, 1])), 6)
        1.0
    """
    _check_matrix(clean, "clean")
    _check_matrix(intervened, "intervened", clean.shape[1])
    if intervened.shape[0] != clean.shape[0] or labels.shape != (clean.shape[0],):
        raise ValueError(
            f"clean {tuple(clean.shape)}, intervened {tuple(intervened.shape)} and labels {tuple(labels.shape)} "
            "must describe the same n images."
        )
    z = clean.double()
    classes = labels.unique()
    means = torch.stack([z[labels == c].mean(0) for c in classes])
    means = means - means.mean(0)
    u, singular, _ = torch.linalg.svd(means.t(), full_matrices=False)
    basis = u[:, singular > singular.max() * 1e-8]  # (d, r), r <= n_classes - 1
    diff = intervened.double() - z
    total = float(diff.pow(2).sum())
    return float((diff @ basis).pow(2).sum()) / total if total > 0 else 0.0


def dims_from_fractions(d: int, fractions: Sequence[float]) -> list[int]:
    """Distinct kept dimensions ``max(1, round(f·d))``, ascending.

    Example:
        >>> dims_from_fractions(32, [0.125, 0.25, 0.5, 1.0])
        [4, 8, 16, 32]
    """
    return sorted({min(d, max(1, round(f * d))) for f in fractions})


@dataclass
class Selection:
    """The ``(λ, k)`` chosen by :func:`select_lam_dim`.

    Attributes:
        lam: relative ``λ`` (in units of :func:`lam_scale` of the fit split).
        dim: ``k``.
        score: its validation score.
        scores: ``{(lam, dim): score}`` over the whole grid.
    """

    lam: float
    dim: int
    score: float
    scores: dict[tuple[float, int], float] = field(default_factory=dict)


def select_lam_dim(
    features: torch.Tensor,
    deltas: torch.Tensor | Sequence[torch.Tensor],
    score: Callable[[torch.Tensor], float],
    *,
    lam_grid: Sequence[float],
    dim_grid: Sequence[int],
    weights: Sequence[float] | None = None,
) -> Selection:
    """Grid search of ``(λ, k)``: fit on ``features``/``deltas``, score each projection, keep the best.

    The rule of ``docs/invariance.md``: ``score`` measures a predictor on held-out *intervened* training images
    (robustness to the interventions on data the fit has not seen); the best score wins, ties go to the larger
    ``k`` (the smaller change to CLIP's features), then to the smaller ``λ``. Deterministic: float64 ``eigh``
    and a fixed grid order.

    Args:
        features: ``Z`` of the fit split ``(n, d)``.
        deltas: ``Δ`` of the fit split (one or several sets).
        score: ``projection (d, k) -> float`` (higher is better), e.g. validation accuracy.
        lam_grid: relative ``λ`` values (units of :func:`lam_scale`).
        dim_grid: candidate ``k`` values in ``1..d``.
        weights: weights of several sets of differences.

    Example:
        >>> z, delta = torch.randn(40, 6), torch.randn(20, 6)
        >>> sel = select_lam_dim(z, delta, lambda p: -abs(p.shape[1] - 3), lam_grid=[0, 1], dim_grid=[2, 3, 6])
        >>> sel.dim, sel.lam
        (3, 0.0)
    """
    _check_matrix(features, "features")
    d = features.shape[1]
    lams = [float(v) for v in lam_grid]
    dims = sorted({int(k) for k in dim_grid})
    if not lams or any(v < 0 or not math.isfinite(v) for v in lams):
        raise ValueError(f"lam_grid must hold finite values >= 0; got {list(lam_grid)!r}.")
    if not dims or dims[0] < 1 or dims[-1] > d:
        raise ValueError(f"dim_grid must hold dimensions in 1..{d}; got {list(dim_grid)!r}.")
    feature_cov = second_moment(features)
    delta_cov = intervention_covariance(deltas, weights)
    scores: dict[tuple[float, int], float] = {}
    best: tuple[float, int, float] | None = None  # (score, dim, -lam): max wins
    for lam in lams:
        icm = ICMProjection.from_moments(feature_cov, delta_cov, lam=lam, dim=d)
        for k in dims:
            value = float(score(icm.basis[:, :k]))
            scores[(lam, k)] = value
            key = (value, k, -lam)
            if best is None or key > best:
                best = key
    if best is None:  # unreachable: both grids were checked non-empty
        raise RuntimeError("empty (lam, dim) grid.")
    chosen = Selection(lam=-best[2], dim=best[1], score=best[0], scores=scores)
    logger.info("CLIP-ICM selection: lam=%g dim=%d (validation score %.4f)", chosen.lam, chosen.dim, chosen.score)
    return chosen
