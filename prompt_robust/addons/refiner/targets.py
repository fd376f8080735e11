"""Per-sample overfitted prompts: the refiner's training targets, computed in batches and cached on disk.

Starting from the learner's trained prompt, every training sample gets its own copy, moved by a few gradient
steps on that sample's loss. One backward pass serves the whole batch: the loss is the *sum* of the per-sample
losses and sample ``i``'s logits depend only on its own prompt copy, so the gradient w.r.t. copy ``i`` is
exactly the gradient of loss ``i`` (the same numbers ``torch.func.vmap(grad(...))`` would give, without
re-tracing the learner). This needs the learner to treat samples independently (no batch statistics), which
CLIP encoders and the reference learners do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ... import cache
from ...data.checks import check_batch, class_count
from ...data.items import collate_images_labels
from ...layers import module_device, non_finite
from ...learners.base import shared_prompt_rows
from .config import RefinerConfig

_DEFAULT = RefinerConfig()  # the one source of the target rules' default settings

__all__ = [
    "TARGET_RULES",
    "RefinerTargets",
    "augmented_views",
    "build_targets",
    "descend_prompts",
    "discover_groups",
    "entropy_prompts",
    "kmeans",
    "marginal_entropy",
    "overfit_prompts",
]

logger = logging.getLogger(__name__)

#: batch keys of the targets
COND_KEY = "refiner_cond"
DELTA_PREFIX = "refiner_delta_"
# 2: checksummed shards that record their batch, the whole dataset in the key; since then the key and the shards'
# records are prompt_robust.cache's (caches written before are not found again and get recomputed)
_CACHE_VERSION = 2
#: the shards' checksum (prompt_robust.cache.checksum, recorded in each file and verified on load)
_checksum = cache.checksum


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _rms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.pow(2).mean(dim=dims, keepdim=True).sqrt()


def descend_prompts(
    learner: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_prompts: int,
    *,
    steps: int,
    lr: float,
    progress: bool = False,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Move ``n_prompts`` copies of the learned prompt, copy ``j`` against the gradient of the summed loss (by
    default the cross-entropy) of the samples assigned to it.

    Each step goes over every batch (gradients add up), then moves copy ``j`` (every site) by
    ``lr x RMS(learned prompt)`` along its gradient normalised per copy and site, so ``lr`` means the same on every
    backbone whatever the scale of its token embeddings. A copy with no sample does not move. One backward pass
    serves a batch: sample ``i``'s logits depend only on its own copy, so the gradient of the summed loss w.r.t.
    copy ``j`` is exactly the sum of its samples' gradients.

    Args:
        learner: a learner implementing the contract.
        batches: ``(pixel_values (b, 3, H, W), targets (b,), assignment (b,))``, ``assignment`` the copy index of
            each sample, ``targets`` what ``loss`` compares the logits with (the labels for the cross-entropy).
        n_prompts: number of copies.
        steps: gradient steps.
        lr: relative step length.
        progress: show a progress bar over the steps.
        loss: ``(logits (b, n_cls), targets (b,)) -> losses (m,)`` whose sum is minimised; every term must depend
            on the prompts of one copy only (default: per-sample cross-entropy).

    Returns:
        ``({site: (n_prompts, n_tokens, dim)}, loss_before (M,), loss_after (M,))`` with ``M`` the loss terms of
        all batches, in order (the samples, for the cross-entropy).
    """
    if loss is None:
        loss = _cross_entropy
    base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
    if not base:
        raise ValueError(f"{type(learner).__name__}.prompt_tokens() is empty: there is no prompt to overfit.")
    scale = {}
    for site, p in base.items():
        rms = float(_rms(p.float(), (0, 1)))
        if rms < 1e-6:  # an all-zero prompt (e.g. a bias initialised at 0) has no scale: take absolute steps
            logger.warning("the learned prompt of site %r is ~0; overfitting steps have absolute length %g", site, lr)
            rms = 1.0
        scale[site] = rms
    prompts = {site: p.unsqueeze(0).expand(n_prompts, *p.shape).clone() for site, p in base.items()}  # (P, n, d)
    losses = []
    for step in tqdm(range(steps + 1), desc="target prompts", disable=not progress):
        grads = {site: torch.zeros_like(p) for site, p in prompts.items()}
        per_sample = []
        for pixel_values, labels, assignment in batches:
            with torch.enable_grad():
                leaves = {site: p.detach().requires_grad_(True) for site, p in prompts.items()}
                override = {site: leaf[assignment] for site, leaf in leaves.items()}  # (b, n, d)
                terms = loss(_logits(learner(pixel_values, prompt_override=override)), labels)
                per_sample.append(terms.detach())
                if step < steps:
                    # the sum couples nothing: d(sum)/d(copy_j) = sum of d(loss_i)/d(copy_j) over its samples
                    for site, g in zip(leaves, torch.autograd.grad(terms.sum(), list(leaves.values())), strict=True):
                        grads[site] += g
        losses.append(torch.cat(per_sample))
        if step == steps:
            break
        moved = {}
        for site, p in prompts.items():
            g = grads[site]
            direction = g / _rms(g, (1, 2)).clamp_min(1e-12)  # (P, n, d), unit RMS per copy (0 when unused)
            moved[site] = (p - lr * scale[site] * direction).detach()
        prompts = moved
    return prompts, losses[0], losses[-1]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def marginal_entropy(logits: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean predicted distribution of each image's views (test-time prompt tuning's objective).

    Args:
        logits: ``(m, n_cls)`` of the views.
        owner: ``(m,)`` index of the image each view belongs to, ``0..n-1``, every image with at least one view.

    Returns:
        ``(n,)`` entropies (nats).

    Example:
        >>> logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
        >>> [round(h, 3) for h in marginal_entropy(logits, torch.tensor([0, 0, 1])).tolist()]  # ln 2, then ~0
        [0.693, 0.0]
    """
    n = int(owner.max()) + 1
    probs = logits.float().softmax(-1)
    counts = torch.bincount(owner, minlength=n).clamp_min(1).unsqueeze(1).to(probs.dtype)
    mean = torch.zeros(n, probs.shape[1], dtype=probs.dtype, device=probs.device).index_add(0, owner, probs) / counts
    return -(mean * mean.clamp_min(1e-12).log()).sum(-1)


def augmented_views(
    pixel_values: torch.Tensor,
    n_views: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
) -> torch.Tensor:
    """``n_views`` views of every image: the image itself, then random resized crops (area fraction in ``scale``,
    aspect ratio 3/4..4/3, bilinear back to full size), each flipped horizontally with probability 1/2.

    Args:
        pixel_values: ``(b, 3, H, W)``.
        n_views: views per image (the first is the image).
        generator: CPU generator the crops are drawn from (seed it for reproducible views).
        scale: range of the crop's area fraction.

    Returns:
        ``(b * n_views, 3, H, W)``, image ``i``'s views at ``i * n_views ...``.
    """
    batch, _, height, width = pixel_values.shape
    out = pixel_values.unsqueeze(1).repeat(1, n_views, 1, 1, 1)  # (b, V, 3, H, W)
    for i in range(batch):
        for v in range(1, n_views):
            area = float(torch.empty(()).uniform_(*scale, generator=generator))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
            w = max(2, min(width, round(math.sqrt(area * ratio) * width)))
            h = max(2, min(height, round(math.sqrt(area / ratio) * height)))
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            crop = pixel_values[i : i + 1, :, top : top + h, left : left + w]
            view = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
            out[i, v] = view.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else view
    return out.reshape(batch * n_views, *pixel_values.shape[1:])


def entropy_prompts(
    learner: nn.Module,
    pixel_values: torch.Tensor,
    *,
    steps: int,
    lr: float,
    views: int,
    keep: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One prompt per image that minimises the marginal entropy of its confident augmented views, without its label
    (test-time prompt tuning's rule, vectorised over the batch): ``views`` views per image
    (:func:`augmented_views`), of which the ``keep`` fraction with the lowest prediction entropy under the learned
    prompt is kept; then ``steps`` steps of :func:`descend_prompts` on :func:`marginal_entropy`. The same rule can
    be applied to any image, a test image included.

    Returns:
        ``({site: (b, n_tokens, dim)}, entropy_before (b,), entropy_after (b,))``.
    """
    batch = pixel_values.shape[0]
    all_views = augmented_views(pixel_values, views, generator)  # (b * V, 3, H, W)
    n_keep = max(1, round(keep * views))
    with torch.no_grad():
        logits = _logits(learner(all_views)).float().reshape(batch, views, -1)  # the learned prompt, shared
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (b, V)
    chosen = entropy.argsort(dim=1)[:, :n_keep]  # (b, k) the most confident views
    index = (chosen + torch.arange(batch, device=chosen.device).unsqueeze(1) * views).reshape(-1)
    owner = torch.arange(batch, device=pixel_values.device).repeat_interleave(n_keep)
    batches = [(all_views[index], owner, owner)]
    with shared_prompt_rows(owner):  # an image's views share its prompt: one text pass per image, not per view
        return descend_prompts(learner, batches, batch, steps=steps, lr=lr, loss=marginal_entropy)


