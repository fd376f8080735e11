"""Minimal counterfactual features by inversion and guided re-integration of a feature flow (DiCap,
https://arxiv.org/abs/2507.19882).

For a factual feature ``z`` of class ``y`` and a target class ``y'``:

1. *inversion*: ``x_1 = encode(z)`` is integrated **backwards** along the class-``y`` conditional field from
   ``t = 1`` to ``t_0 = 1 - noise_level`` (deterministic, as DDIM inversion);
2. *guided generation*: from ``x_{t_0}`` forward to ``t = 1`` with

   ``v = (1 - λ) · [v_∅ + w (v_{y'} - v_∅) - w_neg (v_y - v_∅)] + λ · (x_1 - x_t) / (1 - t)``

   The bracket is classifier-free guidance towards ``y'`` and away from ``y``; on the straight path the score is
   affine in the velocity (``∇ log p_t(x) = -(x - t v) / (1 - t)``, coefficients summing to 1), so it is the
   velocity of ``∇log p_t(x) + w ∇log p_t(y'|x) - w_neg ∇log p_t(y|x)``: guidance by the gradients of the
   marginal and class-conditional scores. The last term is the *proximity* pull: the blend makes the
   predicted clean point ``x + (1 - t) v`` the ``λ``-mix of the guided prediction and the factual ``x_1``
   (minimal change), ``λ`` in ``[0, 1)``.
3. *minimal-change search* (with a ``validator``, the classifier that judges the flip): ``λ`` is chosen per
   sample by bisection in ``[proximity_weight, proximity_max]``, keeping the largest ``λ`` whose ``z'`` the
   validator assigns to ``y'`` with a margin (``validator(z')[y'] - max_{c != y'} validator(z')[c] >
   validity_margin``). The inversion is shared; every bisection step is one more guided integration. Where no
   tried ``λ`` is valid, the ``z'`` of the lower end is kept. Without a validator, ``λ = proximity_weight``.

Both integrations use :class:`prompt_robust.flows.ODESampler` on ``s ∈ [0, 1]`` with time reparametrised
onto the sub-interval (``t = 1 - s · noise_level`` backwards, ``t = t_0 + s · noise_level`` forwards).

*Memo* (``cache_mb > 0``): the inverted state of ``(z, y)`` and the candidate of ``(z, y, y', λ)`` do not depend on
the prompt and are deterministic, so they are kept in a bounded LRU memo keyed by the feature's bytes, the
classes and ``λ`` (the bisection's ``λ`` form a fixed dyadic set). Only the choices that depend on the prompt (the
targets, which ``λ`` the validator accepts) run on every call. On a fixed few-shot set of a frozen backbone the
second epoch on serves every candidate from the memo without a network call; features that change every step
(data augmentation) never hit. The memo is emptied when the flow's tensors change (fit, load, in-place updates,
a move to another device: their version counters and storage identify them) or the settings do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...config import unknown_name_error
from ...flows import ODESampler
from .config import CounterfactualConfig
from .feature_flow import FeatureFlow

__all__ = [
    "TARGET_MODES",
    "CounterfactualCacheInfo",
    "CounterfactualGenerator",
    "CounterfactualOutput",
    "choose_targets",
]

#: how a counterfactual's target class is chosen
TARGET_MODES: tuple[str, ...] = CounterfactualConfig.TARGETS


def choose_targets(
    labels: torch.Tensor,
    num_classes: int,
    num_targets: int = 1,
    *,
    mode: str = "confusable",
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Target classes ``y' != y`` for every sample: the highest-scoring other classes (``"confusable"``, from
    e.g. the current logits) or uniformly random other classes (``"random"``), distinct within a sample while
    ``num_targets < num_classes`` (beyond that they repeat cyclically).

    Args:
        labels: ``(b,)`` true classes.
        num_classes: number of classes (>= 2).
        num_targets: targets per sample (K).
        mode: ``"confusable"`` or ``"random"``.
        scores: ``(b, num_classes)`` class scores (required for ``"confusable"``).
        generator: CPU generator for ``"random"`` (None: global RNG).

    Returns:
        ``(b, K)`` long tensor of target classes.

    Example:
        >>> choose_targets(torch.tensor([0, 2]), 3, scores=torch.tensor([[5.0, 1.0, 2.0], [0.0, 1.0, 9.0]]))
        tensor([[2],
                [1]])
    """
    if mode not in TARGET_MODES:
        raise unknown_name_error("counterfactual target mode", mode, TARGET_MODES)
    if num_classes < 2:
        raise ValueError(f"counterfactual targets need at least 2 classes (a class to flip to); got {num_classes}.")
    batch = labels.shape[0]
    if mode == "confusable":
        if scores is None or tuple(scores.shape) != (batch, num_classes):
            got = None if scores is None else tuple(scores.shape)
            raise ValueError(
                f"target mode 'confusable' needs class scores of shape ({batch}, {num_classes}) (e.g. the logits); "
                f"got {got}. Pass scores=... or use mode='random'."
            )
        ranked = scores.detach().float().clone()
    else:
        ranked = torch.rand(batch, num_classes, generator=generator).to(labels.device)
    ranked[torch.arange(batch, device=labels.device), labels] = -float("inf")  # never the true class
    order = ranked.argsort(dim=1, descending=True, stable=True)[:, : num_classes - 1]  # (b, C - 1)
    columns = torch.arange(num_targets, device=labels.device) % (num_classes - 1)
    return order[:, columns]  # (b, K)


