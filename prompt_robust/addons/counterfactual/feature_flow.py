"""A class-conditional flow-matching model of frozen image features (the generative half of DiCap,
https://arxiv.org/abs/2507.19882), its training loop and its on-disk cache.

One velocity network ``v(x_t, t, y)`` serves both the class-conditional field (``y`` a class index) and the
marginal one (``y = null_index``, one extra row of the class embedding): during training the label is replaced
by the null index with probability ``cond_dropout`` (classifier-free training). Time runs from ``t = 0`` (noise)
to ``t = 1`` (data) on the straight path ``x_t = (1 - t) x_0 + t x_1``, as in the refiner.

Features are standardised before the flow sees them: ``x = (z - mean) * scale`` with the training mean and one
*isotropic* scale chosen so the centred coordinates have unit mean square (for unit-norm features of dimension
``d`` this is about ``sqrt(d)``, the scale of an untrained flow). A single scale keeps Euclidean geometry
(distances, proximity) intact up to a constant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ... import cache
from ...flows.matching import flow_matching_loss
from ...flows.time import TimeEmbedding
from .config import CounterfactualConfig

_DEFAULT = CounterfactualConfig()  # the one source of the flow's default settings

__all__ = ["FeatureFlow", "FeatureFlowNet", "FlowFitResult", "fit_feature_flow"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
_CACHE_KIND = "counterfactual-flow"
_WEIGHTS_NAME = "flow.safetensors"  # its JSON sidecar (the final loss and the settings) is flow.json


class _Block(nn.Module):
    """Pre-norm residual MLP block, modulated (scale/shift) by the time + class context."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.modulation = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, 2 * hidden_dim), nn.SiLU(), nn.Linear(2 * hidden_dim, hidden_dim)
        )

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(F.silu(context)).chunk(2, dim=-1)  # (b, h) each
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)  # (b, h)


