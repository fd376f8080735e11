"""Per-sample overfitted prompts: the refiner's training targets, computed in batches and cached on disk.

Starting from the learner's trained prompt, every training sample gets its own copy, moved by a few gradient
steps on that sample's loss. One backward pass serves the whole batch: the loss is the *sum* of the per-sample
losses and sample ``i``'s logits depend only on its own prompt copy, so the gradient w.r.t. copy ``i`` is
exactly the gradient of loss ``i`` (the same numbers ``torch.func.vmap(grad(...))`` would give, without
re-tracing the learner). This needs the learner to treat samples independently (no batch statistics), which
CLIP encoders and the reference learners do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import _io
from ..data.items import collate_images_labels, hash_items

__all__ = ["RefinerTargets", "build_targets", "overfit_prompts"]

logger = logging.getLogger(__name__)

#: batch keys of the targets
COND_KEY = "refiner_cond"
DELTA_PREFIX = "refiner_delta_"
_CACHE_VERSION = 1


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _rms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.pow(2).mean(dim=dims, keepdim=True).sqrt()


def overfit_prompts(
    learner: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Overfit one prompt per sample, vectorised over the batch.

    Each step moves sample ``i``'s prompt (every site) against the gradient of its own cross-entropy, by
    ``lr x RMS(learned prompt)`` along the gradient normalised per sample and site, so ``lr`` means the same
    on every backbone whatever the scale of its token embeddings.

    Args:
        learner: a learner implementing the contract.
        pixel_values: ``(b, 3, H, W)``.
        labels: ``(b,)``.
        steps: gradient steps.
        lr: relative step length.

    Returns:
        ``({site: (b, n_tokens, dim)}, loss_before (b,), loss_after (b,))``.
    """
    base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
    if not base:
        raise ValueError(f"{type(learner).__name__}.prompt_tokens() is empty: there is no prompt to overfit.")
    batch = pixel_values.shape[0]
    scale = {}
    for site, p in base.items():
        rms = float(_rms(p.float(), (0, 1)))
        if rms < 1e-6:  # an all-zero prompt (e.g. a bias initialised at 0) has no scale: take absolute steps
            logger.warning("the learned prompt of site %r is ~0; overfitting steps have absolute length %g", site, lr)
            rms = 1.0
        scale[site] = rms
    prompts = {site: p.unsqueeze(0).expand(batch, *p.shape).clone() for site, p in base.items()}  # (b, n, d)
    losses = []
    for step in range(steps + 1):
        with torch.enable_grad():
            for p in prompts.values():
                p.requires_grad_(True)
            per_sample = F.cross_entropy(
                _logits(learner(pixel_values, prompt_override=prompts)), labels, reduction="none"
            )
            losses.append(per_sample.detach())
            if step == steps:
                break
            # the sum couples nothing: d(sum)/d(prompt_i) = d(loss_i)/d(prompt_i)
            grads = torch.autograd.grad(per_sample.sum(), list(prompts.values()))
        moved = {}
        for (site, p), g in zip(prompts.items(), grads, strict=True):
            direction = g / _rms(g, (1, 2)).clamp_min(1e-12)  # (b, n, d), unit RMS per sample
            moved[site] = (p - lr * scale[site] * direction).detach()
        prompts = moved
    return {site: p.detach() for site, p in prompts.items()}, losses[0], losses[-1]


@dataclass
class _Computed:
    cond: torch.Tensor  # (N, d)
    deltas: dict[str, torch.Tensor]  # site -> (N, n, w): overfitted - learned prompt
    loss_before: torch.Tensor  # (N,)
    loss_after: torch.Tensor  # (N,)


class RefinerTargets(Dataset):
    """A training set plus, per sample, the conditioning feature and the overfitted-prompt offsets.

    Items are the dataset's own items (as dicts) plus ``"refiner_cond"`` ``(embed_dim,)`` and
    ``"refiner_delta_<site>"`` ``(n_tokens, dim)`` (overfitted prompt minus the learned prompt). Feed it to
    :func:`prompt_robust.fit` with the wrapped model in the ``"refiner"`` stage.

    Attributes:
        cond: ``(N, embed_dim)``.
        deltas: ``{site: (N, n_tokens, dim)}``.
        loss_before / loss_after: ``(N,)`` per-sample losses with the learned and the overfitted prompt.
        cache_path: where the targets were cached (None without a cache).
    """

    def __init__(self, dataset: Dataset, computed: _Computed, cache_path: Path | None = None) -> None:
        self.dataset = dataset
        self.cond = computed.cond
        self.deltas = computed.deltas
        self.loss_before = computed.loss_before
        self.loss_after = computed.loss_after
        self.cache_path = cache_path

    def __len__(self) -> int:
        return len(self.cond)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            pixel_values, label = item
            item = {"pixel_values": pixel_values, "labels": label}
        out = dict(item)
        out[COND_KEY] = self.cond[index]
        for site, delta in self.deltas.items():
            out[DELTA_PREFIX + site] = delta[index]
        return out

    def summary(self) -> dict[str, float]:
        """Mean per-sample loss before/after overfitting and the offsets' RMS per site."""
        out = {"loss_before": float(self.loss_before.mean()), "loss_after": float(self.loss_after.mean())}
        for site, delta in self.deltas.items():
            out[f"delta_rms/{site}"] = float(delta.float().pow(2).mean().sqrt())
        return out