@dataclass
class CounterfactualOutput:
    """What :meth:`CounterfactualGenerator.generate` returns.

    Attributes:
        counterfactuals: ``(b, d)`` counterfactual features, in the feature space (not re-normalised).
        inverted: ``(b, d)`` the factual features' states at ``t_0`` (flow coordinates).
        evaluations: velocity-network calls (each on a batch of up to ``3 b``).
        proximity: ``(b,)`` the ``λ`` each counterfactual was generated with.
        valid: ``(b,)`` whether the validator accepted it (None without a validator).
    """

    counterfactuals: torch.Tensor
    inverted: torch.Tensor
    evaluations: int
    proximity: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass(frozen=True)
class CounterfactualCacheInfo:
    """The state of a generator's memo (:meth:`CounterfactualGenerator.cache_info`).

    Attributes:
        hits: lookups served from the memo (inverted states and candidates; each distinct key of a call once).
        misses: lookups computed by the flow (and stored).
        entries: rows held now.
        nbytes: bytes held now (the tensors' data plus an estimate of each entry's bookkeeping).
        max_bytes: the cap (``cache_mb`` MiB; 0: no memo).
        evictions: rows dropped, least recently used first, to stay under the cap.
        invalidations: times the memo was emptied because the flow's tensors or the settings changed.
    """

    hits: int
    misses: int
    entries: int
    nbytes: int
    max_bytes: int
    evictions: int
    invalidations: int


#: bytes counted per memo entry beyond its tensor's data: the key (a tuple holding a 16-byte digest), the dict slot
#: and the tensor object (measured: the process's resident memory grows by 4·d + 718 bytes per float32 row on CPU)
_ENTRY_OVERHEAD = 768