class FeatureFlowNet(nn.Module):
    """``v(x_t, t, y)``: velocity of a (standardised) feature vector, given the time and a class label.

    The label indexes a learned embedding with ``num_classes + 1`` rows; the last row (``null_index``) is the
    "no class" condition, so the same network gives the marginal velocity ``v(x, t, ∅)`` and the conditional
    ``v(x, t, y)``: the two calls differ *only* in the embedding row they read. Input map + (time + class)
    context, ``depth`` residual MLP blocks, a zero-initialised output map (an untrained network predicts zero
    velocity, so its ODE is the identity).

    Args:
        feature_dim: size of the features.
        num_classes: number of real classes (the null label is ``num_classes``).
        hidden_dim: width of the residual stream.
        depth: residual blocks.

    Example:
        >>> net = FeatureFlowNet(feature_dim=8, num_classes=3, hidden_dim=32, depth=2)
        >>> x, t = torch.randn(4, 8), torch.rand(4)
        >>> net(x, t, torch.tensor([0, 1, 2, net.null_index])).shape
        torch.Size([4, 8])
    """

    def __init__(
        self, feature_dim: int, num_classes: int, hidden_dim: int = _DEFAULT.hidden_dim, depth: int = _DEFAULT.depth
    ) -> None:
        super().__init__()
        for name, value in (("feature_dim", feature_dim), ("num_classes", num_classes), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0; got {depth!r}.")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.inputs = nn.Linear(feature_dim, hidden_dim)
        self.time = TimeEmbedding(hidden_dim)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_dim)  # last row: the null condition
        self.blocks = nn.ModuleList(_Block(hidden_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.outputs = nn.Linear(hidden_dim, feature_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every weight (the output map at zero), from the global torch RNG."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        # unit-scale class rows: with small ones (std 0.02) the conditional fields stayed nearly equal after 1000
        # steps on few-shot 512-d features, and guidance had nothing to act on
        nn.init.normal_(self.class_embedding.weight, std=1.0)
        nn.init.zeros_(self.outputs.weight)
        nn.init.zeros_(self.outputs.bias)

    @property
    def null_index(self) -> int:
        """The label of the marginal ("no class") condition."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocities ``(b, feature_dim)``.

        Args:
            x: ``(b, feature_dim)`` standardised states.
            t: ``(b,)`` or 0-dim times in ``[0, 1]``.
            labels: ``(b,)`` class indices in ``[0, num_classes]`` (``num_classes`` = null: marginal velocity).
        """
        batch = x.shape[0]
        dtype = self.inputs.weight.dtype
        context = self.time(t, batch) + self.class_embedding(labels)  # (b, h)
        h = self.inputs(x.to(dtype)) + context  # (b, h)
        for block in self.blocks:
            h = block(h, context)
        return self.outputs(self.norm(h))  # (b, d)


class FeatureFlow(nn.Module):
    """A :class:`FeatureFlowNet` plus the standardisation of the features it models; all of it is module state
    (saved with an adapter).

    Args:
        feature_dim: size of the features.
        num_classes: number of classes.
        hidden_dim / depth: see :class:`FeatureFlowNet`.

    Attributes:
        feature_mean: ``(feature_dim,)`` mean subtracted before the flow (0 until fitted).
        feature_scale: 0-dim isotropic scale applied after centring (``sqrt(feature_dim)`` until fitted).
        trained_steps: 0-dim count of training steps (0: untrained).

    Example:
        >>> flow = FeatureFlow(feature_dim=8, num_classes=3, hidden_dim=32, depth=1)
        >>> z = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
        >>> torch.allclose(flow.decode(flow.encode(z)), z, atol=1e-6), flow.fitted
        (True, False)
    """

    def __init__(
        self, feature_dim: int, num_classes: int, hidden_dim: int = _DEFAULT.hidden_dim, depth: int = _DEFAULT.depth
    ) -> None:
        super().__init__()
        self.net = FeatureFlowNet(feature_dim, num_classes, hidden_dim, depth)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.tensor(math.sqrt(feature_dim)))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        """True once the flow has been trained (or loaded trained)."""
        return int(self.trained_steps) > 0

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @property
    def null_index(self) -> int:
        return self.net.null_index

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features ``(..., d)`` -> flow coordinates ``(..., d)``: ``(z - mean) * scale``."""
        return (z.to(self.feature_mean.dtype) - self.feature_mean) * self.feature_scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Flow coordinates ``(..., d)`` -> features ``(..., d)`` (the inverse of :meth:`encode`)."""
        return x / self.feature_scale + self.feature_mean

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``v(x, t, y)`` in flow coordinates ``(b, d)``; ``labels == null_index`` gives the marginal field."""
        return self.net(x, t, labels)

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor) -> None:
        """Fit ``feature_mean`` and the isotropic ``feature_scale`` (unit mean square of the centred
        coordinates) on ``features`` ``(n, d)``."""
        features = features.to(self.feature_mean)
        mean = features.mean(0)  # (d,)
        rms = (features - mean).pow(2).mean().sqrt()
        if not torch.isfinite(rms) or float(rms) <= 1e-8:
            raise ValueError(
                f"the {features.shape[0]} training features are (nearly) identical (centred RMS {float(rms):.3g}); "
                "the feature flow needs varied features. Check that the backbone's image features depend on the image."
            )
        self.feature_mean.copy_(mean)
        self.feature_scale.fill_(float(1.0 / rms))

    def flow_matching_loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        cond_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Conditional flow matching (:func:`prompt_robust.flows.flow_matching_loss`) on the straight path from
        noise to the standardised features, with the label replaced by the null index with probability
        ``cond_dropout``.

        Args:
            features: ``(b, d)`` raw features.
            labels: ``(b,)`` class indices.
            cond_dropout: probability of training the marginal field on a sample.
            generator: CPU ``torch.Generator`` for the noise, times and dropout (None: the global CPU RNG).
        """
        x1 = self.encode(features)  # (b, d)
        # every draw comes from the CPU stream (the global one without a generator): noise, times, then dropout
        generator = torch.default_generator if generator is None else generator

        def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            drop = torch.rand(x1.shape[0], generator=generator).to(x1.device) < cond_dropout
            return self.velocity(xt, t, torch.where(drop, torch.full_like(labels, self.null_index), labels))

        return flow_matching_loss(velocity, x1, generator=generator)


@dataclass
class FlowFitResult:
    """What :func:`fit_feature_flow` returns.

    Attributes:
        final_loss: mean flow-matching loss of the last 10% of steps (from the cache's metadata when cached).
        cached: whether the flow was loaded from the cache instead of trained.
        cache_path: the cache folder (None without ``cache_dir``).
    """

    final_loss: float
    cached: bool
    cache_path: Path | None


def _fingerprint(flow: FeatureFlow, features: torch.Tensor, labels: torch.Tensor, settings: dict) -> str:
    """What a fitted flow depends on: every feature and label, the architecture and the training settings."""
    architecture = {
        "version": _CACHE_VERSION,
        "feature_dim": flow.feature_dim,
        "num_classes": flow.num_classes,
        "hidden_dim": flow.net.hidden_dim,
        "depth": len(flow.net.blocks),
    }
    features = features.detach().to(torch.float32)
    return cache.cache_key(_CACHE_KIND, {**architecture, **settings}, features, labels.detach().to(torch.int64))


def _load_cached(flow: FeatureFlow, path: Path, key: str) -> float | None:
    """Load a cached flow into ``flow``; the cached final loss, or None when there is no usable cache (a damaged
    one is named in a warning and retrained)."""
    own = flow.state_dict()

    def matches(entry: cache.CacheEntry) -> str | None:
        tensors, info = entry.tensors, entry.info or {}
        if set(tensors) != set(own) or any(tuple(own[k].shape) != tuple(v.shape) for k, v in tensors.items()):
            return "its tensor names or shapes differ from this flow"
        if not isinstance(info.get("final_loss"), (int, float)):
            return "its sidecar records no final loss"
        return None

    entry = cache.read_cached(path, key=key, info=True, validate=matches, what="feature-flow cache file")
    if entry is None:
        return None
    flow.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in entry.tensors.items()})
    return float(entry.info["final_loss"])


