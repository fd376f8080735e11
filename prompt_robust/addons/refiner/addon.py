"""The refiner add-on: per-sample prompts sampled from noise, conditioned on the image ("Prompt Diffusion
Robustifies Any-Modality Prompt Learning", https://arxiv.org/abs/2410.20164).

Stages, in order (see ``docs/refiner.md``):

1. the learner's prompt is trained as usual (the wrapped model's ``"prompt"`` stage);
2. :meth:`PromptRefiner.build_targets`: every training sample's overfitted prompt (cached);
3. ``"refiner"`` stage: flow matching of the velocity network from noise to the (normalised) offsets of the
   overfitted prompts from the learned one;
4. optional ``"refiner_joint"`` stage: the task loss through the sampled prompts (plus flow matching).

At prediction the prompt of image ``x`` is ``p + sigma * x_1``, ``x_1`` the ODE solution from the noise ``x_0``,
``p`` the learner's (live) prompt and ``sigma`` the RMS of the training offsets, per site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...flows import ODESampler, flow_matching_loss
from ..base import AddonFit, ForwardState, LossTerms, RobustAddon, StagePlan, learner_feature_dim, register_addon
from .config import RefinerConfig
from .network import PromptFlowNet
from .targets import COND_KEY, DELTA_PREFIX, RefinerTargets, build_targets

__all__ = ["PromptRefiner"]

logger = logging.getLogger(__name__)


@register_addon
class PromptRefiner(RobustAddon):
    """Prompt-space diffusion refiner for any learner of the contract (textual, visual or multimodal sites).

    Until its generator has been trained the refiner changes nothing (the wrapped model equals the learner).

    Args:
        learner: the wrapped learner; every site of ``prompt_tokens()`` is refined.
        config: :class:`prompt_robust.RefinerConfig`.

    Example:
        >>> import prompt_robust as pr
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = pr.build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
        >>> model = pr.wrap(learner, pr.RobustConfig(refiner=pr.RefinerConfig(train_steps=2, inner_steps=1)))
        >>> model.stages()
        ['prompt', 'refiner', 'refiner_joint']
    """

    name = "refiner"
    description = "Prompt-space diffusion refiner."
    order = 10
    config_class = RefinerConfig
    stages = ("refiner", "refiner_joint")
    fit_phase = "after_prompt"

    def __init__(self, learner: nn.Module, config: RefinerConfig) -> None:
        super().__init__(learner, config)
        tokens = learner.prompt_tokens()
        if not tokens:
            raise ValueError(
                f"{type(learner).__name__} has no learned prompt (prompt_tokens() is empty), so there is nothing to "
                "refine; use a prompt learner such as coop, cocoop, vpt or maple."
            )
        for site, value in tokens.items():
            if value.dim() != 2:
                raise ValueError(f"prompt_tokens()[{site!r}] must be (n_tokens, dim); got {tuple(value.shape)}.")
        self.sites = {site: (int(v.shape[0]), int(v.shape[1])) for site, v in tokens.items()}
        device = next(iter(tokens.values())).device
        self.net = PromptFlowNet(
            self.sites, learner_feature_dim(learner), config.hidden_dim, config.layers, config.heads
        ).to(device)
        self.sampler = ODESampler(config.num_steps, config.method)
        # how many generator steps were taken (0: untrained, the refiner is off); saved with the adapter
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long, device=device))
        for site in self.sites:
            self.register_buffer(self._scale_name(site), torch.ones((), device=device))
        self._noise_cache: dict[tuple, torch.Tensor] = {}

    # -- state -------------------------------------------------------------------------------------------------
    @staticmethod
    def _scale_name(site: str) -> str:
        return "scale_" + "".join(ch if ch.isalnum() else "_" for ch in site)

    def scale(self, site: str) -> torch.Tensor:
        return getattr(self, self._scale_name(site))

    def training_state(self) -> dict[str, torch.Tensor]:
        # the step counter is a buffer, not a trained tensor: a resumed stage must continue counting from it
        return {"trained_steps": self.trained_steps}

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - {"trained_steps"})
        if unknown:
            raise ValueError(
                f"the 'refiner' add-on's training state is {{'trained_steps'}}, but the checkpoint holds {unknown}; "
                "it was written by a model with other add-ons."
            )
        if "trained_steps" in state:
            self.trained_steps.copy_(state["trained_steps"])

    @property
    def fitted(self) -> bool:
        """True once the generator has been trained (then it replaces the learner's prompt)."""
        return int(self.trained_steps) > 0

    def set_sampler(self, num_steps: int | None = None, method: str | None = None) -> None:
        """Change the test-time sampler (e.g. for a steps sweep) without retraining."""
        self.sampler = ODESampler(num_steps or self.sampler.num_steps, method or self.sampler.method)

    # -- packing sites into one state vector ------------------------------------------------------------------
    def _pack(self, prompts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([prompts[site].reshape(prompts[site].shape[0], -1) for site in self.sites], dim=1)

    def _unpack(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for site, (n, w) in self.sites.items():
            out[site] = state[:, start : start + n * w].reshape(-1, n, w)
            start += n * w
        return out

    @property
    def state_size(self) -> int:
        return sum(n * w for n, w in self.sites.values())

    # -- sampling ----------------------------------------------------------------------------------------------
    def _noise(self, batch: int, samples: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(samples * batch, D)`` starting noise: fixed per sample index when seeded, so a prompt depends on its
        image only (not on the batch it came in); fresh otherwise (always fresh in training)."""
        scale = self.config.noise_scale
        if self.training or self.config.noise_seed is None:
            return scale * torch.randn(samples * batch, self.state_size, device=device, dtype=dtype)
        key = (int(self.config.noise_seed), samples, str(device), dtype)
        if key not in self._noise_cache:
            generator = torch.Generator().manual_seed(int(self.config.noise_seed))
            self._noise_cache[key] = torch.randn(samples, self.state_size, generator=generator).to(device, dtype)
        fixed = scale * self._noise_cache[key]  # (K, D)
        return fixed.unsqueeze(1).expand(samples, batch, -1).reshape(samples * batch, -1)

    def sample_offsets(self, cond: torch.Tensor, num_samples: int | None = None) -> dict[str, torch.Tensor]:
        """Normalised prompt offsets ``{site: (b, n, w)}`` for conditioning features ``cond`` ``(b, d)``,
        averaged over ``num_samples`` draws."""
        samples = 1 if self.training else int(num_samples or self.config.num_samples)
        batch = cond.shape[0]
        dtype = self.net.position.dtype
        x0 = self._noise(batch, samples, cond.device, dtype)  # (K*b, D)
        cond_rep = cond.to(dtype).repeat(samples, 1)  # (K*b, d)

        def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self._pack(self.net(self._unpack(x), t, cond_rep))

        x1 = self.sampler.sample(velocity, x0).sample  # (K*b, D)
        return self._unpack(x1.reshape(samples, batch, -1).mean(0))

    def refined_prompts(
        self, pixel_values: torch.Tensor, num_samples: int | None = None, *, cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample prompts ``{site: (b, n_tokens, dim)}`` for these images (the learner's prompt plus the
        sampled offset); ``cond``: their ``learner.image_features`` when already computed."""
        if not self.fitted:
            raise RuntimeError("the refiner is untrained; train it with model.fit_addons(train_data) first.")
        cond = self.learner.image_features(pixel_values) if cond is None else cond  # (b, d)
        offsets = self.sample_offsets(cond, num_samples)
        base = self.learner.prompt_tokens()
        return {
            site: base[site].unsqueeze(0) + (self.scale(site) * offsets[site]).to(base[site].dtype)
            for site in self.sites
        }

    # -- add-on hooks ------------------------------------------------------------------------------------------
    def prompt_override(self, state: ForwardState) -> dict[str, torch.Tensor] | None:
        if not self.fitted or state.stage == "refiner":
            return None
        return self.refined_prompts(state.pixel_values, cond=state.image_features())

    def flow_matching_loss(self, cond: torch.Tensor, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Conditional flow matching (:func:`prompt_robust.flows.flow_matching_loss`) on the straight path
        ``x_t = (1 - t) x_0 + t x_1`` from noise ``x_0`` to the normalised offset ``x_1``: the network regresses
        the constant velocity ``x_1 - x_0``."""
        dtype = self.net.position.dtype
        x1 = self._pack({site: deltas[site].to(dtype) / self.scale(site) for site in self.sites})  # (b, D)
        cond = cond.to(dtype)

        def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._pack(self.net(self._unpack(xt), t, cond))  # (b, D)

        return flow_matching_loss(velocity, x1)

    def _batch_targets(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        keys = [DELTA_PREFIX + site for site in self.sites]
        if not all(key in batch for key in keys):
            return None
        return {site: batch[DELTA_PREFIX + site] for site in self.sites}

    def _cond(self, state: ForwardState) -> torch.Tensor:
        cond = state.batch.get(COND_KEY)  # cached with the targets
        return state.image_features() if cond is None else cond

    def stage_loss(self, state: ForwardState) -> tuple[torch.Tensor, dict[str, float]] | None:
        if state.stage != "refiner":
            return None
        batch = state.batch
        deltas = self._batch_targets(batch)
        if deltas is None:
            raise ValueError(
                "the 'refiner' stage trains on overfitted-prompt targets, and this batch has none (keys "
                f"{sorted(batch)}). Build them with model.addons['refiner'].build_targets(train_data) and train on "
                "the returned dataset, or call model.fit_addons(train_data)."
            )
        loss = self.flow_matching_loss(self._cond(state), deltas)
        if state.training and torch.is_grad_enabled():
            self.trained_steps += 1
        return loss, {"refiner/fm_loss": float(loss.detach())}

    def loss_terms(self, state: ForwardState) -> LossTerms | None:
        """In the joint stage: ``fm_weight`` x the flow-matching loss of the batch's targets."""
        if state.stage != "refiner_joint" or not self.config.fm_weight:
            return None
        deltas = self._batch_targets(state.batch)
        if deltas is None:
            return None
        loss = self.flow_matching_loss(self._cond(state), deltas)
        return LossTerms(loss=self.config.fm_weight * loss, logs={"refiner/fm_loss": float(loss.detach())})

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        return list(self.net.parameters()) if stage in self.stages else []

    def trains_learner(self, stage: str) -> bool:
        return stage == "refiner_joint" and self.config.joint_train_prompt

    # -- training ----------------------------------------------------------------------------------------------
    def build_targets(
        self, dataset: Any, *, cache_dir: str | Path | None = None, progress: bool = True, seed: int = 0
    ) -> RefinerTargets:
        """Target prompts of every training sample by ``config.targets`` (see
        :func:`prompt_robust.addons.refiner.build_targets`; ``seed`` seeds the groups of ``"group"`` and the views of
        ``"entropy"``); also sets the per-site normalisation ``sigma`` from their offsets."""
        targets = build_targets(
            self.learner,
            dataset,
            steps=self.config.inner_steps,
            lr=self.config.inner_lr,
            batch_size=self.config.target_batch_size,
            cache_dir=cache_dir,
            progress=progress,
            rule=self.config.targets,
            n_groups=self.config.num_groups,
            seed=seed,
            views=self.config.entropy_views,
            keep=self.config.entropy_keep,
        )
        with torch.no_grad():
            for site, delta in targets.deltas.items():
                rms = delta.float().pow(2).mean().sqrt()
                if not torch.isfinite(rms) or rms <= 1e-10:
                    raise FloatingPointError(
                        f"the overfitted prompts of site {site!r} do not move (offset RMS {float(rms)}); check "
                        "inner_lr and that the learner's loss depends on its prompt."
                    )
                self.scale(site).fill_(float(rms))
        logger.info("refiner targets: %s", targets.summary())
        return targets

    def fit(
        self,
        model: nn.Module,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> AddonFit:
        """Build the targets on the tuned prompt (cached), then plan the ``"refiner"`` (and ``"refiner_joint"``)
        stages on them for the model to run."""
        config = self.config
        targets = self.build_targets(dataset, cache_dir=cache_dir, progress=progress, seed=seed)
        logs = {f"refiner/targets_{k}": v for k, v in targets.summary().items()}
        batch = min(config.train_batch_size, len(targets))
        plans = [
            StagePlan(stage, targets, steps, lr, batch, optimizer="adamw", warmup_steps=min(50, steps // 10))
            for stage, steps, lr in (
                ("refiner", config.train_steps, config.train_lr),
                ("refiner_joint", config.joint_steps, config.joint_lr),
            )
            if steps > 0
        ]
        return AddonFit(stages=plans, logs=logs)