def overfit_prompts(
    learner: nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Overfit one prompt per sample, vectorised over the batch (:func:`descend_prompts` with one copy per
    sample): each step moves sample ``i``'s prompt against the gradient of its own cross-entropy.

    Args:
        learner: a learner implementing the contract.
        pixel_values: ``(b, 3, H, W)``.
        labels: ``(b,)``.
        steps: gradient steps.
        lr: relative step length.

    Returns:
        ``({site: (b, n_tokens, dim)}, loss_before (b,), loss_after (b,))``.
    """
    batch = pixel_values.shape[0]
    assignment = torch.arange(batch, device=pixel_values.device)
    return descend_prompts(learner, [(pixel_values, labels, assignment)], batch, steps=steps, lr=lr)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ initialisation, Lloyd iterations until no point changes cluster).

    Args:
        x: ``(N, D)`` points.
        k: clusters (at most ``N``).
        seed: seed of the initialisation.
        iters: maximum Lloyd iterations.

    Returns:
        ``(assignment (N,), centers (k, D))``.

    Example:
        >>> points = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
        >>> kmeans(points, 2)[0].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
        True
    """
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of points ({x.shape[0]}); got {k}.")
    x = x.float()
    generator = torch.Generator().manual_seed(int(seed))
    centers = x[torch.randint(x.shape[0], (1,), generator=generator)]  # (1, D)
    for _ in range(k - 1):
        d2 = torch.cdist(x, centers).min(1).values.pow(2)  # (N,)
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / len(d2))
        centers = torch.cat([centers, x[torch.multinomial(probs, 1, generator=generator)]])
    assignment = torch.cdist(x, centers).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = assignment == j
            if members.any():  # an emptied cluster keeps its center
                centers[j] = x[members].mean(0)
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, assignment):
            break
        assignment = new
    return assignment, centers


