"""PromptSRC: deep vision and language prompts regularised towards frozen CLIP (Khattak et al., "Self-regulating
Prompts: Foundational Model Adaptation without Forgetting", ICCV 2023, https://arxiv.org/abs/2307.06948)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..backbones.base import ClipBackbone
from ..config import _check, help_field
from .base import ClassPrompts, ContextConfig, LearnerOutput, PromptLearner, cosine_logits, init_context
from .kgcoop import hand_crafted_text_features

__all__ = ["CLIP_IMAGENET_TEMPLATES", "GaussianPromptAggregation", "PromptSRC", "PromptSRCConfig"]

#: The 60 prompt templates of CLIP's ImageNet prompt ensemble (openai/CLIP, notebooks/
#: Prompt_Engineering_for_ImageNet.ipynb); PromptSRC averages the frozen text features over all of them
#: ("textual diversity").
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)


@dataclass
class PromptSRCConfig(ContextConfig):
    """PromptSRC options. Defaults from the reference's base-to-novel config (github.com/muzairkhattak/PromptSRC,
    ``configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml``: 4 + 4 tokens, depth 9 in both towers,
    ``TEXT_LOSS_WEIGHT 25``, ``IMAGE_LOSS_WEIGHT 10``; its cross-dataset config uses depth 3). The optimizer
    settings of that file (SGD, lr 0.0025, batch 4, 20 epochs) and its GPA schedule (``GPA_MEAN 15``,
    ``GPA_STD 1``) belong to training: :class:`~prompt_robust.training.FitConfig` and
    :class:`GaussianPromptAggregation`."""

    n_ctx: int = help_field(4, "Text prompt tokens per layer (ignored when ctx_init is given).", ge=0)
    ctx_init: str | None = help_field("a photo of a", "Initialise the first-layer text prompt from these words.")
    n_ctx_vision: int = help_field(
        4,
        "Vision prompt tokens per layer (at most 1024, as VPT's, so an adapter file cannot ask for more).",
        ge=1,
        le=1024,
    )
    text_depth: int = help_field(
        9, "Text layers with their own prompt tokens (capped at the backbone's depth; 1: shallow).", ge=1
    )
    vision_depth: int = help_field(
        9, "Vision layers with their own prompt tokens (capped at the backbone's depth; 0: no vision prompts).", ge=0
    )
    text_loss_weight: float = help_field(
        25.0, "Weight of the L1 distance between prompted and frozen CLIP text features (reference: 25).", ge=0
    )
    image_loss_weight: float = help_field(
        10.0, "Weight of the L1 distance between prompted and frozen CLIP image features (reference: 10).", ge=0
    )
    kl_weight: float = help_field(
        1.0, "Weight of KL(zero-shot CLIP || prompted) on the logits (the reference adds it unweighted).", ge=0
    )
    templates: list[str] | None = help_field(
        None,
        "Templates of the frozen text features (their raw features are averaged, then normalised). None: the 60 "
        "templates of CLIP's ImageNet ensemble (CLIP_IMAGENET_TEMPLATES), as the reference.",
        min_len=1,
        placeholder="the class name",
    )


class PromptSRC(PromptLearner):
    """Prompting with Self-regulating Constraints: independent deep prompts in both towers (IVLP: learned tokens
    at the first ``text_depth`` text layers and the first ``vision_depth`` vision layers, no coupling), trained with
    three self-regulating terms that keep the prompted model close to frozen CLIP:

    ``text_loss_weight * L1(t, t_clip) + image_loss_weight * L1(v, v_clip) + kl_weight * KL(p_clip || p)``

    with ``t`` / ``v`` the prompted, L2-normalised class text and image features, ``t_clip`` the frozen text
    features averaged over an ensemble of templates (textual diversity), ``v_clip`` the prompt-free image features,
    and ``p`` / ``p_clip`` the softmax of the prompted and the zero-shot logits (``logit_scale * v_clip @ t_clip``).
    L1 is the mean absolute difference; the KL term is summed over the batch and classes and divided by
    ``batch * n_classes``, as in the reference. In training mode :meth:`forward` returns their sum as
    ``LearnerOutput.loss`` (the wrapped model adds it to the cross-entropy).

    The paper's third component, Gaussian-weighted prompt aggregation over epochs, is a training procedure, not
    part of the forward pass: :class:`GaussianPromptAggregation` does it for a :func:`prompt_robust.fit` run.

    Paper: https://arxiv.org/abs/2307.06948

    Prompt sites: ``"text"`` ``(text_depth * n_ctx, text_width)`` and, when ``vision_depth >= 1``,
    ``"vision"`` ``(vision_depth * n_ctx_vision, vision_width)`` (layer-major); an override may replace either
    or both, per sample. ``image_features()`` stays prompt-free; ``LearnerOutput.image_features`` are the
    prompted ones the logits use.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = PromptSRC(tiny_clip_backbone(layers=2), ["cat", "dog"], PromptSRCConfig(templates=["a {}."]))
        >>> {site: tuple(t.shape) for site, t in model.prompt_tokens().items()}  # depth capped at 2 layers
        {'text': (8, 32), 'vision': (8, 32)}
        >>> model.train()(torch.zeros(2, 3, 32, 32)).loss.shape
        torch.Size([])
    """

    learner_type = "promptsrc"
    config_class = PromptSRCConfig

    def __init__(
        self, backbone: ClipBackbone, classnames: Sequence[str], config: PromptSRCConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        config = self.config
        self.text_depth = min(config.text_depth, backbone.num_text_layers)
        self.vision_depth = min(config.vision_depth, backbone.num_vision_layers)
        first, self.n_ctx = init_context(backbone, config.n_ctx, config.ctx_init, backbone.text_width, config.init_std)
        deeper = torch.randn(self.text_depth - 1, self.n_ctx, backbone.text_width) * config.init_std
        self.text_prompts = nn.Parameter(torch.cat([first.unsqueeze(0), deeper]).to(backbone.device))  # (Jt, n, w)
        if self.vision_depth:
            vision = torch.randn(self.vision_depth, config.n_ctx_vision, backbone.vision_width) * config.init_std
            self.vision_prompts = nn.Parameter(vision.to(backbone.device))  # (Jv, nv, vw)
        else:
            self.vision_prompts = None
        self._build_class_state()

    def _build_class_state(self) -> None:
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx)
        # frozen CLIP text features of these classes, computed on first use (derived, never saved)
        self.register_buffer("clip_text_features", None, persistent=False)

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        sites = {"text": self.text_prompts.reshape(-1, self.text_prompts.shape[-1])}
        if self.vision_prompts is not None:
            sites["vision"] = self.vision_prompts.reshape(-1, self.vision_prompts.shape[-1])
        return sites

    def hand_crafted_features(self) -> torch.Tensor:
        """``(n_cls, d)``: frozen CLIP text features averaged over the templates (computed once per class list)."""
        if self.clip_text_features is None:
            templates = self.config.templates or CLIP_IMAGENET_TEMPLATES
            self.clip_text_features = hand_crafted_text_features(
                self.backbone,
                self.classnames,
                templates,
                normalize_each=False,  # the reference averages the raw features, then normalises
                chunk_size=self.config.text_chunk_size,
            )
        return self.clip_text_features

    def _text_features(self, override: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        if "text" in override:
            prompts = override["text"].reshape(batch, self.text_depth, self.n_ctx, -1)  # (b, Jt, n, w)
            layers = [prompts[:, j] for j in range(self.text_depth)]  # Jt x (b, n, w)
            ctx = layers[0].unsqueeze(1)  # (b, 1, n, w)
        else:
            layers = list(self.text_prompts)  # Jt x (n, w)
            ctx = layers[0].unsqueeze(0)  # (1, n, w)
        deep = {j: layers[j] for j in range(1, self.text_depth)}
        return self.encode_prompts(self.prompts, ctx, deep_prompts=deep)  # (n_cls, d) or (b, n_cls, d)

    def _image_features(self, pixel_values: torch.Tensor, override: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.vision_prompts is None:
            return self.plain_image_features(pixel_values)
        batch = pixel_values.shape[0]
        if "vision" in override:
            prompts = override["vision"].reshape(batch, self.vision_depth, self.config.n_ctx_vision, -1)
            layers = [prompts[:, j] for j in range(self.vision_depth)]  # Jv x (b, nv, vw)
        else:
            layers = list(self.vision_prompts)  # Jv x (nv, vw)
        deep = {j: layers[j] for j in range(1, self.vision_depth)}
        image = self.backbone.encode_image(pixel_values, prompts=layers[0], deep_prompts=deep)
        return F.normalize(image, dim=-1)  # (b, d)

    def regularization_terms(self, output: LearnerOutput, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted self-regulating terms of one forward's ``output`` on ``pixel_values``.

        Returns:
            ``{"text_l1", "image_l1", "logits_kl"}``, each a scalar: the mean absolute difference between the
            prompted and frozen text features (per-sample text features are compared to the same frozen ones)
            and image features, and ``sum KL(p_clip || p) / (batch * n_classes)``.
        """
        clip_text = self.hand_crafted_features()  # (n_cls, d)
        text, image, logits = output.text_features, output.image_features, output.logits
        with torch.no_grad():  # frozen targets, also when the backbone trains (e.g. LoRA)
            clip_image = self.plain_image_features(pixel_values)  # (b, d)
            zero_shot = cosine_logits(clip_image, clip_text.to(clip_image.dtype), self.backbone.logit_scale)
        kl = F.kl_div(
            F.log_softmax(logits.float(), dim=-1),
            F.log_softmax(zero_shot.float(), dim=-1),
            reduction="sum",
            log_target=True,
        )
        return {
            "text_l1": F.l1_loss(text, clip_text.to(text.dtype).expand_as(text)),
            "image_l1": F.l1_loss(image, clip_image.to(image.dtype)),
            "logits_kl": kl / logits.numel(),
        }

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        override = self.check_override(prompt_override, pixel_values.shape[0])
        text = self._text_features(override, pixel_values.shape[0])
        image = self._image_features(pixel_values, override)
        out = LearnerOutput(cosine_logits(image, text, self.backbone.logit_scale), image, text)
        if self.training:
            terms = self.regularization_terms(out, pixel_values)
            config = self.config
            out.loss = (
                config.text_loss_weight * terms["text_l1"]
                + config.image_loss_weight * terms["image_l1"]
                + config.kl_weight * terms["logits_kl"]
            )
        return out


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> torch.Tensor:
    """``(epochs,)`` weights of epochs ``1 .. epochs`` proportional to the normal density ``N(mean, std²)``,
    summing to 1 (computed in log space, so a mean far outside the run still gives finite weights).

    Example:
        >>> gaussian_epoch_weights(3, mean=2.0, std=1.0)
        tensor([0.2741, 0.4519, 0.2741], dtype=torch.float64)
    """
    epoch = torch.arange(1, epochs + 1, dtype=torch.float64)
    return torch.softmax(-0.5 * ((epoch - mean) / std) ** 2, dim=0)


