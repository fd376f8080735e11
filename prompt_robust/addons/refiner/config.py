"""RefinerConfig: the settings of the prompt-space diffusion refiner (``RobustConfig(refiner=...)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigMixin, _check, help_field

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

    num_steps: int = help_field(5, "ODE steps of the sampler at test time.", ge=1, hint="The paper's sampler uses 5.")
    method: str = help_field(
        "euler", "Fixed-grid ODE solver: euler, midpoint or rk4.", choices="SOLVERS", kind="ODE method"
    )
    num_samples: int = help_field(1, "Prompts sampled per image and averaged (K).", ge=1)
    noise_seed: int | None = help_field(
        0, "Fixed noise seed for deterministic sampling (None: fresh noise).", unbounded=True
    )
    noise_scale: float = help_field(
        1.0, "Std of the starting noise when sampling (0: one deterministic prompt per image, from the origin).", ge=0
    )
    hidden_dim: int = help_field(128, "Width of the velocity network.", ge=1)
    layers: int = help_field(2, "Transformer blocks of the velocity network.", ge=1)
    heads: int = help_field(4, "Attention heads of the velocity network.", ge=1)
    targets: str = help_field(
        "overfit",
        "How a training sample's target prompt is made: overfit (its own prompt, steps on its own loss: the "
        "paper's), group (one prompt per label-free group of similar-looking training images) or entropy (its own "
        "prompt, steps on the marginal entropy of its augmented views, without its label, as test-time prompt tuning).",
        choices="TARGETS",
        kind="refiner target rule",
    )
    num_groups: int = help_field(4, "Groups of training images of targets='group' (k-means, seeded).", ge=1)
    entropy_views: int = help_field(
        64,
        "Augmented views per image of targets='entropy' (the first is the image).",
        ge=2,
        hint="The views are the image and at least one augmented copy.",
    )
    entropy_keep: float = help_field(
        0.1, "Fraction of the views, the most confident, targets='entropy' keeps.", gt=0, le=1
    )
    inner_steps: int = help_field(5, "Gradient steps of each target prompt (per sample or per group).", ge=1)
    inner_lr: float = help_field(0.05, "Length of each target-prompt step, relative to the prompt's RMS.", gt=0)
    target_batch_size: int = help_field(32, "Samples per batch when computing the overfitted targets.", ge=1)
    train_steps: int = help_field(2000, "Flow-matching steps of the generator.", ge=0)
    train_lr: float = help_field(3e-3, "AdamW learning rate of the generator.", gt=0)
    train_batch_size: int = help_field(64, "Batch size of the generator training.", ge=1)
    joint_steps: int = help_field(0, "Steps of task-loss training through the sampler after flow matching.", ge=0)
    joint_lr: float = help_field(2e-4, "Learning rate of the joint stage.", gt=0)
    joint_train_prompt: bool = help_field(False, "Also update the learner's prompt in the joint stage.")
    fm_weight: float = help_field(1.0, "Weight of the flow-matching term in the joint stage.", ge=0)

    SOLVERS: ClassVar[tuple[str, ...]] = ("euler", "midpoint", "rk4")
    TARGETS: ClassVar[tuple[str, ...]] = ("overfit", "group", "entropy")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.hidden_dim % self.heads == 0,
            f"RefinerConfig.hidden_dim ({self.hidden_dim}) must be a multiple of heads ({self.heads}): the attention "
            "heads split it evenly. Change one of them.",
        )
        _check(
            self.train_steps + self.joint_steps >= 1,
            f"RefinerConfig.train_steps + joint_steps must be >= 1; got {self.train_steps} + {self.joint_steps}: the "
            "generator would never be trained.",
        )