def discover_groups(features: torch.Tensor, labels: torch.Tensor, n_groups: int, *, seed: int = 0) -> torch.Tensor:
    """Label-free image groups of a training set: k-means on the image features minus their class's mean.

    Removing the class mean leaves what varies *within* classes (style, background, colour, ...), so the groups
    cut across classes; a prompt trained per group then adapts to the image's appearance, not to its label.

    Args:
        features: ``(N, d)`` image features.
        labels: ``(N,)`` classes (used only to remove the class means).
        n_groups: number of groups (capped at ``N``).
        seed: k-means seed.

    Returns:
        ``(N,)`` group ids in ``[0, n_groups)``.
    """
    z = F.normalize(features.float(), dim=-1)  # (N, d)
    n_classes = int(labels.max()) + 1
    sums = torch.zeros(n_classes, z.shape[1]).index_add_(0, labels.cpu(), z.cpu())
    counts = torch.bincount(labels.cpu(), minlength=n_classes).clamp_min(1).unsqueeze(1)
    residual = z.cpu() - (sums / counts)[labels.cpu()]  # (N, d)
    return kmeans(residual, min(n_groups, len(z)), seed=seed)[0]


#: how a training sample's target prompt is made (``RefinerConfig.targets``)
TARGET_RULES: tuple[str, ...] = ("overfit", "group", "entropy")


@dataclass
class _Computed:
    cond: torch.Tensor  # (N, d)
    deltas: dict[str, torch.Tensor]  # site -> (N, n, w): target - learned prompt
    loss_before: torch.Tensor  # (N,)
    loss_after: torch.Tensor  # (N,)
    groups: torch.Tensor | None = None  # (N,) group of each sample (rule "group")