def _fingerprint(learner: nn.Module, dataset: Dataset, steps: int, lr: float) -> str:
    """What the targets depend on: the learned prompt, the learner's weights that shape the logits, the
    classes, the overfitting settings and the dataset (its size, and the images and labels of up to 16
    evenly spaced items — hashing every image would cost as much as recomputing)."""
    digest = hashlib.sha256()
    meta = {
        "version": _CACHE_VERSION,
        "learner": type(learner).__name__,
        "classnames": list(getattr(learner, "classnames", [])),
        "steps": steps,
        "lr": lr,
        "n": len(dataset),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    backbone_fp = getattr(getattr(learner, "backbone", None), "fingerprint", None)
    if callable(backbone_fp):
        digest.update(backbone_fp().encode())
    # every learner tensor outside the (fingerprinted) backbone, trainable or not: in the "refiner" stage the
    # learner is frozen, yet its prompt still defines the targets
    backbone = getattr(learner, "backbone", None)
    skip = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    for name, param in sorted(learner.named_parameters()):
        if id(param) not in skip:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    n = len(dataset)
    hash_items(digest, dataset, sorted({round(i * (n - 1) / 15) for i in range(16)} if n > 1 else {0}))
    return digest.hexdigest()[:20]


def build_targets(
    learner: nn.Module,
    dataset: Dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> RefinerTargets:
    """Overfitted-prompt offsets and conditioning features of every sample of ``dataset``.

    With ``cache_dir`` each batch is written as a safetensors shard under
    ``cache_dir/refiner-targets-<fingerprint>/`` as soon as it is computed; a rerun with the same learner,
    data and settings loads the finished shards and computes only the missing ones (so an interrupted pass
    resumes). Different settings get a different folder: nothing is overwritten.

    Args:
        learner: the trained learner (its prompt is the starting point).
        dataset: items ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)`` pairs.
        steps / lr: see :func:`overfit_prompts`.
        batch_size: samples per overfitting batch (bounds memory: ``batch_size x n_classes`` text sequences).
        cache_dir: folder for the shards; None: no cache.
        progress: show a progress bar.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: the refiner needs training samples to overfit prompts on.")
    device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"refiner-targets-{_fingerprint(learner, dataset, steps, lr)}"
        folder.mkdir(parents=True, exist_ok=True)
    batches = [range(s, min(s + batch_size, len(dataset))) for s in range(0, len(dataset), batch_size)]
    parts: list[dict[str, torch.Tensor]] = []
    was_training = learner.training
    learner.eval()
    try:
        for number, indices in enumerate(tqdm(batches, desc="refiner targets", disable=not progress)):
            shard = folder / f"shard-{number:05d}.safetensors" if folder is not None else None
            if shard is not None and shard.is_file():  # cached: the batch's images are not even read
                parts.append(_io.read_safetensors(shard))
                continue
            batch = collate_images_labels([dataset[i] for i in indices])
            pixel_values, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
            prompts, before, after = overfit_prompts(learner, pixel_values, labels, steps=steps, lr=lr)
            base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
            with torch.no_grad():
                cond = learner.image_features(pixel_values)
            part = {"cond": cond.float().cpu(), "loss_before": before.cpu(), "loss_after": after.cpu()}
            for site, p in prompts.items():
                part[f"delta.{site}"] = (p - base[site]).float().cpu()
            if shard is not None:
                _io.write_safetensors(shard, part)
            parts.append(part)
    finally:
        learner.train(was_training)
    sites = [key[len("delta.") :] for key in parts[0] if key.startswith("delta.")]
    computed = _Computed(
        cond=torch.cat([p["cond"] for p in parts]),
        deltas={site: torch.cat([p[f"delta.{site}"] for p in parts]) for site in sites},
        loss_before=torch.cat([p["loss_before"] for p in parts]),
        loss_after=torch.cat([p["loss_after"] for p in parts]),
    )
    if len(computed.cond) != len(dataset):
        raise RuntimeError(
            f"the cached targets in {folder} hold {len(computed.cond)} samples for a dataset of {len(dataset)}; "
            "delete that folder to recompute them."
        )
    return RefinerTargets(dataset, computed, folder)
