"""The debiasing add-on: per-sample loss weights from (pseudo-)groups ("Debiased Prompt Tuning in Vision-Language
Model without Annotations", https://arxiv.org/abs/2503.08368), plus the baselines it is compared with.

``DebiasConfig.mode``:

* ``"pseudo"`` (DPT, annotation-free): ``prepare`` pseudo-labels the training set with zero-shot CLIP prompts
  naming the attribute's values, counts the groups g = (class y, pseudo-attribute a) and initialises each group's
  mean true-class probability ``p̄_g`` with the untrained prompt's predictions. In training every batch updates
  ``p̄_g ← ema·p̄_g + (1 − ema)·mean_{i∈g} softmax(logits_i)[y_i]`` and sample ``i`` weighs
  ``w_{g(i)} ∝ (1/N_g)·exp[η(1 − p̄_g)]`` (mean 1 over the training samples).
* ``"oracle"``: true groups (batch key ``groups_key``), ``w_g ∝ 1/N_g``.
* ``"groupdro"``: true groups, online group DRO (https://arxiv.org/abs/1911.08731).
* ``"jtt"``: Just Train Twice (https://arxiv.org/abs/2107.09044): the error set of an ERM run (see
  :func:`~prompt_robust.addons.debias.jtt_error_set`) weighs ``jtt_upweight``, every other example 1.

The weights never carry gradients. The add-on changes nothing at prediction time and saves no tensor with the
adapter (its state is training bookkeeping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...attributes import attribute_text_features, classify_attributes, pseudo_label_accuracy
from ...data.items import iterate_batches
from ...layers import module_device
from ..base import AddonFit, ForwardState, LossTerms, RobustAddon, register_addon
from ._data import INDEX_KEY, column
from .config import DebiasConfig
from .weights import balanced_group_weights, dpt_group_weights, ema_update, group_means, groupdro_update

__all__ = ["DebiasReweighting"]

logger = logging.getLogger(__name__)

_GROUP_SOURCES = (
    "prompt_robust.data.load_waterbirds (group = bird * 2 + place), prompt_robust.data.load_celeba (group = label "
    "* 2 + spurious attribute) and the embedded world's WorldTasks.spurious_train / spurious_test (group = class * "
    "2 + background) provide it"
)


def _true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    probs = logits.detach().float().softmax(dim=-1)  # (b, n_cls)
    return probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # (b,)


@register_addon
class DebiasReweighting(RobustAddon):
    """Group reweighting of the prompt-tuning loss: annotation-free DPT and the oracle, group DRO and JTT
    baselines, chosen by :attr:`DebiasConfig.mode`.

    Call ``model.fit_addons(train)`` before training: it computes the group sizes (and, in mode ``"pseudo"``,
    the pseudo-labels; ``prompt_robust.fit`` does it for you). During training :meth:`batch_weights` gives the
    batch's per-sample loss weights, and
    the wrapped model's loss is ``Σ w_i·ce_i / Σ w_i``.

    Paper: https://arxiv.org/abs/2503.08368

    Args:
        learner: the wrapped learner (its frozen CLIP pseudo-labels images in mode ``"pseudo"``).
        config: :class:`prompt_robust.DebiasConfig`.

    Example:
        >>> import prompt_robust as pr, prompt_robust.addons.debias
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = pr.build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
        >>> config = pr.DebiasConfig(attribute_values=["grass", "water"])
        >>> model = pr.wrap(learner, pr.RobustConfig(debias=config))
        >>> train = [(torch.randn(3, 32, 32), i % 2) for i in range(8)]
        >>> logs = model.fit_addons(train, progress=False)
        >>> out = model(torch.stack([x for x, _ in train]), labels=torch.tensor([y for _, y in train]))
        >>> model.addons["debias"].num_groups, out.loss.dim()  # groups (class, pseudo-attribute); a scalar loss
        (4, 0)
    """

    name = "debias"
    description = "Annotation-free debiasing with group reweighting."
    order = 40
    config_class = DebiasConfig
    fit_phase = "before_prompt"

    def __init__(self, learner: nn.Module, config: DebiasConfig) -> None:
        super().__init__(learner, config)
        # training bookkeeping only: small CPU tensors (float64 group statistics work on every device, and
        # nothing is written into an adapter)
        self.group_counts = torch.zeros(0, dtype=torch.long)  # (G,) training samples per group
        self.mean_true_prob = torch.zeros(0, dtype=torch.float64)  # (G,) EMA of the true-class probability
        self.group_q = torch.zeros(0, dtype=torch.float64)  # (G,) group DRO's group distribution
        self.pseudo_labels = torch.zeros(0, dtype=torch.long)  # (n,) pseudo-attribute of each training example
        self.upweighted = torch.zeros(0, dtype=torch.bool)  # (n,) JTT's error set as a mask
        self.group_names: list[str] = []
        self._fitted = False
        self.updates = 0
        self._attribute_text: torch.Tensor | None = None  # (A, d), the zero-shot attribute classifier
        self._error_set: torch.Tensor | None = None

    # -- public helpers ------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def num_groups(self) -> int:
        return int(self.group_counts.numel())

    def set_error_set(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Give mode ``"jtt"`` the error set of the ERM identification run (positions in the training set, e.g.
        from :func:`~prompt_robust.addons.debias.jtt_error_set`); call before ``model.fit_addons(train)``.

        Args:
            indices: positions of the misclassified training examples.
        """
        if self.mode != "jtt":
            raise ValueError(f"set_error_set is for DebiasConfig(mode='jtt'); this add-on runs mode {self.mode!r}.")
        error_set = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices).long()
        if error_set.dim() != 1 or (error_set.numel() and int(error_set.min()) < 0):
            raise ValueError(f"the error set must be a 1-D list of non-negative positions; got {indices!r}.")
        self._error_set = error_set.unique()
        self._fitted = False

    def group_weights(self) -> dict[str, float]:
        """Current weight of every non-empty group, by name (modes ``"pseudo"``, ``"oracle"``; ``"groupdro"``:
        the group distribution ``q``)."""
        self._require_fitted()
        weights = self._current_group_weights()
        if weights is None:
            return {}
        return {
            name: float(w)
            for name, w, n in zip(self.group_names, weights.tolist(), self.group_counts.tolist(), strict=True)
            if n > 0
        }

    # -- fit -----------------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` has seen the training set's groups. Training bookkeeping only: an adapter holds
        nothing of this add-on (it changes the loss, not the predictions), and a resumed training run fits it
        again (deterministically) before its running statistics are restored from the checkpoint."""
        return self._fitted

    def fit(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> AddonFit:
        """Group sizes of the training set (and its pseudo-labels in mode ``"pseudo"``).

        Args:
            model: the wrapped model (mode ``"pseudo"`` reads its initial predictions).
            dataset: the training set the prompt will be tuned on.
            seed: unused (everything here is deterministic).
            cache_dir: unused (one pass over the training set; nothing is cached on disk).
            progress: show a progress bar.
        """
        if len(dataset) == 0:
            raise ValueError("the training set is empty; the debias add-on needs its groups.")
        self.updates = 0
        if self.mode == "pseudo":
            logs = self._prepare_pseudo(model, dataset, progress)
        elif self.mode in ("oracle", "groupdro"):
            logs = self._prepare_true_groups(dataset)
        else:
            logs = self._prepare_jtt(dataset)
        self._fitted = True
        weights = self.group_weights()
        if weights:
            kind = "group distribution q" if self.mode == "groupdro" else "group weights"
            logger.info(
                "debias (%s) initial %s: %s",
                self.mode,
                kind,
                ", ".join(
                    f"{name} (n={n}) {w:.3f}"
                    for (name, w), n in zip(weights.items(), self._nonempty_counts(), strict=True)
                ),
            )
            logs.update({f"debias/w/{name}": w for name, w in weights.items()})
        return AddonFit(logs=logs)

    def _nonempty_counts(self) -> list[int]:
        return [n for n in self.group_counts.tolist() if n > 0]

    def _num_classes(self, labels: torch.Tensor) -> int:
        classnames = getattr(self.learner, "classnames", None) or []
        return max(len(classnames), int(labels.max()) + 1)

    def _class_name(self, c: int) -> str:
        classnames = getattr(self.learner, "classnames", None) or []
        return str(classnames[c]) if c < len(classnames) else f"class {c}"

    @torch.no_grad()
    def _prepare_pseudo(self, model: nn.Module, dataset: Any, progress: bool) -> dict[str, float]:
        values = [v.strip() for v in self.config.attribute_values]
        n_values = len(values)
        device = module_device(self.learner)
        self._attribute_text = attribute_text_features(self.learner, values, self.config.templates)  # (A, d)
        labels, attributes, p_true = [], [], []
        was_training = model.training
        model.eval()
        try:
            # only pixel_values and labels are read: no true attribute or group enters the pseudo-labels
            keys = ["pixel_values", "labels"]
            for _, batch in iterate_batches(
                dataset, self.config.batch_size, keys, desc="debias pseudo-labels", progress=progress
            ):
                x = batch["pixel_values"].to(device)
                y = torch.as_tensor(batch["labels"]).long()
                p_true.append(_true_class_prob(model(x).logits, y.to(device)).cpu())  # (b,)
                a, _ = classify_attributes(self.learner.image_features(x), self._attribute_text)
                attributes.append(a.cpu())
                labels.append(y)
        finally:
            model.train(was_training)
        y, a, p = torch.cat(labels), torch.cat(attributes), torch.cat(p_true)  # (n,) each
        n_classes = self._num_classes(y)
        n_groups = n_classes * n_values
        groups = y * n_values + a  # (n,)
        counts = torch.bincount(groups, minlength=n_groups)
        means, present = group_means(p, groups, n_groups)
        # groups without a training sample start at the overall mean (they have no weight mass anyway)
        self.mean_true_prob = torch.where(present, means, p.double().mean())
        self.group_counts = counts
        self.pseudo_labels = a
        self.group_names = [f"{self._class_name(c)} | {v}" for c in range(n_classes) for v in values]
        fractions = torch.bincount(a, minlength=n_values).double() / len(a)
        logs = {f"debias/pseudo_fraction/{v}": float(f) for v, f in zip(values, fractions, strict=True)}
        empty = [v for v, f in zip(values, fractions.tolist(), strict=True) if f == 0]
        if empty:
            logger.warning(
                "no training image was pseudo-labelled %s: the attribute words may not describe these images. Check "
                "DebiasConfig.attribute_values (%s) and templates.",
                ", ".join(map(repr, empty)),
                values,
            )
        true = getattr(dataset, "attributes", None)
        if true is not None and not callable(true) and len(true) == len(a):
            # reporting only (e.g. Waterbirds' place, CelebA's spurious attribute); never used for the weights
            acc = pseudo_label_accuracy(a, true)
            logs["debias/pseudo_label_accuracy"] = acc
            logger.info("debias pseudo-label accuracy against the dataset's attribute: %.3f", acc)
        return logs

    def _prepare_true_groups(self, dataset: Any) -> dict[str, float]:
        key = self.config.groups_key
        try:
            groups = column(dataset, key)
        except KeyError:
            raise ValueError(
                f"mode {self.mode!r} reweights the true groups, read from the item key {key!r}, which the training "
                f"set's items lack. {_GROUP_SOURCES}. Without group labels use mode='pseudo' (annotation-free) or "
                "'jtt'."
            ) from None
        if int(groups.min()) < 0:
            raise ValueError(f"group ids must be >= 0; the training set has {int(groups.min())}.")
        names = getattr(dataset, "group_names", None)
        n_groups = max(int(groups.max()) + 1, len(names) if isinstance(names, (list, tuple)) else 0)
        self.group_counts = torch.bincount(groups, minlength=n_groups)
        if isinstance(names, (list, tuple)) and len(names) == n_groups:
            self.group_names = [str(name) for name in names]
        else:
            self.group_names = [f"group {g}" for g in range(n_groups)]
        nonempty = (self.group_counts > 0).double()
        self.group_q = nonempty / nonempty.sum()  # group DRO starts uniform over the training groups
        return {
            f"debias/group_size/{name}": float(n)
            for name, n in zip(self.group_names, self.group_counts.tolist(), strict=True)
        }

    def _prepare_jtt(self, dataset: Any) -> dict[str, float]:
        if self._error_set is None:
            raise ValueError(
                "mode 'jtt' upweights the error set of an ERM identification run, and none was given. Train ERM "
                "first, then: errors = prompt_robust.addons.debias.jtt_error_set(erm_model, train); "
                "model.addons['debias'].set_error_set(errors); model.fit_addons(train); and train on "
                "prompt_robust.addons.debias.with_index(train). See docs/debias.md."
            )
        n = len(dataset)
        if self._error_set.numel() and int(self._error_set.max()) >= n:
            raise ValueError(
                f"the error set holds position {int(self._error_set.max())}, but the training set has {n} examples; "
                "compute it with jtt_error_set(erm_model, train) on the same training set."
            )
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self._error_set] = True
        self.upweighted = mask
        self.group_counts = torch.zeros(0, dtype=torch.long)
        self.group_names = []
        logger.info(
            "debias (jtt): %d of %d training examples upweighted by %g", int(mask.sum()), n, self.config.jtt_upweight
        )
        return {"debias/jtt_error_fraction": float(mask.double().mean())}

    # -- training state (checkpoints) ---------------------------------------------------------------------------
    _RUNNING = ("mean_true_prob", "group_q")

    def training_state(self) -> dict[str, torch.Tensor]:
        """The running group statistics (EMA of ``p̄``, GroupDRO's ``q``) and the update count; everything else is
        recomputed identically by :meth:`fit`."""
        if not self._fitted:
            return {}
        state = {name: getattr(self, name) for name in self._RUNNING}
        return {**state, "updates": torch.tensor(self.updates, dtype=torch.long)}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            return
        self._require_fitted()
        expected = {*self._RUNNING, "updates"}
        if set(state) != expected:
            raise ValueError(f"debias training state must hold {sorted(expected)}; got {sorted(state)}.")
        for name in self._RUNNING:
            current = getattr(self, name)
            if tuple(state[name].shape) != tuple(current.shape):
                raise ValueError(
                    f"debias training state {name!r} has shape {tuple(state[name].shape)}, but fit() on this "
                    f"training set gives {tuple(current.shape)}: the checkpoint was written for another training set "
                    "or attribute_values."
                )
            setattr(self, name, state[name].to(current.dtype).clone())
        self.updates = int(state["updates"])

    # -- weights -------------------------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(
                f"the debias add-on (mode {self.mode!r}) has not seen the training set: call "
                "model.fit_addons(train) before training (prompt_robust's bench, CLI and RobustCallback do)."
            )

    def _current_group_weights(self) -> torch.Tensor | None:
        if self.mode == "pseudo":
            return dpt_group_weights(self.group_counts, self.mean_true_prob, self.config.eta)
        if self.mode == "oracle":
            return balanced_group_weights(self.group_counts)
        if self.mode == "groupdro":
            return self.group_q
        return None

    def _index(self, batch: Mapping[str, Any], size: int) -> torch.Tensor:
        index = torch.as_tensor(batch[INDEX_KEY]).long().cpu()  # (b,)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise ValueError(
                f"batch {INDEX_KEY!r} values reach {int(index.max())}, but fit() saw a training set of {size} "
                "examples; call model.fit_addons(train) on the same training set you train on."
            )
        return index

    def _pseudo_attributes(
        self, batch: Mapping[str, Any], features: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The batch's pseudo-attributes ``(b,)``: looked up by index when items carry one, else recomputed from
        the images with the cached zero-shot attribute classifier (works with any loader and with augmentation;
        free for learners whose forward already computed the prompt-free image features)."""
        if INDEX_KEY in batch and self.pseudo_labels.numel():
            return self.pseudo_labels[self._index(batch, self.pseudo_labels.numel())]
        z = features() if features is not None else self.learner.image_features(batch["pixel_values"])  # (b, d)
        return classify_attributes(z, self._attribute_text.to(z.device))[0].cpu()

    def _groups(
        self, batch: Mapping[str, Any], labels: torch.Tensor, features: Callable[[], torch.Tensor] | None
    ) -> torch.Tensor:
        if self.mode == "pseudo":
            n_values = len(self.config.attribute_values)
            groups = labels * n_values + self._pseudo_attributes(batch, features)  # (b,)
        else:
            key = self.config.groups_key
            if key not in batch:
                raise ValueError(
                    f"mode {self.mode!r} needs the true group of every sample in the batch key {key!r}; got keys "
                    f"{sorted(batch)}. {_GROUP_SOURCES}. (transformers' Trainer drops unknown columns: set "
                    "remove_unused_columns=False.) Without group labels use mode='pseudo' or 'jtt'."
                )
            groups = torch.as_tensor(batch[key]).long().cpu()  # (b,)
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(
                f"group id {int(groups.max())} is out of range: the training set seen by fit() has "
                f"{self.num_groups} groups ({'class x pseudo-attribute' if self.mode == 'pseudo' else 'true groups'}). "
                "Call model.fit_addons(train) on the training set you train on."
            )
        return groups

    def _group_logs(self, group_weights: torch.Tensor, train: bool) -> dict[str, float]:
        names = [n for n, c in zip(self.group_names, self.group_counts.tolist(), strict=True) if c > 0]
        kept = group_weights[self.group_counts > 0].tolist()
        prefix = "debias/q/" if self.mode == "groupdro" else "debias/w/"
        every = self.config.log_every
        if train and every and self.updates % every == 0:
            logger.info(
                "debias (%s) step %d %s: %s",
                self.mode,
                self.updates,
                "q" if self.mode == "groupdro" else "group weights",
                ", ".join(f"{name} {w:.3f}" for name, w in zip(names, kept, strict=True)),
            )
        return {prefix + name: float(w) for name, w in zip(names, kept, strict=True)}

    def loss_terms(self, state: ForwardState) -> LossTerms:
        """The batch's per-sample weights and the current group weights as logs (``debias/w/<group>``,
        ``debias/q/<group>``)."""
        weights, logs = self.batch_weights(
            state.batch, state.output.logits, train=state.training, features=state.image_features
        )
        return LossTerms(weights=weights, logs=logs)

    @torch.no_grad()
    def batch_weights(
        self,
        batch: Mapping[str, Any],
        logits: torch.Tensor,
        *,
        train: bool = True,
        features: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample loss weights ``(b,)`` of the batch (no gradient) and logs; with ``train`` also updates the
        group statistics (mode ``"pseudo"``: the EMA of ``p̄``; ``"groupdro"``: ``q``).

        Args:
            batch: ``pixel_values``, ``labels`` and the extra item keys (``index``, ``groups``) of the batch.
            logits: ``(b, n_cls)`` the model's logits for the batch.
            train: update the running statistics (a training step).
            features: the batch's ``learner.image_features`` when already computed (mode ``"pseudo"`` without
                an ``index`` key reads their attribute).
        """
        self._require_fitted()
        logits = logits.detach()  # (b, n_cls)
        cpu = torch.device("cpu")
        labels = torch.as_tensor(batch["labels"]).long().cpu()  # (b,)
        if train:
            self.updates += 1
        if self.mode == "jtt":
            if INDEX_KEY not in batch:
                raise ValueError(
                    f"mode 'jtt' weights examples by their position in the training set and needs the batch key "
                    f"{INDEX_KEY!r}; got keys {sorted(batch)}. Train on prompt_robust.addons.debias.with_index(train)."
                )
            upweighted = self.upweighted[self._index(batch, self.upweighted.numel())]  # (b,)
            logs = {"debias/upweighted_fraction": float(upweighted.double().mean())}
            weights = torch.where(upweighted, float(self.config.jtt_upweight), 1.0)
            return weights.to(logits.device, logits.dtype), logs

        groups = self._groups(batch, labels, features)  # (b,) on CPU
        n_groups = self.num_groups
        if self.mode == "pseudo":
            if train:
                p_true = _true_class_prob(logits, labels.to(logits.device)).to(cpu)  # (b,)
                means, present = group_means(p_true, groups, n_groups)
                self.mean_true_prob = ema_update(self.mean_true_prob, means, present, self.config.ema)
            group_weights = dpt_group_weights(self.group_counts, self.mean_true_prob, self.config.eta)  # (G,)
            weights = group_weights[groups]  # (b,)
        elif self.mode == "oracle":
            group_weights = balanced_group_weights(self.group_counts)
            weights = group_weights[groups]
        else:  # groupdro
            losses = F.cross_entropy(logits.detach().float(), labels.to(logits.device), reduction="none").to(cpu)
            group_losses, present = group_means(losses, groups, n_groups)
            if train:
                self.group_q = groupdro_update(self.group_q, group_losses, present, self.config.groupdro_step)
            group_weights = self.group_q
            # Σ_i w_i ce_i / Σ_i w_i = Σ_{g in batch} q_g L_g / Σ_{g in batch} q_g  (scaled to mean 1 per batch)
            in_batch = torch.bincount(groups, minlength=n_groups)  # (G,)
            weights = group_weights[groups] / in_batch[groups]
            weights = weights * len(weights) / weights.sum()
        return weights.to(logits.device, logits.dtype), self._group_logs(group_weights, train)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, groups={self.num_groups}, fitted={self._fitted}"