class RefinerTargets(Dataset):
    """A training set plus, per sample, the conditioning feature and the target-prompt offsets.

    Items are the dataset's own items (as dicts) plus ``"refiner_cond"`` ``(embed_dim,)`` and
    ``"refiner_delta_<site>"`` ``(n_tokens, dim)`` (target prompt minus the learned prompt). Feed it to
    :func:`prompt_robust.fit` with the wrapped model in the ``"refiner"`` stage.

    Attributes:
        cond: ``(N, embed_dim)``.
        deltas: ``{site: (N, n_tokens, dim)}``.
        loss_before / loss_after: ``(N,)`` per-sample losses with the learned and the target prompt.
        groups: ``(N,)`` each sample's group (rule ``"group"``), else None.
        cache_path: where the targets were cached (None without a cache).
    """

    def __init__(self, dataset: Dataset, computed: _Computed, cache_path: Path | None = None) -> None:
        self.dataset = dataset
        self.cond = computed.cond
        self.deltas = computed.deltas
        self.loss_before = computed.loss_before
        self.loss_after = computed.loss_after
        self.groups = computed.groups
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


def _fingerprint(
    learner: nn.Module, dataset: Dataset, steps: int, lr: float, rule: dict[str, Any], batch_size: int
) -> str:
    """The cache key (the folder's name): see :func:`build_targets` for what it covers."""
    settings = {
        "version": _CACHE_VERSION,
        "learner": type(learner).__name__,
        "classnames": list(getattr(learner, "classnames", [])),
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,  # shards are batches; rule "entropy" draws its views per batch
        **rule,
    }
    # the learner: its backbone's fingerprint and every tensor outside it, trainable or not (in the "refiner" stage
    # the learner is frozen, yet its prompt still defines the targets)
    return cache.cache_key("refiner-targets", settings, learner, cache.dataset_digest(dataset))


