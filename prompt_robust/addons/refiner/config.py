"""RefinerConfig: the settings of the prompt-space diffusion refiner (``RobustConfig(refiner=...)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigMixin, _check, _positive, help_field, unknown_name_error

__all__ = ["RefinerConfig"]


@dataclass
class RefinerConfig(ConfigMixin):
    """Prompt-space diffusion refiner ("Prompt Diffusion Robustifies Any-Modality Prompt Learning",
    https://arxiv.org/abs/2410.20164): per-sample prompts sampled from noise, conditioned on the image.

    Sampling: ``num_steps`` fixed-grid steps of ``method``; ``noise_seed`` fixes the starting noise (the same
    for every image, so a prompt depends on its image only); ``num_samples`` prompts are averaged.
    Targets (``targets``): ``inner_steps`` normalised gradient steps, each of length ``inner_lr`` times the RMS of
    the learned prompt, of one prompt per training sample on its own loss (``"overfit"``, the paper's) or of one
    prompt per label-free group of training images (``"group"``, ``num_groups`` k-means groups of the image
    features minus their class mean) or of one prompt per training sample on the marginal entropy of its
    ``entropy_keep`` most confident of ``entropy_views`` augmented views (``"entropy"``, test-time prompt tuning's
    label-free rule, which means the same on a test image). Generator training: ``train_steps`` of flow matching,
    then optionally ``joint_steps`` with the task loss through the sampler (plus ``fm_weight`` x flow matching).
    """

    num_steps: int = help_field(5, "ODE steps of the sampler at test time.")
    method: str = help_field("euler", "Fixed-grid ODE solver: euler, midpoint or rk4.")
    num_samples: int = help_field(1, "Prompts sampled per image and averaged (K).")
    noise_seed: int | None = help_field(0, "Fixed noise seed for deterministic sampling (None: fresh noise).")
    noise_scale: float = help_field(
        1.0, "Std of the starting noise when sampling (0: one deterministic prompt per image, from the origin)."
    )
    hidden_dim: int = help_field(128, "Width of the velocity network.")
    layers: int = help_field(2, "Transformer blocks of the velocity network.")
    heads: int = help_field(4, "Attention heads of the velocity network.")
    targets: str = help_field(
        "overfit",
        "How a training sample's target prompt is made: overfit (its own prompt, steps on its own loss: the "
        "paper's), group (one prompt per label-free group of similar-looking training images) or entropy (its own "
        "prompt, steps on the marginal entropy of its augmented views, without its label, as test-time prompt tuning).",
    )
    num_groups: int = help_field(4, "Groups of training images of targets='group' (k-means, seeded).")
    entropy_views: int = help_field(64, "Augmented views per image of targets='entropy' (the first is the image).")
    entropy_keep: float = help_field(0.1, "Fraction of the views, the most confident, targets='entropy' keeps.")
    inner_steps: int = help_field(5, "Gradient steps of each target prompt (per sample or per group).")
    inner_lr: float = help_field(0.05, "Length of each target-prompt step, relative to the prompt's RMS.")
    target_batch_size: int = help_field(32, "Samples per batch when computing the overfitted targets.")
    train_steps: int = help_field(2000, "Flow-matching steps of the generator.")
    train_lr: float = help_field(3e-3, "AdamW learning rate of the generator.")
    train_batch_size: int = help_field(64, "Batch size of the generator training.")
    joint_steps: int = help_field(0, "Steps of task-loss training through the sampler after flow matching.")
    joint_lr: float = help_field(2e-4, "Learning rate of the joint stage.")
    joint_train_prompt: bool = help_field(False, "Also update the learner's prompt in the joint stage.")
    fm_weight: float = help_field(1.0, "Weight of the flow-matching term in the joint stage.")

    SOLVERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "rk4")
    TARGETS: ClassVar[tuple[str, ...]] = ("overfit", "group", "entropy")

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool) and self.num_steps >= 1,
            f"num_steps must be an integer >= 1; got {self.num_steps!r}. The paper's sampler uses 5.",
        )
        if self.method not in self.SOLVERS:
            raise unknown_name_error("ODE method", self.method, self.SOLVERS)
        if self.targets not in self.TARGETS:
            raise unknown_name_error("refiner target rule", self.targets, self.TARGETS)
        for name in ("num_samples", "hidden_dim", "layers", "heads", "inner_steps", "target_batch_size", "num_groups"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)!r}.")
        _check(
            self.entropy_views >= 2, f"entropy_views must be >= 2 (the image and a view); got {self.entropy_views!r}."
        )
        _check(0 < self.entropy_keep <= 1, f"entropy_keep must be a fraction in (0, 1]; got {self.entropy_keep!r}.")
        _check(self.hidden_dim % self.heads == 0, f"hidden_dim ({self.hidden_dim}) must be a multiple of heads.")
        for name in ("train_steps", "joint_steps"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)!r}.")
        _check(self.train_steps + self.joint_steps >= 1, "train_steps + joint_steps must be >= 1.")
        _check(self.train_batch_size >= 1, f"train_batch_size must be >= 1; got {self.train_batch_size!r}.")
        for name in ("inner_lr", "train_lr", "joint_lr"):
            _positive(name, getattr(self, name))
        _positive("fm_weight", self.fm_weight, allow_zero=True)
        _positive("noise_scale", self.noise_scale, allow_zero=True)