class _Memo:
    """A bounded LRU map from row keys to ``(d,)`` tensors, valid for one ``owner`` (the flow state + settings)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.owner: Hashable | None = None
        self.hits = self.misses = self.evictions = self.invalidations = 0

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def bind(self, owner: Hashable) -> None:
        """Empty the memo unless its entries were computed for ``owner``."""
        if owner != self.owner:
            if self.entries:
                self.invalidations += 1
            self.clear()
            self.owner = owner

    @staticmethod
    def size(value: torch.Tensor) -> int:
        return value.numel() * value.element_size() + _ENTRY_OVERHEAD

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = self.size(value)
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.nbytes -= self.size(self.entries.pop(key))
        self.entries[key] = value.clone()  # a row of a batch would keep the whole batch's storage alive
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= self.size(old)
            self.evictions += 1

    def rows(
        self,
        keys: Sequence[Hashable],
        compute: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
        device: torch.device,
    ) -> tuple[torch.Tensor, int]:
        """``(n, d)`` rows for ``keys``: from the memo, or ``compute(index)`` for the rows ``index`` (one per missing
        distinct key, in one batched call) returning ``(values (m, d), network calls)``."""
        found: dict[Hashable, torch.Tensor] = {}
        missing: dict[Hashable, int] = {}  # key -> first row that has it
        for row, key in enumerate(keys):
            if key in found or key in missing:
                continue
            value = self.entries.get(key)
            if value is None:
                missing[key] = row
            else:
                self.entries.move_to_end(key)
                found[key] = value
        self.hits += len(found)
        self.misses += len(missing)
        evaluations = 0
        if missing:
            values, evaluations = compute(torch.tensor(list(missing.values()), device=device))
            if len(missing) == len(keys):  # every row computed, in order: the batch as the flow returned it
                for key, value in zip(missing, values, strict=True):
                    self.put(key, value)
                return values, evaluations
            for key, value in zip(missing, values, strict=True):
                found[key] = value
                self.put(key, value)
        return torch.stack([found[key] for key in keys]), evaluations


class CounterfactualGenerator:
    """Inversion + guided re-integration of a :class:`FeatureFlow` (see the module docstring for the equations).

    The generator holds no weights: it integrates the flow it is given (samplers stay separate from networks).
    With ``cache_mb > 0`` it memoises what does not depend on the prompt (the inverted states and the candidate
    counterfactuals, see the module docstring): repeated features cost no network call.

    Args:
        flow: a trained :class:`FeatureFlow`.
        config: the generation settings (:class:`prompt_robust.CounterfactualConfig`'s ``noise_level``,
            ``guidance_scale`` (``w``), ``negative_guidance`` (``w_neg``), ``proximity_weight`` (``λ``, the lower end
            of the search), ``proximity_search``, ``proximity_max``, ``validity_margin``, ``num_steps``, ``method``
            and ``cache_mb``; its other fields are not read); None: the config's defaults. ``method`` is
            ``"euler"`` or ``"midpoint"`` (``rk4`` would evaluate the proximity term at ``t = 1``).
        **overrides: any of those ten settings, replacing the config's value (validated as the config
            validates it).

    Paper: https://arxiv.org/abs/2507.19882

    Example:
        >>> flow = FeatureFlow(feature_dim=4, num_classes=3, hidden_dim=16, depth=1)
        >>> gen = CounterfactualGenerator(flow, noise_level=0.5, num_steps=5)
        >>> out = gen.generate(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([1, 2]))
        >>> out.counterfactuals.shape  # an untrained flow has zero velocity: the identity
        torch.Size([2, 4])
        >>> z, y = torch.ones(2, 4), torch.tensor([0, 1])
        >>> gen.generate(z, y, torch.tensor([1, 2])).evaluations  # inversion + one guided pass, 2 x 5 calls each
        20
        >>> gen.generate(z, y, torch.tensor([1, 2])).evaluations  # the same features again: from the memo
        0
    """

    METHODS: ClassVar[tuple[str, ...]] = CounterfactualConfig.METHODS
    #: the :class:`prompt_robust.CounterfactualConfig` fields the generator reads
    SETTINGS: ClassVar[tuple[str, ...]] = (
        "noise_level",
        "guidance_scale",
        "negative_guidance",
        "proximity_weight",
        "proximity_search",
        "proximity_max",
        "validity_margin",
        "num_steps",
        "method",
        "cache_mb",
    )

    def __init__(self, flow: FeatureFlow, config: CounterfactualConfig | None = None, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(self.SETTINGS))
        if unknown:
            raise TypeError(
                f"CounterfactualGenerator got unknown setting(s) {unknown}; the settings it takes are "
                f"{', '.join(self.SETTINGS)} (fields of CounterfactualConfig)."
            )
        config = CounterfactualConfig() if config is None else config
        if overrides:
            config = dataclasses.replace(config, **overrides)  # re-validated by CounterfactualConfig
        self.flow = flow
        self.noise_level = float(config.noise_level)
        self.guidance_scale = float(config.guidance_scale)
        self.negative_guidance = float(config.negative_guidance)
        self.proximity_weight = float(config.proximity_weight)
        self.proximity_search = int(config.proximity_search)
        self.proximity_max = float(config.proximity_max)
        self.validity_margin = float(config.validity_margin)
        self.sampler = ODESampler(config.num_steps, config.method)
        self.cache_mb = float(config.cache_mb)
        self._memo = _Memo(int(self.cache_mb * (1 << 20)))

    @classmethod
    def from_config(cls, flow: FeatureFlow, config: CounterfactualConfig) -> CounterfactualGenerator:
        """Build from a :class:`prompt_robust.CounterfactualConfig` (the same as ``cls(flow, config)``)."""
        return cls(flow, config)

    def cache_info(self) -> CounterfactualCacheInfo:
        """Hits, misses, size and cap of the memo (see :class:`CounterfactualCacheInfo`)."""
        memo = self._memo
        return CounterfactualCacheInfo(
            memo.hits, memo.misses, len(memo.entries), memo.nbytes, memo.max_bytes, memo.evictions, memo.invalidations
        )

    def clear_cache(self) -> None:
        """Empty the memo (it empties itself when the flow's tensors change; this frees the memory now)."""
        self._memo.clear()

    def _memo_owner(self) -> Hashable | None:
        """What the memo's entries depend on besides their keys: the generation settings and the flow's tensors,
        each identified by its storage and its version counter (bumped by every in-place change: optimiser steps,
        ``load_state_dict``, ``copy_``); None when they cannot be identified (inference tensors)."""
        try:
            tensors = tuple(
                (str(t.device), t.dtype, t.data_ptr(), t._version)
                for t in itertools.chain(self.flow.parameters(), self.flow.buffers())
            )
        except RuntimeError:  # inference-mode tensors have no version counter: a change would go unnoticed
            return None
        settings = (self.noise_level, self.guidance_scale, self.negative_guidance)
        return id(self.flow), settings, self.sampler.num_steps, self.sampler.method, tensors

    def _row_digests(self, features: torch.Tensor) -> list[bytes]:
        """One 16-byte digest of every row of ``features`` as the flow reads it (cast to its dtype)."""
        rows = features.detach().to(self.flow.feature_mean.dtype).cpu().contiguous().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]

    @property
    def t0(self) -> float:
        """The time the factual features are inverted to."""
        return 1.0 - self.noise_level

    def invert(self, x1: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Integrate flow coordinates ``x1`` ``(b, d)`` backwards from ``t = 1`` to ``t_0`` along the
        ``labels``-conditional field; returns the states ``(b, d)`` and the number of network calls."""
        span = self.noise_level

        def backwards(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return -span * self.flow.velocity(x, 1.0 - span * s, labels)  # dx/ds, t = 1 - span * s

        out = self.sampler.sample(backwards, x1)
        return out.sample, out.evaluations

    def guided_velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        anchor: torch.Tensor,
        proximity: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The guided, proximity-blended velocity ``(b, d)`` at states ``x`` ``(b, d)`` and time ``t``.

        Args:
            x: current states (flow coordinates).
            t: 0-dim time in ``[t_0, 1)``.
            source: ``(b,)`` factual classes ``y`` (guided away from).
            target: ``(b,)`` target classes ``y'`` (guided towards).
            anchor: ``(b, d)`` factual features in flow coordinates (the proximity pull's goal).
            proximity: ``λ``, a number or ``(b,)`` per sample (None: ``proximity_weight``).
        """
        w, w_neg = self.guidance_scale, self.negative_guidance
        null = torch.full_like(source, self.flow.null_index)
        terms = [(1.0 - w + w_neg, null), (w, target), (-w_neg, source)]
        terms = [(c, labels) for c, labels in terms if c != 0.0]
        batch = x.shape[0]
        if terms:
            # one network call on the stacked conditions: (n_terms * b, d)
            stacked = self.flow.velocity(
                x.repeat(len(terms), 1), t, torch.cat([labels for _, labels in terms])
            ).reshape(len(terms), batch, -1)
            guided = sum(c * stacked[i] for i, (c, _) in enumerate(terms))  # (b, d)
        else:
            guided = torch.zeros_like(x)
        lam = self.proximity_weight if proximity is None else proximity
        if isinstance(lam, torch.Tensor):
            lam = lam.to(x.dtype).unsqueeze(1)  # (b, 1)
        elif lam == 0.0:
            return guided
        return (1.0 - lam) * guided + lam * (anchor - x) / (1.0 - t)  # t < 1 on the euler / midpoint grids

    def accepts(self, validator: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, targets: torch.Tensor):
        """``(b,)`` True where ``validator`` scores ``targets`` above every other class by ``validity_margin``."""
        scores = validator(features).float()  # (b, n_classes)
        rows = torch.arange(scores.shape[0], device=scores.device)
        target_score = scores[rows, targets]
        others = scores.clone()
        others[rows, targets] = -float("inf")
        return target_score - others.max(dim=1).values > self.validity_margin

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        validator: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> CounterfactualOutput:
        """Counterfactuals of ``features`` ``(b, d)`` (classes ``labels`` ``(b,)``) towards ``targets`` ``(b,)``.

        Args:
            features, labels, targets: see above.
            validator: maps ``(b, d)`` features to ``(b, n_classes)`` class scores (e.g. cosines with the current
                prompt's class text features); it enables the per-sample minimal-change search over ``λ``.

        Returns:
            :class:`CounterfactualOutput`; ``counterfactuals`` are in the feature space (``decode``-d).
            ``evaluations`` counts the network calls made: rows served by the memo cost none.
        """
        flow = self.flow
        if features.dim() != 2 or features.shape[1] != flow.feature_dim:
            raise ValueError(f"features must be (batch, {flow.feature_dim}); got {tuple(features.shape)}.")
        batch = features.shape[0]
        for name, value in (("labels", labels), ("targets", targets)):
            if tuple(value.shape) != (batch,):
                raise ValueError(f"{name} must be ({batch},), one class per feature; got {tuple(value.shape)}.")
            if batch and (int(value.min()) < 0 or int(value.max()) >= flow.num_classes):
                raise ValueError(
                    f"{name} must be class indices in [0, {flow.num_classes}) (the classes the flow was trained on); "
                    f"got values in [{int(value.min())}, {int(value.max())}]."
                )
        labels, targets = labels.long(), targets.long()
        x1 = flow.encode(features)  # (b, d) flow coordinates
        span, start = self.noise_level, self.t0
        owner = self._memo_owner() if self._memo.max_bytes > 0 and batch else None
        memo = None
        if owner is not None:
            memo = self._memo
            memo.bind(owner)
            digests = self._row_digests(features)
            row_labels = labels.tolist()
            out_dtype = str(features.dtype)

        def run_forwards(xt0: torch.Tensor, lam: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, int]:
            """The guided integration of ``rows`` (None: all) from their inverted states ``xt0``, decoded."""
            y, y_target, anchor = (labels, targets, x1) if rows is None else (labels[rows], targets[rows], x1[rows])

            def forwards(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                return span * self.guided_velocity(x, start + span * s, y, y_target, anchor, lam)  # dx/ds

            out = self.sampler.sample(forwards, xt0)
            return flow.decode(out.sample).to(features.dtype), out.evaluations

        if memo is None:  # no memo: every call integrates the whole batch
            xt0, evaluations = self.invert(x1, labels)

            def integrate(lam: torch.Tensor) -> torch.Tensor:
                nonlocal evaluations
                candidate, calls = run_forwards(xt0, lam, None)
                evaluations += calls
                return candidate

        else:  # only the rows the memo does not hold go through the flow, in one batched call each
            xt0, evaluations = memo.rows(
                [("inverted", digest, y) for digest, y in zip(digests, row_labels, strict=True)],
                lambda rows: self.invert(x1[rows], labels[rows]),
                features.device,
            )
            row_targets = targets.tolist()

            def integrate(lam: torch.Tensor) -> torch.Tensor:
                nonlocal evaluations
                keys = [
                    ("candidate", digest, y, y_target, weight, out_dtype)
                    for digest, y, y_target, weight in zip(digests, row_labels, row_targets, lam.tolist(), strict=True)
                ]
                candidate, calls = memo.rows(
                    keys, lambda rows: run_forwards(xt0[rows], lam[rows], rows), features.device
                )
                evaluations += calls
                return candidate

        low = torch.full((batch,), self.proximity_weight, device=features.device)
        best = integrate(low)
        if validator is None:
            return CounterfactualOutput(best, xt0, evaluations, proximity=low)
        valid = self.accepts(validator, best, targets)
        high = torch.full_like(low, self.proximity_max)
        for _ in range(self.proximity_search):  # bisection: the largest accepted λ is the smallest change
            middle = (low + high) / 2
            candidate = integrate(middle)
            accepted = self.accepts(validator, candidate, targets)
            best = torch.where(accepted.unsqueeze(1), candidate, best)
            valid = valid | accepted
            low, high = torch.where(accepted, middle, low), torch.where(accepted, high, middle)
        return CounterfactualOutput(best, xt0, evaluations, proximity=low, valid=valid)

    def __repr__(self) -> str:
        return (
            f"CounterfactualGenerator(noise_level={self.noise_level}, guidance_scale={self.guidance_scale}, "
            f"negative_guidance={self.negative_guidance}, proximity_weight={self.proximity_weight}, "
            f"proximity_search={self.proximity_search}, proximity_max={self.proximity_max}, "
            f"sampler={self.sampler!r})"
        )