def build_targets(
    learner: nn.Module,
    dataset: Dataset,
    *,
    steps: int,
    lr: float,
    batch_size: int = _DEFAULT.target_batch_size,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    rule: str = _DEFAULT.targets,
    n_groups: int = _DEFAULT.num_groups,
    seed: int = 0,
    views: int = _DEFAULT.entropy_views,
    keep: float = _DEFAULT.entropy_keep,
) -> RefinerTargets:
    """Target-prompt offsets and conditioning features of every sample of ``dataset``.

    Rules (:data:`TARGET_RULES`):

    * ``"overfit"`` (the paper's): each sample's own prompt, ``steps`` steps on its own cross-entropy
      (:func:`overfit_prompts`). Such offsets encode the sample's label;
    * ``"group"``: the training set is split into ``n_groups`` label-free groups (:func:`discover_groups`, seeded
      by ``seed``) and every group gets one prompt, ``steps`` steps on its samples' summed cross-entropy
      (:func:`descend_prompts`); a sample's target is its group's prompt, which a test image of the same
      appearance can use;
    * ``"entropy"``: each sample's own prompt, ``steps`` steps on the marginal entropy of its ``keep`` most
      confident of ``views`` augmented views (:func:`entropy_prompts`, test-time prompt tuning's rule; the views
      are drawn from ``seed`` and the batch number). No label is used, so the rule means the same on a test image.

    With ``cache_dir`` the result is stored under ``cache_dir/refiner-targets-<fingerprint>/`` (per-sample
    targets: one safetensors shard per batch, written as soon as it is computed, so an interrupted pass
    resumes; group targets: one file). A rerun with the same learner, data and settings loads them; different
    settings get a different folder: nothing is overwritten.

    The fingerprint (:func:`prompt_robust.cache.cache_key`) covers: the cache format version; the learner's class,
    class names and every tensor outside its backbone (the learned prompt included); the backbone's own
    fingerprint; ``steps``, ``lr``, ``batch_size``, ``rule`` and the rule's settings (``n_groups`` and ``seed`` for
    ``"group"``; ``views``, ``keep`` and ``seed`` for ``"entropy"``); and the dataset by the library's one dataset
    identity policy (:mod:`prompt_robust.cache`): its length, the label of every item, and every item's identity:

    * for datasets that list their image files (the loaders' :class:`~prompt_robust.data.ImageListDataset`, and
      ``Subset`` / :class:`~prompt_robust.data.FewShotSubset` views of one), each file's path, size and
      modification time (a renamed, replaced or rewritten image changes the key; no image is opened for it), plus
      the full pixel values (after the dataset's transform) of 16 evenly spaced items, which catches a changed
      transform;
    * for any other dataset every item is read once and its label, shape and full pixel values are hashed.

    Not covered: anything the dataset's items carry besides pixels and labels, and the code of the learner's
    ``forward``. Caches written before the shared key (:mod:`prompt_robust.cache`) are not found again and get
    recomputed (their folders are left as they were).

    Every cached file carries, in its safetensors metadata, the key of its folder, its batch number and sample
    range (group targets: the sample count) and a sha256 checksum of its tensors. A file that is unreadable,
    whose checksum does not match (a flipped bit, a partial copy), that belongs to another batch or cache (swapped
    or copied shards) or that holds NaN/Inf is not used: a warning names it, and it is recomputed and replaced
    (only that file of the library's own cache). Freshly computed targets that are not finite raise
    :class:`FloatingPointError` and are not cached.

    Args:
        learner: the trained learner (its prompt is the starting point).
        dataset: items ``{"pixel_values", "labels", ...}`` or ``(pixel_values, label)`` pairs.
        steps / lr: see :func:`descend_prompts`.
        batch_size: samples per batch (bounds memory: ``batch_size x n_classes`` text sequences).
        cache_dir: folder for the cache; None: no cache.
        progress: show a progress bar.
        rule: ``"overfit"``, ``"group"`` or ``"entropy"``.
        n_groups / seed: groups of the ``"group"`` rule and their k-means seed (``"entropy"``: seed of the views).
        views / keep: views per image and the kept fraction of rule ``"entropy"``.
    """
    if rule not in TARGET_RULES:
        from ...config import unknown_name_error

        raise unknown_name_error("refiner target rule", rule, TARGET_RULES)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: the refiner needs training samples to overfit prompts on.")
    device = module_device(learner)
    folder = None
    if cache_dir is not None:
        key: dict[str, Any] = {"targets": rule}
        if rule == "group":
            key.update(n_groups=n_groups, seed=seed)
        elif rule == "entropy":
            key.update(views=views, keep=keep, seed=seed)
        folder = Path(cache_dir) / _fingerprint(learner, dataset, steps, lr, key, batch_size)
        folder.mkdir(parents=True, exist_ok=True)
    batches = [range(s, min(s + batch_size, len(dataset))) for s in range(0, len(dataset), batch_size)]
    was_training = learner.training
    learner.eval()
    try:
        if rule == "group":
            computed = _group_targets(learner, dataset, batches, device, folder, (steps, lr, n_groups, seed), progress)
        else:

            def rule_fn(pixel_values, labels, number):  # the prompts of batch ``number``
                if rule == "overfit":
                    return overfit_prompts(learner, pixel_values, labels, steps=steps, lr=lr)
                generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + number)
                return entropy_prompts(
                    learner, pixel_values, steps=steps, lr=lr, views=views, keep=keep, generator=generator
                )

            computed = _sample_targets(learner, dataset, batches, device, folder, rule_fn, rule != "entropy", progress)
    finally:
        learner.train(was_training)
    if len(computed.cond) != len(dataset):
        raise RuntimeError(
            f"the cached targets in {folder} hold {len(computed.cond)} samples for a dataset of {len(dataset)}; "
            "delete that folder to recompute them."
        )
    return RefinerTargets(dataset, computed, folder)


