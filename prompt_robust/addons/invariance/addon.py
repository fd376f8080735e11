"""The invariant-projection add-on (CLIP-ICM, "Learning Invariant Causal Mechanism from Vision-Language Models",
https://arxiv.org/abs/2405.15289).

Before the prompt is trained, :meth:`InvariantProjection.fit` encodes interventional pairs of the training
images, chooses ``λ``/``k`` on held-out training images when the config leaves them open, and fits the
projection ``P`` (the top-``k`` eigenvectors of ``ZᵀZ/n - λΔᵀΔ/m``). From then on the wrapped model predicts in
the projected space: ``logits = scale · normalize(Pᵀz) · normalize(Pᵀt)`` with the learner's own image and text
features, so the prompt is trained (and evaluated) through the projection.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.base import find_backbone
from ...layers import module_device
from ...learners.base import LearnerOutput
from ..base import AddonFit, ForwardState, RobustAddon, learner_feature_dim, learner_logit_scale, register_addon
from .config import InvarianceConfig
from .features import interventional_features
from .icm import ICMProjection
from .interventions import text_deltas, text_pairs
from .predict import zero_shot_logits
from .selection import fit_from_config

__all__ = ["InvariantProjection"]

logger = logging.getLogger(__name__)


@register_addon
class InvariantProjection(RobustAddon):
    """Predict in CLIP-ICM's invariant subspace: logits recomputed from the learner's projected features.

    Until :meth:`fit` has fitted the projection (``fitted``) the add-on changes nothing. The full eigenbasis
    ``(d, d)``, its eigenvalues, ``k``, ``λ`` and the fitted flag are persistent buffers of fixed shape
    (``d`` = the backbone's ``embed_dim``), so they are saved with the adapter and loaded into a fresh model.

    Args:
        learner: the wrapped learner; its ``forward`` must return image and text features (``LearnerOutput``) and
            it needs a ``ClipBackbone`` (or ``feature_dim``, ``logit_scale``, ``image_mean`` and ``image_std``
            attributes).
        config: :class:`prompt_robust.InvarianceConfig`.

    Example:
        >>> import prompt_robust as pr
        >>> import prompt_robust.addons.invariance  # registers the add-on
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = pr.build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
        >>> model = pr.wrap(learner, pr.RobustConfig(invariance=pr.InvarianceConfig(lam=1.0, dim=8)))
        >>> logs = model.fit_addons(train_data)  # doctest: +SKIP
        >>> model.addons["invariance"].projection.shape  # doctest: +SKIP
        torch.Size([32, 8])
    """

    name = "invariance"
    description = "Invariant causal mechanism projection."
    order = 30
    config_class = InvarianceConfig
    fit_phase = "before_prompt"

    def __init__(self, learner: nn.Module, config: InvarianceConfig) -> None:
        super().__init__(learner, config)
        backbone = find_backbone(learner)
        self.__dict__["backbone"] = backbone  # a plain reference: the backbone's weights are never saved here
        d = learner_feature_dim(learner)
        learner_logit_scale(learner, self.name, backbone)  # refuses a learner without a known scale, now
        if config.dim is not None and config.dim > d:
            raise ValueError(
                f"InvarianceConfig.dim={config.dim} exceeds the feature size {d} of this backbone; use dim <= {d} "
                "or None (chosen on held-out data)."
            )
        device = module_device(learner)
        # eigenvectors of M as columns, by DESCENDING eigenvalue; the first `kept_dim` columns are P
        self.register_buffer("basis", torch.eye(d, device=device))  # (d, d)
        self.register_buffer("eigenvalues", torch.zeros(d, dtype=torch.float64, device=device))  # (d,)
        self.register_buffer("kept_dim", torch.tensor(d, dtype=torch.long, device=device))  # k
        self.register_buffer("lam", torch.zeros((), dtype=torch.float64, device=device))  # absolute λ
        self.register_buffer("projection_fitted", torch.zeros((), dtype=torch.bool, device=device))

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """True once the projection is fitted (by :meth:`fit`, :meth:`set_projection` or loaded with an adapter)."""
        return bool(self.projection_fitted)

    @property
    def feature_dim(self) -> int:
        return self.basis.shape[0]

    @property
    def projection(self) -> torch.Tensor:
        """``P`` ``(d, k)``: the kept eigenvectors (orthonormal columns)."""
        return self.basis[:, : int(self.kept_dim)]

    def icm(self) -> ICMProjection:
        """The stored projection as an :class:`~prompt_robust.addons.invariance.ICMProjection`."""
        return ICMProjection(
            self.basis.detach().cpu(), self.eigenvalues.detach().cpu(), int(self.kept_dim), float(self.lam)
        )

    def set_projection(self, icm: ICMProjection) -> None:
        """Use ``icm`` from now on (e.g. a projection fitted by hand with ``ICMProjection.fit``)."""
        if icm.basis.shape != self.basis.shape:
            raise ValueError(
                f"the projection's basis is {tuple(icm.basis.shape)}; this add-on works on {tuple(self.basis.shape)} "
                "(the backbone's embed_dim)."
            )
        with torch.no_grad():
            self.basis.copy_(icm.basis.to(self.basis.device, self.basis.dtype))
            self.eigenvalues.copy_(icm.eigenvalues.to(self.eigenvalues.device, self.eigenvalues.dtype))
            self.kept_dim.fill_(int(icm.dim))
            self.lam.fill_(float(icm.lam))
            self.projection_fitted.fill_(True)

    def _logit_scale(self) -> torch.Tensor | float:
        return learner_logit_scale(self.learner, self.name, self.__dict__["backbone"])

    # -- add-on hook -------------------------------------------------------------------------------------------
    def projected_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``scale · normalize(Pᵀz) · normalize(Pᵀt)``.

        Args:
            image_features: ``(b, d)``.
            text_features: ``(n_cls, d)`` shared or ``(b, n_cls, d)`` per sample.

        Returns:
            ``(b, n_cls)``.
        """
        d = self.feature_dim
        if image_features.shape[-1] != d or text_features.shape[-1] != d:
            raise ValueError(
                f"the learner's features have sizes {image_features.shape[-1]} (image) and {text_features.shape[-1]} "
                f"(text); the projection was built for {d}. Was the adapter made for another backbone?"
            )
        # columns past k are zeroed instead of sliced: the same logits as basis[:, :k], with static shapes and no
        # host sync on the kept dimension
        keep = (torch.arange(d, device=self.basis.device) < self.kept_dim).to(self.basis.dtype)  # (d,)
        projection = self.basis * keep  # (d, d)
        return zero_shot_logits(image_features, text_features, projection, self._logit_scale())

    def adjust_output(self, state: ForwardState) -> LearnerOutput | None:
        """The learner's output with its logits recomputed in the invariant subspace (once fitted)."""
        if not self.fitted:
            return None
        output = state.output
        if output.image_features is None or output.text_features is None:
            raise TypeError(
                f"the invariance add-on recomputes the logits from the learner's features, but "
                f"{type(self.learner).__name__} returned an output without image_features and "
                "text_features. Return prompt_robust.learners.base.LearnerOutput(logits, image_features (b, d), "
                "text_features (n_cls, d) or (b, n_cls, d)) from forward(), or set RobustConfig.invariance=None."
            )
        return dataclasses.replace(output, logits=self.projected_logits(output.image_features, output.text_features))

    # -- fitting -----------------------------------------------------------------------------------------------
    def _classnames(self, why: str) -> list[str]:
        names = getattr(self.learner, "classnames", None)
        if not names or self.__dict__["backbone"] is None:
            raise ValueError(
                f"{why} needs the learner's class names and its ClipBackbone; {type(self.learner).__name__} has "
                f"{'no `classnames`' if not names else 'no ClipBackbone'}. Set InvarianceConfig(selection="
                "'linear_probe', text_interventions=False) or give lam and dim explicitly."
            )
        return list(names)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        backbone = self.__dict__["backbone"]
        with torch.no_grad():
            return backbone.encode_text(backbone.tokenize(texts))

    def class_text_features(self) -> torch.Tensor:
        """``(n_cls, d)`` normalised features of ``text_base_template`` for every class (selection's zero-shot)."""
        names = self._classnames("zero-shot selection of lam/dim")
        texts = [self.config.text_base_template.format(name) for name in names]
        return F.normalize(self._encode_texts(texts).float().cpu(), dim=-1)

    def text_deltas(self) -> torch.Tensor:
        """``(n_cls x n_templates, d)`` differences of the text pairs (base template vs each swapped template)."""
        names = self._classnames("text_interventions=True")
        pairs = text_pairs(names, self.config.text_base_template, self.config.text_templates)
        return text_deltas(self._encode_texts, pairs)

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        backbone = self.__dict__["backbone"]
        source = backbone if backbone is not None else self.learner
        mean, std = getattr(source, "image_mean", None), getattr(source, "image_std", None)
        if mean is None or std is None:
            raise ValueError(
                f"{type(self.learner).__name__} holds no ClipBackbone: set `image_mean` and `image_std` on it (the "
                "per-channel normalisation of its inputs) so images can be intervened on in pixel space."
            )
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def fit(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> AddonFit:
        """Encode interventional pairs of ``dataset``, choose ``λ``/``k`` if unset, fit and store the projection.

        Args:
            model: the wrapped model (unused: the learner's prompt-free features are what is projected).
            dataset: the training set the prompt will be tuned on.
            seed: seed of the random interventions and of the held-out split.
            cache_dir: where the interventional features are cached (``invariance-features-<hash>.safetensors``).
            progress: show a progress bar.

        Returns:
            Logs: ``invariance/lam`` (relative), ``invariance/lam_abs``, ``invariance/dim``, ``invariance/pairs``
            and, when chosen on held-out data, ``invariance/val_accuracy``.
        """
        config = self.config
        mean, std = self._normalisation()
        feats = interventional_features(
            self.learner,
            dataset,
            config.interventions,
            mean=mean,
            std=std,
            pairs_per_image=config.pairs_per_image,
            seed=seed,
            batch_size=config.feature_batch_size,
            cache_dir=cache_dir,
            progress=progress,
            params=config.intervention_params,
        )
        if feats.dim != self.feature_dim:
            raise ValueError(
                f"{type(self.learner).__name__}.image_features() returns size {feats.dim}; the add-on was built for "
                f"{self.feature_dim}. Set `feature_dim` on the learner to its feature size."
            )
        icm, selection = fit_from_config(
            feats,
            config,
            text_features=self.class_text_features() if config.selection == "zero_shot" else None,
            text_deltas=self.text_deltas() if config.text_interventions else None,
            seed=seed,
        )
        logs: dict[str, float] = {}
        if selection is not None:
            logs["invariance/val_accuracy"] = selection.score
        self.set_projection(icm)
        logs.update(
            {
                "invariance/lam": float(icm.lam_relative),
                "invariance/lam_abs": icm.lam,
                "invariance/dim": float(icm.dim),
                "invariance/pairs": float(feats.intervened.shape[0] * feats.intervened.shape[1]),
            }
        )
        logger.info("CLIP-ICM projection fitted: %s", logs)
        return AddonFit(logs=logs)

    def extra_repr(self) -> str:
        return f"d={self.feature_dim}, dim={int(self.kept_dim)}, fitted={self.fitted}"