def fit_feature_flow(
    flow: FeatureFlow,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float = _DEFAULT.train_lr,
    batch_size: int = _DEFAULT.train_batch_size,
    cond_dropout: float = _DEFAULT.cond_dropout,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> FlowFitResult:
    """Train ``flow`` on ``(features, labels)`` by classifier-free conditional flow matching (in place).

    The network is re-initialised from ``seed`` and trained with AdamW (cosine decay to 10% of ``lr``) on
    minibatches drawn with replacement; the result depends on ``seed`` and the data only. With ``cache_dir`` the
    trained state is written to ``cache_dir/counterfactual-flow-<fingerprint>/`` (``flow.safetensors`` +
    ``flow.json``), the fingerprint (:func:`prompt_robust.cache.cache_key`) covering every feature, label, the
    architecture and the settings; a rerun with the same inputs loads it, and other inputs get another folder
    (nothing is overwritten). A cached entry that is unreadable, altered or from another entry is retrained and
    replaced with a warning.

    Args:
        flow: the flow to train.
        features: ``(n, d)`` frozen image features (e.g. L2-normalised CLIP features).
        labels: ``(n,)`` class indices in ``[0, flow.num_classes)``.
        steps: optimisation steps (>= 1).
        lr: peak AdamW learning rate.
        batch_size: samples per step.
        cond_dropout: probability that a sample trains the marginal (null-label) field.
        seed: seed of the initialisation, minibatches, noise, times and dropout.
        cache_dir: cache folder; None: no cache.
        progress: show a progress bar.

    Returns:
        :class:`FlowFitResult`.

    Example:
        >>> flow = FeatureFlow(feature_dim=2, num_classes=2, hidden_dim=16, depth=1)
        >>> feats, labels = torch.randn(20, 2), torch.arange(20) % 2
        >>> fit_feature_flow(flow, feats, labels, steps=3, progress=False).cached, flow.fitted
        (False, True)
    """
    if features.dim() != 2 or features.shape[1] != flow.feature_dim:
        raise ValueError(
            f"features must be (n, {flow.feature_dim}) to fit this flow; got {tuple(features.shape)}. Pass "
            "learner.image_features(pixel_values) of the training set."
        )
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},), one per feature; got {tuple(labels.shape)}.")
    if features.shape[0] < 2:
        raise ValueError(f"the feature flow needs at least 2 training features; got {features.shape[0]}.")
    labels = labels.long()
    bad = (labels < 0) | (labels >= flow.num_classes)
    if bad.any():
        raise ValueError(
            f"labels must be class indices in [0, {flow.num_classes}); got {sorted(set(labels[bad].tolist()))[:5]}. "
            "Do the dataset's labels match the learner's classnames?"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}.")
    if not 0 <= cond_dropout < 1:
        raise ValueError(f"cond_dropout must be in [0, 1); got {cond_dropout!r}.")
    settings = {"steps": steps, "lr": lr, "batch_size": batch_size, "cond_dropout": cond_dropout, "seed": seed}
    folder = None
    if cache_dir is not None:
        key = _fingerprint(flow, features, labels, settings)
        folder = Path(cache_dir) / key
        cached = _load_cached(flow, folder / _WEIGHTS_NAME, key)
        if cached is not None:
            logger.info("loaded the cached feature flow from %s", folder)
            return FlowFitResult(final_loss=cached, cached=True, cache_path=folder)

    device = flow.feature_mean.device
    features = features.detach().to(device, flow.feature_mean.dtype)
    labels = labels.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow.net.reset_parameters()
    flow.to(device)
    flow.set_standardisation(features)
    flow.trained_steps.zero_()
    generator = torch.Generator().manual_seed(seed)
    params = list(flow.net.parameters())
    was_training, grad_flags = flow.training, [p.requires_grad for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    batch = min(batch_size, features.shape[0])
    losses: list[float] = []
    flow.train()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            bar = tqdm(range(steps), desc="counterfactual feature flow", disable=not progress)
            for step in bar:
                index = torch.randint(features.shape[0], (batch,), generator=generator).to(device)
                loss = flow.flow_matching_loss(
                    features[index], labels[index], cond_dropout=cond_dropout, generator=generator
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if step % 50 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(
                        f"the feature-flow loss became {losses[-1]} at step {step}; lower train_lr (now {lr})."
                    )
            flow.trained_steps.fill_(steps)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
        flow.train(was_training)
    tail = losses[-max(1, steps // 10) :]
    final = sum(tail) / len(tail)
    if folder is not None:
        info = {"final_loss": final, "n": int(features.shape[0]), **settings}
        cache.write_cached(folder / _WEIGHTS_NAME, flow.state_dict(), key=key, info=info)
        logger.info("cached the feature flow in %s", folder)
    return FlowFitResult(final_loss=final, cached=False, cache_path=folder)