def _batch(
    dataset: Dataset, indices: range, device: torch.device, num_classes: int | None, labelled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate_images_labels([dataset[i] for i in indices])
    # the labels are only checked where the rule uses them ("entropy" never reads them)
    check_batch(batch["pixel_values"], batch["labels"] if labelled else None, num_classes)
    return batch["pixel_values"].to(device), batch["labels"].to(device)


def _require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Freshly computed targets with NaN/Inf are an error (caching or training on them would spread it)."""
    bad = non_finite(tensors)
    if bad:
        raise FloatingPointError(
            f"refiner targets not finite for {what}: NaN or Inf in {', '.join(bad)}; nothing was cached. Check "
            "those samples' pixel values for NaN/Inf (the conditioning feature 'cond' is NaN when an image is) "
            "and, if the losses diverge, lower the overfitting steps or lr (RefinerConfig.inner_steps / inner_lr)."
        )


def _read_shard(path: Path, key: str, place: dict[str, str], rows: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The tensors of a cached file when it is intact, finite and the one expected at ``path``; else None after a
    warning naming it (:func:`prompt_robust.cache.read_cached`), and the caller recomputes and replaces it."""
    entry = cache.read_cached(path, key=key, place=place, rows=rows, finite=True, what="refiner target cache file")
    return entry.tensors if entry is not None else None


def _sample_targets(learner, dataset, batches, device, folder, rule_fn, labelled, progress) -> _Computed:
    parts: list[dict[str, torch.Tensor]] = []
    key = folder.name if folder is not None else ""
    n_classes = class_count(learner)
    for number, indices in enumerate(tqdm(batches, desc="refiner targets", disable=not progress)):
        shard = folder / f"shard-{number:05d}.safetensors" if folder is not None else None
        place = {"batch": str(number), "samples": f"{indices.start}..{indices.stop - 1}"}
        if shard is not None and shard.is_file():  # cached: the batch's images are not even read
            n = len(indices)
            part = _read_shard(shard, key, place, {"cond": n, "loss_before": n, "loss_after": n})
            if part is not None:
                parts.append(part)
                continue
        pixel_values, labels = _batch(dataset, indices, device, n_classes, labelled)
        prompts, before, after = rule_fn(pixel_values, labels, number)
        base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
        with torch.no_grad():
            cond = learner.image_features(pixel_values)
        part = {"cond": cond.float().cpu(), "loss_before": before.cpu(), "loss_after": after.cpu()}
        for site, p in prompts.items():
            part[f"delta.{site}"] = (p - base[site]).float().cpu()
        _require_finite(part, f"batch {number} (samples {place['samples']})")
        if shard is not None:
            cache.write_cached(shard, part, key=key, place=place)
        parts.append(part)
    sites = [key[len("delta.") :] for key in parts[0] if key.startswith("delta.")]
    return _Computed(
        cond=torch.cat([p["cond"] for p in parts]),
        deltas={site: torch.cat([p[f"delta.{site}"] for p in parts]) for site in sites},
        loss_before=torch.cat([p["loss_before"] for p in parts]),
        loss_after=torch.cat([p["loss_after"] for p in parts]),
    )


def _group_targets(learner, dataset, batches, device, folder, settings, progress) -> _Computed:
    steps, lr, n_groups, seed = settings
    path = folder / "group-targets.safetensors" if folder is not None else None
    n = len(dataset)
    key, place = folder.name if folder is not None else "", {"samples": f"0..{n - 1}"}
    part = None
    if path is not None and path.is_file():
        part = _read_shard(path, key, place, {"cond": n, "loss_before": n, "loss_after": n, "groups": n})
    if part is None:
        n_classes = class_count(learner)
        loaded = [_batch(dataset, indices, device, n_classes) for indices in batches]
        with torch.no_grad():
            cond = torch.cat([learner.image_features(x).float().cpu() for x, _ in loaded])  # (N, d)
        labels = torch.cat([y.cpu() for _, y in loaded])
        groups = discover_groups(cond, labels, n_groups, seed=seed)  # (N,)
        assigned = [
            (x, y, groups[indices.start : indices.stop].to(device))
            for (x, y), indices in zip(loaded, batches, strict=True)
        ]
        prompts, before, after = descend_prompts(learner, assigned, n_groups, steps=steps, lr=lr, progress=progress)
        base = {site: p.detach() for site, p in learner.prompt_tokens().items()}
        part = {"cond": cond, "loss_before": before.cpu(), "loss_after": after.cpu(), "groups": groups}
        for site, p in prompts.items():
            part[f"group_delta.{site}"] = (p - base[site]).float().cpu()  # (G, n, w)
        _require_finite(part, "the group targets")
        if path is not None:
            cache.write_cached(path, part, key=key, place=place)
    groups = part["groups"].long()
    sites = [key[len("group_delta.") :] for key in part if key.startswith("group_delta.")]
    return _Computed(
        cond=part["cond"],
        deltas={site: part[f"group_delta.{site}"][groups] for site in sites},  # (N, n, w)
        loss_before=part["loss_before"],
        loss_after=part["loss_after"],
        groups=groups,
    )
