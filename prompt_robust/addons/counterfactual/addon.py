"""The counterfactual contrastive regularizer add-on (DiCap, "Causality-aligned Prompt Learning via
Diffusion-based Counterfactual Generation", https://arxiv.org/abs/2507.19882).

1. ``model.fit_addons(train_data)`` (before prompt tuning; ``prompt_robust.fit`` calls it): the frozen, prompt-free image features of the
   training set train a class-conditional :class:`FeatureFlow` (cached on disk, saved with the adapter);
2. during prompt tuning, each batch's factual features ``z`` get ``K`` minimal counterfactuals ``z'`` towards
   other classes (:class:`CounterfactualGenerator`, no gradient), and the loss gains

   ``weight · mean_i -log exp(t_y·z/τ) / (exp(t_y·z/τ) + Σ_k exp(t_y·z'_k/τ))``

   with ``t_y`` the prompt-conditioned text feature of the true class: the prompt is pulled to the factual
   feature and pushed from the feature that differs from it only in the class-causal factor. What does not
   depend on the prompt (a feature's inversion and its candidates per target and ``λ``) is memoised by the
   generator (``cache_mb``), so repeated features (a fixed few-shot set, from the second epoch on) cost no ODE;
   the targets and the ``λ`` search still use the current prompt at every step, so the loss is the per-step one.

See ``docs/counterfactual.md`` for the choices made where the paper is silent.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...backbones.base import find_backbone
from ...data.items import ordered_loader
from ...layers import module_device
from ..base import (
    AddonFit,
    ForwardState,
    LossTerms,
    RobustAddon,
    learner_feature_dim,
    learner_logit_scale,
    register_addon,
)
from .config import CounterfactualConfig
from .feature_flow import FeatureFlow, fit_feature_flow
from .generator import CounterfactualGenerator, choose_targets

__all__ = ["CounterfactualRegularizer"]

logger = logging.getLogger(__name__)


def _num_classes(learner: nn.Module) -> int:
    classnames = getattr(learner, "classnames", None)
    if classnames is None or isinstance(classnames, str):
        raise ValueError(
            f"the counterfactual add-on needs to know the classes of {type(learner).__name__} (its feature flow has "
            "one embedding per class): set a list attribute `classnames` on the learner, one name per logit column."
        )
    n = len(classnames)
    if n < 2:
        raise ValueError(
            f"the counterfactual add-on needs at least 2 classes (a counterfactual flips the class); "
            f"{type(learner).__name__} has {n}."
        )
    return n


@register_addon
class CounterfactualRegularizer(RobustAddon):
    """Counterfactual contrastive regularizer for any learner whose output carries class text features.

    The feature flow (network, feature standardisation, trained flag) is module state: it is saved with the
    adapter under ``addons.counterfactual.flow.*`` and never trained by the prompt optimiser (its parameters do
    not require gradients and it owns no stage). The regularizer acts in the ``"prompt"`` stage only.

    Args:
        learner: the wrapped learner; the flow's size comes from its backbone's ``embed_dim`` (or a
            ``feature_dim`` attribute) and ``len(learner.classnames)``.
        config: :class:`prompt_robust.CounterfactualConfig`.

    Paper: https://arxiv.org/abs/2507.19882

    Example:
        >>> import prompt_robust as pr, prompt_robust.addons.counterfactual
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = pr.build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
        >>> model = pr.wrap(learner, pr.RobustConfig(counterfactual=pr.CounterfactualConfig(train_steps=5)))
        >>> images = [(torch.randn(3, 32, 32), i % 2) for i in range(8)]
        >>> logs = model.fit_addons(images, progress=False)  # fits the feature flow
        >>> out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
        >>> sorted(k for k in out.logs if k.startswith("counterfactual/"))
        ['counterfactual/cosine', 'counterfactual/loss', 'counterfactual/proximity_weight', 'counterfactual/validity']
    """

    name = "counterfactual"
    description = "Counterfactual contrastive regularizer."
    order = 20
    config_class = CounterfactualConfig
    fit_phase = "before_prompt"

    def __init__(self, learner: nn.Module, config: CounterfactualConfig) -> None:
        super().__init__(learner, config)
        feature_dim = learner_feature_dim(learner)
        num_classes = _num_classes(learner)
        device = module_device(learner)
        self.flow = FeatureFlow(feature_dim, num_classes, config.hidden_dim, config.depth).to(device)
        self.flow.requires_grad_(False)
        self.generator = CounterfactualGenerator.from_config(self.flow, config)
        # "auto": attribute twins when the user names the nuisance attribute (they measured best on validation,
        # docs/counterfactual.md), else the paper's class counterfactuals
        self.twin = config.twin if config.twin != "auto" else ("attribute" if config.attribute_values else "class")
        if self.twin == "attribute":
            n_values = len(config.attribute_values)
            self.__dict__["backbone"] = find_backbone(learner)  # a plain reference, never saved here
            learner_logit_scale(learner, self.name, self.__dict__["backbone"])  # refuse an unknown scale now
            # the zero-shot attribute classifier and each value's class-centred mean feature (saved with the adapter)
            self.register_buffer("attribute_text", torch.zeros(n_values, feature_dim, device=device))  # (A, d)
            self.register_buffer("attribute_offsets", torch.zeros(n_values, feature_dim, device=device))  # (A, d)
            self.register_buffer("attribute_fitted", torch.zeros((), dtype=torch.bool, device=device))
            # values zero-shot CLIP read in the training set: only they are read and targeted (A,)
            self.register_buffer("attribute_seen", torch.ones(n_values, dtype=torch.bool, device=device))
        self._warned_no_grad = False
        self.last_proximity: torch.Tensor | None = None  # (b, K) λ of the latest counterfactuals

    @property
    def fitted(self) -> bool:
        """True once the twin generator is fitted (by :meth:`fit` or loaded with an adapter): the feature
        flow (``twin="class"``) or the attribute offsets (``twin="attribute"``)."""
        if self.twin == "attribute":
            return bool(self.attribute_fitted)
        return self.flow.fitted

    # -- attribute twins ---------------------------------------------------------------------------------------
    def attribute_twins(
        self, features: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counterfactuals that change the nuisance attribute and keep everything else (``twin="attribute"``).

        Each feature's attribute ``a`` is read by the zero-shot attribute classifier; its twin moves by the
        difference of the class-centred mean features of the values, ``z' = normalize(z - o_a + o_a')``, towards
        ``targets`` (default: a uniformly drawn other value).

        Args:
            features: ``(b, d)`` factual image features.
            targets: ``(b,)`` target values (indices into ``attribute_values``), or None.

        Returns:
            ``(twins (b, d), attributes (b,), targets (b,))``.
        """
        self._check_ready()
        from ...attributes import classify_attributes

        z = F.normalize(features.detach().float(), dim=-1)  # (b, d)
        seen = self.attribute_seen.nonzero().flatten()  # the values the training set showed (>= 2)
        position, _ = classify_attributes(z, self.attribute_text[seen])  # (b,) index into ``seen``
        attributes = seen[position]
        if targets is None:
            shift = torch.randint(1, len(seen), position.shape, device=position.device)
            targets = seen[(position + shift) % len(seen)]  # uniform over the other seen values
        elif not bool(self.attribute_seen[targets].all()):
            unseen = sorted({self.config.attribute_values[int(t)] for t in targets if not self.attribute_seen[t]})
            raise ValueError(f"target attribute values {unseen} never occurred in the training set: no offset.")
        offsets = self.attribute_offsets.float()
        twins = F.normalize(z - offsets[attributes] + offsets[targets], dim=-1)
        return twins, attributes, targets

    @torch.no_grad()
    def fit_attribute_offsets(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Pseudo-label the training features' attribute (zero-shot, ``attribute_values``) and store each value's
        class-centred mean ``o_a = mean_c (mu_{c,a} - mu_c)`` over the classes that have it: the attribute's own
        part of a feature, with the class's removed (the class and the attribute are correlated in the data
        this add-on is for, so plain value means would also move the class)."""
        from ...attributes import attribute_text_features, classify_attributes

        config = self.config
        text = attribute_text_features(self.learner, config.attribute_values, config.attribute_templates)
        z = F.normalize(features.float(), dim=-1)  # (N, d)
        attributes, _ = classify_attributes(z, text)
        n_values, n_classes = len(config.attribute_values), int(labels.max()) + 1
        offsets = torch.zeros(n_values, z.shape[1])
        counts = torch.zeros(n_values)
        for c in range(n_classes):
            members = labels == c
            if not members.any():
                continue
            centre = z[members].mean(0)
            for a in range(n_values):
                cell = members & (attributes == a)
                if cell.any():
                    offsets[a] += z[cell].mean(0) - centre
                    counts[a] += 1
        missing = [config.attribute_values[a] for a in range(n_values) if counts[a] == 0]
        if n_values - len(missing) < 2:
            raise ValueError(
                f"no training image is read as {missing} by zero-shot CLIP, so there is no example of what that "
                "value looks like and fewer than two values are left to swap between; check attribute_values "
                "(e.g. 'water background' instead of 'water') and attribute_templates, or use twin='class'."
            )
        if missing:
            logger.warning(
                "counterfactual: no training image is read as %s by zero-shot CLIP; twins use the other %d "
                "attribute values only",
                missing,
                n_values - len(missing),
            )
        self.attribute_text.copy_(text.to(self.attribute_text))
        self.attribute_offsets.copy_((offsets / counts.clamp_min(1).unsqueeze(1)).to(self.attribute_offsets))
        self.attribute_seen.copy_(counts > 0)
        self.attribute_fitted.fill_(True)
        logs = {"counterfactual/num_features": float(len(z))}
        logs["counterfactual/attribute_values_seen"] = float(n_values - len(missing))
        for a, value in enumerate(config.attribute_values):
            logs[f"counterfactual/attribute_share/{value}"] = float((attributes == a).float().mean())
        return logs

    # -- counterfactuals ---------------------------------------------------------------------------------------
    def counterfactuals(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        scores: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm counterfactual features of ``features`` (no gradient).

        Args:
            features: ``(b, d)`` factual features (``learner.image_features``).
            labels: ``(b,)`` their classes.
            targets: ``(b, K)`` target classes; None: ``config.num_counterfactuals`` chosen by ``config.target``.
            scores: ``(b, n_classes)`` class scores for ``target="confusable"`` (e.g. the logits).
            text_features: the classifier that judges a flip in the minimal-change search: unit-norm class text
                features ``(n_classes, d)`` or per sample ``(b, n_classes, d)``. None: no search, the fixed
                ``λ = proximity_weight``.

        Returns:
            ``(counterfactuals (b, K, d), targets (b, K))``.
        """
        self._check_ready()
        if targets is None:
            targets = choose_targets(
                labels, self.flow.num_classes, self.config.num_counterfactuals, mode=self.config.target, scores=scores
            )
        if targets.dim() == 1:
            targets = targets.unsqueeze(1)
        batch, k = targets.shape
        flat_z = features.detach().unsqueeze(1).expand(batch, k, -1).reshape(batch * k, -1)  # (b K, d)
        flat_y = labels.unsqueeze(1).expand(batch, k).reshape(-1)  # (b K,)
        validator = None
        if text_features is not None:
            text = text_features.detach().float()
            if text.dim() == 3:  # per-sample classifiers: row i of the flat batch belongs to sample i // K
                text = text.repeat_interleave(k, dim=0)  # (b K, C, d)

                def validator(z: torch.Tensor) -> torch.Tensor:
                    return torch.einsum("nd,ncd->nc", F.normalize(z.float(), dim=-1), text)
            else:

                def validator(z: torch.Tensor) -> torch.Tensor:
                    return F.normalize(z.float(), dim=-1) @ text.t()

        out = self.generator.generate(flat_z, flat_y, targets.reshape(-1), validator=validator)
        self.last_proximity = out.proximity.reshape(batch, k)
        counterfactuals = F.normalize(out.counterfactuals.float(), dim=-1)  # back on the unit sphere
        return counterfactuals.reshape(batch, k, -1), targets

    def _check_ready(self) -> None:
        if not self.fitted:
            what = "attribute offsets are" if self.twin == "attribute" else "feature flow is"
            raise RuntimeError(
                f"the counterfactual add-on's {what} not fitted. Call model.fit_addons(train_data) before "
                "training the prompt in your own loop (prompt_robust.fit does it for you; it fits the "
                "counterfactual generator on the training image features), or load an adapter saved after that."
            )

    # -- the add-on hook ---------------------------------------------------------------------------------------
    def loss_terms(self, state: ForwardState) -> LossTerms | None:
        """``weight`` x the counterfactual contrastive loss of the batch (``"prompt"`` stage only)."""
        if state.stage != "prompt" or self.config.weight == 0:
            return None
        output = state.output
        text = output.text_features
        if text is None:
            raise ValueError(
                f"the counterfactual add-on needs the class text features of the learner's output, and "
                f"{type(self.learner).__name__} returned an output without `text_features`. Return a "
                "prompt_robust.learners.base.LearnerOutput(logits, image_features, text_features) from forward(), "
                "with text_features the L2-normalised, prompt-conditioned class features, (n_classes, d) or "
                "(batch, n_classes, d), so the regularizer's gradient reaches the prompt."
            )
        self._check_ready()
        if self.twin == "attribute":
            loss, logs = self._attribute_loss(state, text)
            return LossTerms(loss=loss, logs=logs)
        labels = state.labels
        num_classes = self.flow.num_classes
        if text.dim() not in (2, 3) or text.shape[-2] != num_classes:
            raise ValueError(
                f"text_features must be (n_classes={num_classes}, d) or (batch, {num_classes}, d) for the "
                f"{num_classes} classes the feature flow was prepared on; got {tuple(text.shape)}. The regularizer "
                "only trains on the classes it was prepared for (after set_classnames, fit it again: model.fit_addons(train, refit=True))."
            )
        if self.training and torch.is_grad_enabled() and not text.requires_grad and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"the counterfactual loss does not reach any trainable tensor: {type(self.learner).__name__}'s "
                "text_features carry no gradient (e.g. a visual-prompt learner such as VPT, whose text features "
                "are fixed). The regularizer only shapes prompts through the class text features.",
                stacklevel=2,
            )
        z = state.image_features().detach().float()  # (b, d)
        with torch.no_grad():
            counterfactuals, targets = self.counterfactuals(
                z, labels, scores=output.logits, text_features=text
            )  # (b, K, d), (b, K)
        rows = torch.arange(labels.shape[0], device=labels.device)
        true_text = (text[labels] if text.dim() == 2 else text[rows, labels]).float()  # (b, d)
        tau = self.config.temperature
        positive = (true_text * z).sum(-1, keepdim=True) / tau  # (b, 1)
        negatives = torch.einsum("bd,bkd->bk", true_text, counterfactuals) / tau  # (b, K)
        scores = torch.cat([positive, negatives], dim=1)  # (b, 1 + K)
        loss = (torch.logsumexp(scores, dim=1) - scores[:, 0]).mean()
        with torch.no_grad():
            detached = text.detach().float()
            if detached.dim() == 2:
                predicted = torch.einsum("bkd,cd->bkc", counterfactuals, detached).argmax(-1)  # (b, K)
            else:
                predicted = torch.einsum("bkd,bcd->bkc", counterfactuals, detached).argmax(-1)  # (b, K)
            logs = {
                "counterfactual/loss": float(loss.detach()),
                # the share of counterfactuals the current prompt's classifier assigns to their target class
                "counterfactual/validity": float((predicted == targets).float().mean()),
                "counterfactual/cosine": float((counterfactuals * z.unsqueeze(1)).sum(-1).mean()),
                "counterfactual/proximity_weight": float(self.last_proximity.mean()),
            }
        return LossTerms(loss=self.config.weight * loss, logs=logs)

    def _attribute_loss(self, state: ForwardState, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the attribute twins' logits with the factual labels: the prompt must keep classifying
        an image as its class when only the nuisance attribute changes."""
        labels = state.labels
        z = state.image_features().detach().float()  # (b, d)
        with torch.no_grad():
            twins, attributes, targets = self.attribute_twins(z)  # (b, d)
        text = text.float()
        if text.dim() == 2:
            logits = twins @ text.t()  # (b, C)
        else:
            logits = torch.einsum("bd,bcd->bc", twins, text)  # per-sample classifiers
        scale = learner_logit_scale(self.learner, self.name, self.__dict__["backbone"])
        logits = logits * scale
        loss = F.cross_entropy(logits, labels)
        logs = {
            "counterfactual/loss": float(loss.detach()),
            # the share of twins the current prompt still assigns to their (kept) class
            "counterfactual/kept_class": float((logits.detach().argmax(-1) == labels).float().mean()),
            "counterfactual/attribute_flipped": float((attributes != targets).float().mean()),
        }
        return self.config.weight * loss, logs

    # -- fitting -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def dataset_features(self, dataset: Any, *, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-free features ``(n, d)`` and labels ``(n,)`` of every item of ``dataset`` (items
        ``{"pixel_values", "labels"}`` or ``(pixel_values, label)`` pairs)."""
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: the counterfactual feature flow needs training images.")
        size = self.config.feature_batch_size
        loader = ordered_loader(dataset, size)
        device = self.flow.feature_mean.device
        features, labels = [], []
        was_training = self.learner.training
        self.learner.eval()
        try:
            for batch in tqdm(loader, desc="counterfactual features", disable=not progress):
                z = self.learner.image_features(batch["pixel_values"].to(device))  # (b, d)
                features.append(z.detach().float().cpu())
                labels.append(batch["labels"])
        finally:
            self.learner.train(was_training)
        return torch.cat(features), torch.cat(labels)

    def fit(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> AddonFit:
        """Fit the twin generator on the training set's frozen image features: the feature flow (cached in
        ``cache_dir``) or, for ``twin="attribute"``, the attribute offsets."""
        config = self.config
        features, labels = self.dataset_features(dataset, progress=progress)
        self.generator.clear_cache()  # the memo belongs to the flow being replaced (it would also notice the change)
        if self.twin == "attribute":
            return AddonFit(logs=self.fit_attribute_offsets(features, labels))
        result = fit_feature_flow(
            self.flow,
            features,
            labels,
            steps=config.train_steps,
            lr=config.train_lr,
            batch_size=config.train_batch_size,
            cond_dropout=config.cond_dropout,
            seed=seed,
            cache_dir=cache_dir,
            progress=progress,
        )
        self.flow.requires_grad_(False)
        logger.info(
            "counterfactual feature flow: %d features, final loss %.4f%s",
            len(features),
            result.final_loss,
            " (cached)" if result.cached else "",
        )
        return AddonFit(
            logs={
                "counterfactual/flow_loss": result.final_loss,
                "counterfactual/flow_cached": float(result.cached),
                "counterfactual/num_features": float(len(features)),
            }
        )