class GaussianPromptAggregation:
    """PromptSRC's Gaussian-weighted prompt aggregation (GPA): the prompt becomes the average of the prompts at
    the end of every epoch, epoch ``e`` weighted by a normal density ``N(mean, std²)`` over ``e = 1 .. epochs``
    (normalised), which favours the later, well-trained but not yet overfitted epochs.

    Paper: https://arxiv.org/abs/2307.06948 (Sec. 3.2.3). Defaults: the reference's base-to-novel config
    (``GPA_MEAN 15``, ``GPA_STD 1`` for 20 epochs; few-shot: 30 / 30 for 50 epochs; cross-dataset: 6 / 10).

    The tensors averaged are the learner's trainable parameters when this object is built (its prompts).
    :func:`prompt_robust.fit` has no epoch callback, so inside a ``with`` block the aggregation follows the
    optimizer steps that update those tensors (a global ``torch.optim`` step hook, removed on exit): after every
    ``steps_per_epoch`` of them the epoch's prompts are added with their weight, and after the last epoch the
    learner's prompts are replaced by the average (before ``fit`` writes its final checkpoint). With a loop of
    your own, call :meth:`update` at the end of each epoch and :meth:`apply` at the end instead.

    The running average is not part of ``fit``'s checkpoints: run an aggregated ``fit`` without interruption
    (a resumed run would start counting epochs at its first step again).

    Args:
        learner: the learner whose trainable tensors are averaged (PromptSRC or any other).
        epochs: epochs of the run (``FitConfig.epochs``).
        steps_per_epoch: optimizer steps per epoch: ``ceil(len(train_set) / FitConfig.batch_size)``, as ``fit``
            counts them (see :meth:`for_fit`).
        mean: the epoch the weights peak at (1-based).
        std: the width of the weights, in epochs.
        total_steps: steps of the run when it ends inside the last epoch (``FitConfig.steps``); its last step then
            ends that epoch. None: ``epochs * steps_per_epoch``.

    Example:
        >>> import prompt_robust as pr
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = PromptSRC(tiny_clip_backbone(layers=2), ["cat", "dog"], PromptSRCConfig(templates=["a {}."]))
        >>> train = [(torch.randn(3, 32, 32), i % 2) for i in range(4)]
        >>> config = pr.FitConfig(epochs=3, batch_size=2, progress=False)
        >>> with GaussianPromptAggregation.for_fit(learner, len(train), config, mean=2.0, std=1.0) as gpa:
        ...     _ = pr.fit(pr.wrap(learner), train, config)
        >>> gpa.epochs_seen, gpa.applied
        (3, True)
    """

    def __init__(
        self,
        learner: nn.Module,
        epochs: int,
        steps_per_epoch: int,
        mean: float = 15.0,
        std: float = 1.0,
        *,
        total_steps: int | None = None,
    ) -> None:
        total_steps = epochs * steps_per_epoch if total_steps is None else total_steps
        for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"GaussianPromptAggregation.{name} must be an integer >= 1; got {value!r}.",
            )
        _check(math.isfinite(mean), f"GaussianPromptAggregation.mean must be a finite number; got {mean!r}.")
        _check(
            math.isfinite(std) and std > 0,
            f"GaussianPromptAggregation.std must be a finite number > 0; got {std!r} (PromptSRC uses 1 to 30).",
        )
        self.params = [p for p in learner.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(
                f"{type(learner).__name__} has no trainable tensors to aggregate; build the aggregation after "
                "wrap() (or set_stage('prompt')), while the prompts require gradients."
            )
        self.epochs, self.steps_per_epoch, self.total_steps = epochs, steps_per_epoch, total_steps
        self._mean, self._std = float(mean), float(std)
        self.weights = gaussian_epoch_weights(epochs, self._mean, self._std)  # (epochs,)
        self.steps = 0
        self.epochs_seen = 0
        self.applied = False
        self._ids = {id(p) for p in self.params}
        self._sum: list[torch.Tensor] | None = None
        self._weight = 0.0  # sum of the weights added so far
        self._handle: Any = None

    @classmethod
    def for_fit(
        cls, learner: nn.Module, dataset_size: int, fit_config: Any, mean: float = 15.0, std: float = 1.0
    ) -> GaussianPromptAggregation:
        """The aggregation of a ``fit(model, dataset, fit_config)`` run over ``dataset_size`` examples: as many
        epochs as the run has (``fit_config.epochs``, or the epochs ``fit_config.steps`` begins), with
        ``ceil(dataset_size / fit_config.batch_size)`` steps each."""
        steps_per_epoch = math.ceil(dataset_size / fit_config.batch_size)
        steps = getattr(fit_config, "steps", None)
        epochs = fit_config.epochs if steps is None else math.ceil(steps / steps_per_epoch)
        return cls(learner, epochs, steps_per_epoch, mean, std, total_steps=steps)

    @torch.no_grad()
    def update(self, epoch: int) -> None:
        """Add the current prompts with the weight of ``epoch`` (0-based: ``0 .. epochs - 1``)."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must lie in 0..{self.epochs - 1} (0-based); got {epoch}.")
        weight = float(self.weights[epoch])
        terms = [weight * p.detach().float() for p in self.params]
        self._sum = terms if self._sum is None else [s + t for s, t in zip(self._sum, terms, strict=True)]
        self._weight += weight
        self.epochs_seen += 1

    @torch.no_grad()
    def apply(self) -> None:
        """Replace the prompts by the weighted average of the epochs added so far (normalised by their weights)."""
        if self._sum is None:
            raise RuntimeError("no epoch was aggregated yet; call update(epoch) at the end of an epoch first.")
        if self._weight <= 0.0:
            raise RuntimeError(
                f"the epochs aggregated so far have weight 0 under N({self._mean}, {self._std}**2); aggregate the "
                "epochs near the mean first."
            )
        for param, value in zip(self.params, self._sum, strict=True):
            param.copy_((value / self._weight).to(param.dtype))
        self.applied = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.applied or not any(id(p) in self._ids for group in optimizer.param_groups for p in group["params"]):
            return
        self.steps += 1
        # an epoch ends every steps_per_epoch steps; the run's last step ends the last (maybe partial) epoch
        if self.steps % self.steps_per_epoch == 0 or self.steps == self.total_steps:
            epoch = min(math.ceil(self.steps / self.steps_per_epoch), self.epochs) - 1
            self.update(epoch)
            if self.epochs_seen == self.epochs or self.steps == self.total_steps:
                self.apply()

    def attach(self) -> GaussianPromptAggregation:
        """Start following optimizer steps (what ``with`` does)."""
        if self._handle is None:
            self._handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def detach(self) -> None:
        """Stop following optimizer steps."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> GaussianPromptAggregation:
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.detach()
        if exc_type is None and not self.applied:
            warnings.warn(
                f"Gaussian prompt aggregation saw {self.epochs_seen} of {self.epochs} epochs ({self.steps} steps of "
                f"{self.steps_per_epoch} per epoch), so the prompts were left as trained; match epochs and "
                "steps_per_epoch to the run (GaussianPromptAggregation.for_fit), or call apply() yourself.",
                stacklevel=2,
            )
