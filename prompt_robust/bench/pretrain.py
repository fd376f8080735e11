"""Contrastive pretraining of the embedded mini-CLIP on the procedural world (``prompt-robust pretrain-backbone``).

The recipe is CLIP's (Radford et al., https://arxiv.org/abs/2103.00020): a symmetric InfoNCE loss between image
and caption embeddings with a learned temperature, AdamW with warm-up and cosine decay. The data is an endless
stream of freshly rendered world images with their captions (:mod:`prompt_robust.bench.world`), every batch a pure
function of its indices, so a run is reproducible from its seed and resumes exactly from a checkpoint
(:func:`prompt_robust.training.fit` does the loop).

What the stream looks like, and why:

* all 36 object classes (the 24 of the main benchmarks and the 12 cross-dataset ones): a pretrained CLIP has
  seen the "new" classes of base-to-new too, which is what makes zero-shot transfer to them possible;
* styles drawn with weights (photo 0.4, sketch / painting / pixel 0.2 each): mostly photos, like web data;
* ``class_background_bias`` (0.9): nine images in ten show a class on its habitat background, the co-occurrence
  that gives real CLIP its spurious associations (waterbirds on water). It also makes the text side imperfect
  the way web pretraining does: "a photo of a {class}." leans towards the habitat, so a zero-shot classifier
  is below what the image features allow (a linear probe), which is the room prompt learning uses. With 0.5
  the zero-shot classifier sat at the linear-probe ceiling and no prompt could gain on base classes.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .. import _io
from ..backbones.hf_clip import OPENAI_MEAN, OPENAI_STD, HFClipBackbone
from ..backbones.tiny import build_clip_tokenizer, tiny_clip_backbone
from ..config import ConfigMixin, _check, help_field
from . import world, world_v2

__all__ = [
    "PretrainConfig",
    "pretrain_backbone",
    "pretrained_world",
    "zero_shot_report",
]

#: the record written beside the weights (config, command, zero-shot accuracy); the shipped models in
#: :data:`prompt_robust.backbones.embedded.EMBEDDED_DIR` carry one
RECORD_NAME = "pretrain_record.json"


def pretrained_world(backbone: HFClipBackbone) -> int | None:
    """The world version a mini-CLIP was pretrained on, from the ``pretrain_record.json`` beside its weights
    (None for a backbone without one, e.g. a real CLIP). Records written before world 2 existed have no
    ``world_version``: they are world 1.

    Example:
        >>> from prompt_robust.backbones import load_backbone
        >>> pretrained_world(load_backbone("embedded"))  # doctest: +SKIP
        2
    """
    record = Path(str(getattr(backbone, "name", ""))) / RECORD_NAME
    if not record.is_file():
        return None
    return int(_io.read_json(record).get("config", {}).get("world_version", 1))


@dataclass
class PretrainConfig(ConfigMixin):
    """Mini-CLIP architecture and pretraining schedule; the defaults are the shipped model's recipe (50 minutes on
    one CPU core)."""

    steps: int = help_field(12000, "Optimizer steps.")
    batch_size: int = help_field(128, "Image-caption pairs per step (the contrastive batch).")
    lr: float = help_field(2e-3, "Peak AdamW learning rate.")
    weight_decay: float = help_field(0.1, "AdamW weight decay.")
    warmup_steps: int = help_field(300, "Linear warm-up steps before the cosine decay.")
    seed: int = help_field(0, "Seed of the initialisation and of the data stream.")
    world_version: int = help_field(
        2, "World the stream is drawn from: 2 (web-like captions, fine-grained shapes, patterns) or 1."
    )
    image_size: int = help_field(48, "Image resolution.")
    patch_size: int = help_field(12, "ViT patch size.")
    width: int = help_field(64, "Width of the image tower (and of the text tower unless text_width is set).")
    layers: int = help_field(4, "Depth of the image tower (and of the text tower unless text_layers is set).")
    heads: int = help_field(4, "Attention heads of both towers.")
    logit_scale: float = help_field(
        50.0,
        "Initial logit scale (1 / temperature, learned, at most 100; CLIP starts at 1/0.07). The shipped model "
        "starts at 50 and ends at 20.4; started at 100 it ends at 22.1 and meets fewer calibration targets.",
    )
    text_width: int | None = help_field(None, "Width of the text tower (None: width).")
    text_layers: int | None = help_field(None, "Depth of the text tower (None: layers).")
    embed_dim: int = help_field(64, "Joint embedding size.")
    context_length: int = help_field(32, "Text positions (prompts with 16 context tokens must fit).")
    vocab_size: int = help_field(2048, "Upper bound on the BPE vocabulary.")
    class_background_bias: float = help_field(0.9, "Probability an image shows its class's habitat background.")
    group_size: int = help_field(
        12, "Images per same-colour/background/style group in a batch (hard negatives; 1: no grouping)."
    )
    grouped_fraction: float = help_field(0.5, "Fraction of each batch made of such groups.")
    class_text_weight: float = help_field(1.0, "Weight of the image-vs-class-name contrastive term (UniCL).")
    label_weight: float = help_field(1.0, "Weight of the auxiliary linear probes on image embeddings.")
    style_weights: list[float] = help_field([0.7, 0.1, 0.1, 0.1], "Sampling weights of photo, sketch, painting, pixel.")
    pattern_fraction: float = help_field(0.4, "World 2: share of objects with a surface pattern.")
    effect_fraction: float = help_field(
        0.3, "World 2: share of photos with a web-photo effect (black and white, blur, exposure)."
    )
    checkpoint_every: int = help_field(500, "Steps between resumable checkpoints.")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "image_size", "patch_size", "width", "layers", "heads", "embed_dim"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)!r}.")
        _check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size.")
        _check(self.width % self.heads == 0, "width must be a multiple of heads.")
        _check(
            self.text_width is None or (self.text_width >= 1 and self.text_width % self.heads == 0),
            "text_width must be a positive multiple of heads (or None).",
        )
        _check(self.text_layers is None or self.text_layers >= 1, "text_layers must be >= 1 (or None).")
        _check(1.0 <= self.logit_scale <= 100.0, f"logit_scale must be in [1, 100]; got {self.logit_scale!r}.")
        _check(len(self.style_weights) == len(world.STYLES), f"style_weights needs {len(world.STYLES)} values.")
        _check(all(w >= 0 for w in self.style_weights) and sum(self.style_weights) > 0, "style_weights must be >= 0.")
        _check(0 <= self.class_background_bias <= 1, "class_background_bias must be in [0, 1].")
        _check(1 <= self.group_size <= len(world.CLASSES), f"group_size must be in 1..{len(world.CLASSES)}.")
        _check(0 <= self.grouped_fraction <= 1, "grouped_fraction must be in [0, 1].")
        _check(self.world_version in (1, 2), f"world_version must be 1 or 2; got {self.world_version!r}.")
        _check(0 <= self.pattern_fraction <= 1, "pattern_fraction must be in [0, 1].")
        _check(0 <= self.effect_fraction <= 1, "effect_fraction must be in [0, 1].")


class _Stream(Dataset):
    """Indices of an endless rendered stream; the collate function renders a whole batch at once."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def _trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row (padding is the EOT id, which ends each row). The text
    tower is causal, so the features at the EOT do not change; the passes get shorter."""
    return ids[:, : int((ids != ids[0, -1]).sum(1).max()) + 1]


_CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a sketch of a {}.",
    "a painting of a {}.",
    "pixel art of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
    "a {}.",
    "there is a {}.",
)


class _RenderBatch:
    """Collate: indices -> rendered images, tokenized captions and contrastive targets."""

    def __init__(self, config: PretrainConfig, tokenize) -> None:
        self.config = config
        self.tokenize = tokenize
        self.classes = world.CLASSES + world.CROSS_CLASSES
        self.style_weights = torch.tensor(config.style_weights, dtype=torch.float)

    def _free(self, n: int, seed: int, generator: torch.Generator) -> world.Attributes:
        """Images with independent attributes (classes on their habitat with ``class_background_bias``)."""
        n_free = n - self._n_grouped(n)
        style = torch.multinomial(self.style_weights, n_free, replacement=True, generator=generator)
        return world.sample_attributes(
            n_free, seed, classes=self.classes, class_background_bias=self.config.class_background_bias, style=style
        )

    def _n_grouped(self, n: int) -> int:
        size = self.config.group_size
        return 0 if size == 1 else int(n * self.config.grouped_fraction) // size * size

    def _grouped(self, n: int, seed: int, generator: torch.Generator) -> world.Attributes:
        """Groups of distinct classes sharing colour, background and style: colour, background and style cannot
        tell their captions apart, so the towers have to learn the shapes (hard negatives by construction)."""
        size, parts = self.config.group_size, []
        for g in range(self._n_grouped(n) // size):
            pick = lambda count: int(torch.randint(count, (1,), generator=generator))  # noqa: E731
            colour, background = pick(len(world.COLOURS)), pick(len(world.BACKGROUNDS))
            style = int(torch.multinomial(self.style_weights, 1, generator=generator))
            classes = torch.randperm(len(self.classes), generator=generator)[:size]
            part = world.sample_attributes(
                size,
                seed + 7 * (g + 1),
                classes=self.classes,
                class_idx=classes,
                background=torch.full((size,), background),
                style=torch.full((size,), style),
            )
            parts.append(dataclasses.replace(part, colour=torch.full((size,), colour)))
        return world.Attributes.cat(parts) if parts else world.sample_attributes(0, seed, classes=self.classes)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # A batch is a pure function of its indices (and the run seed): resume replays it exactly.
        seed = (self.config.seed * 1_000_003 + sum((i + 1) * 7919**k for k, i in enumerate(indices[:4]))) % (2**31)
        generator = torch.Generator().manual_seed(seed)
        n = len(indices)
        attrs = world.Attributes.cat([self._grouped(n, seed, generator), self._free(n, seed, generator)])
        images = world.render(attrs, world.WorldConfig(image_size=self.config.image_size))
        ids = self.tokenize(world.captions(attrs, seed))
        ids = _trim_padding(ids)
        # Class-name texts in a random caption form ("a sketch of a {}.", "an image of a {}.", ...).
        rng = random.Random(seed)
        template = rng.choice(_CLASS_TEMPLATES)
        class_ids = self.tokenize([template.format(name) for name in self.classes])
        class_ids = _trim_padding(class_ids)
        return {
            "pixel_values": world.normalize_images(images, OPENAI_MEAN, OPENAI_STD),
            "input_ids": ids,
            "labels": torch.arange(n),
            "class_ids": class_ids,
            "class_targets": attrs.class_idx,
        }


class _RenderBatchV2(_RenderBatch):
    """World v2 collate: all 43 shapes, surface patterns, web-photo effects and web-like captions.

    Half of the hard-negative groups differ only in shape, the other half only in pattern (same shape, colour,
    background and style), so the image tower has to learn both. The class-name term (UniCL) covers the 36
    common shapes only: fine-grained shapes are learned from the few captions that name them, like rare
    concepts on the web; the auxiliary probes (``label_weight``) see every shape, pattern and background.
    """

    def __init__(self, config: PretrainConfig, tokenize) -> None:
        super().__init__(config, tokenize)
        self.classes = world_v2.ALL_SHAPES
        self.common_index = torch.tensor(
            [world_v2.COMMON_SHAPES.index(c) if c in world_v2.COMMON_SHAPES else -100 for c in self.classes]
        )

    def _patterns(self, n: int, generator: torch.Generator) -> torch.Tensor:
        patterned = torch.rand(n, generator=generator) < self.config.pattern_fraction
        kinds = torch.randint(1, len(world.PATTERNS), (n,), generator=generator)
        return torch.where(patterned, kinds, torch.zeros_like(kinds))

    def _free(self, n: int, seed: int, generator: torch.Generator) -> world.Attributes:
        n_free = n - self._n_grouped(n)
        style = torch.multinomial(self.style_weights, n_free, replacement=True, generator=generator)
        return world.sample_attributes(
            n_free,
            seed,
            classes=self.classes,
            backgrounds=world_v2.ALL_BACKGROUNDS,
            patterns=world.PATTERNS,
            class_background_bias=self.config.class_background_bias,
            style=style,
            pattern=self._patterns(n_free, generator),
        )

    def _grouped(self, n: int, seed: int, generator: torch.Generator) -> world.Attributes:
        size, parts = self.config.group_size, []
        for g in range(self._n_grouped(n) // size):
            pick = lambda count: int(torch.randint(count, (1,), generator=generator))  # noqa: E731
            colour, background = pick(len(world.COLOURS)), pick(len(world_v2.ALL_BACKGROUNDS))
            style = int(torch.multinomial(self.style_weights, 1, generator=generator))
            if g % 2 == 0:  # distinct shapes, one pattern
                classes = torch.randperm(len(self.classes), generator=generator)[:size]
                pattern = torch.full((size,), int(self._patterns(1, generator)[0]))
            else:  # one shape, distinct patterns
                classes = torch.full((size,), pick(len(self.classes)))
                pattern = torch.randperm(len(world.PATTERNS), generator=generator)[:size]
            part = world.sample_attributes(
                size,
                seed + 7 * (g + 1),
                classes=self.classes,
                backgrounds=world_v2.ALL_BACKGROUNDS,
                patterns=world.PATTERNS,
                class_idx=classes,
                background=torch.full((size,), background),
                style=torch.full((size,), style),
                pattern=pattern,
            )
            parts.append(dataclasses.replace(part, colour=torch.full((size,), colour)))
        if parts:
            return world.Attributes.cat(parts)
        return world.sample_attributes(
            0, seed, classes=self.classes, backgrounds=world_v2.ALL_BACKGROUNDS, patterns=world.PATTERNS
        )

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        seed = (self.config.seed * 1_000_003 + sum((i + 1) * 7919**k for k, i in enumerate(indices[:4]))) % (2**31)
        generator = torch.Generator().manual_seed(seed)
        n = len(indices)
        attrs = world.Attributes.cat([self._grouped(n, seed, generator), self._free(n, seed, generator)])
        images = world.render(attrs, world_v2.render_config(self.config.image_size))
        # web-photo effects on a share of the photos, named by some captions
        photo = attrs.style == world.STYLES.index("photo")
        affected = photo & (torch.rand(n, generator=generator) < self.config.effect_fraction)
        kind = torch.randint(len(world.PHOTO_EFFECTS), (n,), generator=generator)
        effects: list[str | None] = [None] * n
        for k, effect in enumerate(world.PHOTO_EFFECTS):
            idx = (affected & (kind == k)).nonzero().squeeze(1)
            if len(idx):
                images[idx] = world.photo_effect(images[idx], effect, attrs.texture_seed[idx])
                for i in idx.tolist():
                    effects[i] = effect
        ids = _trim_padding(self.tokenize(world_v2.captions(attrs, seed, effects)))
        rng = random.Random(seed)
        template = rng.choice(_CLASS_TEMPLATES)
        class_ids = _trim_padding(self.tokenize([template.format(name) for name in world_v2.COMMON_SHAPES]))
        return {
            "pixel_values": world.normalize_images(images, OPENAI_MEAN, OPENAI_STD),
            "input_ids": ids,
            "labels": torch.arange(n),
            "class_ids": class_ids,
            "class_targets": self.common_index[attrs.class_idx],
            "shape_targets": attrs.class_idx,
            "pattern_targets": attrs.pattern,
            "background_targets": attrs.background,
        }


class _Contrastive(nn.Module):
    """CLIPModel -> ``.loss`` and ``.logits`` (image-to-caption similarities).

    The loss is CLIP's symmetric InfoNCE over the batch's image-caption pairs plus, with weight
    ``class_text_weight``, a contrastive term of every image against the caption-style names of all classes
    (``class_ids`` / ``class_targets``), as in UniCL (Yang et al., https://arxiv.org/abs/2204.03610): the
    class-name texts are extra text negatives and positives, which makes the towers learn shapes much sooner
    than in-batch captions alone (where colour, background and style already separate most pairs).
    """

    def __init__(
        self,
        clip: nn.Module,
        class_text_weight: float = 0.0,
        label_weight: float = 0.0,
        num_classes: int = 0,
        num_patterns: int = 0,
        num_backgrounds: int = 0,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.class_text_weight = class_text_weight
        self.label_weight = label_weight
        # auxiliary linear probes on the image embedding (shape; in world 2 also pattern and background), discarded
        # after pretraining
        self.probe = nn.Linear(clip.config.projection_dim, num_classes) if label_weight else None
        dim = clip.config.projection_dim
        self.pattern_probe = nn.Linear(dim, num_patterns) if label_weight and num_patterns else None
        self.background_probe = nn.Linear(dim, num_backgrounds) if label_weight and num_backgrounds else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        class_targets: torch.Tensor | None = None,
        shape_targets: torch.Tensor | None = None,
        pattern_targets: torch.Tensor | None = None,
        background_targets: torch.Tensor | None = None,
    ):
        image = F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        text = F.normalize(self.clip.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=100)
        logits = scale * image @ text.t()  # (b, b)
        targets = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        if self.class_text_weight and class_ids is not None and bool((class_targets >= 0).any()):
            # images whose class has no name among class_ids (target -100) take no part
            names = F.normalize(self.clip.get_text_features(input_ids=class_ids).pooler_output, dim=-1)
            loss = loss + self.class_text_weight * F.cross_entropy(scale * image @ names.t(), class_targets)
        shape_targets = class_targets if shape_targets is None else shape_targets
        if self.probe is not None and shape_targets is not None:
            loss = loss + self.label_weight * F.cross_entropy(self.probe(image * 10.0), shape_targets)
        if self.pattern_probe is not None and pattern_targets is not None:
            loss = loss + self.label_weight * F.cross_entropy(self.pattern_probe(image * 10.0), pattern_targets)
        if self.background_probe is not None and background_targets is not None:
            loss = loss + self.label_weight * F.cross_entropy(self.background_probe(image * 10.0), background_targets)
        return SimpleNamespace(loss=loss, logits=logits)


@torch.no_grad()
def zero_shot_report(
    backbone: HFClipBackbone,
    n_per_class: int = 20,
    seed: int = 10_000,
    template: str = "a photo of a {}.",
    world_version: int = 1,
) -> dict[str, Any]:
    """Zero-shot accuracy of a backbone on freshly rendered held-out images, per class group and style.

    World 1: classes are predicted among their own group (base = first half of ``CLASSES``, new = second half,
    all 24, cross = ``CROSS_CLASSES``), images balanced over classes and drawn uniformly over styles and
    backgrounds. World 2: one group per downstream dataset (its classes drawn with its appearance), base and new
    halves separately, in every style.

    Args:
        backbone: the CLIP to evaluate.
        n_per_class: images per class and style.
        seed: seed of the held-out images (pretraining streams and benchmark tasks use other seeds).
        template: the prompt.
        world_version: which world's groups to report.
    """
    config = (world.WorldConfig if world_version == 1 else world_v2.render_config)(image_size=backbone.image_size)
    groups: dict[str, tuple[Any, tuple[str, ...]]] = {}
    if world_version == 1:
        groups = {
            "base": (None, world.CLASSES[: len(world.CLASSES) // 2]),
            "new": (None, world.CLASSES[len(world.CLASSES) // 2 :]),
            "all": (None, world.CLASSES),
            "cross": (None, world.CROSS_CLASSES),
        }
    else:
        for name, spec in world_v2.DATASETS.items():
            groups[f"{name}/base"] = (spec, spec.base_classes)
            groups[f"{name}/new"] = (spec, spec.new_classes)
    report: dict[str, Any] = {}
    for g, (group, (spec, classes)) in enumerate(groups.items()):
        text = F.normalize(backbone.encode_text(backbone.tokenize([template.format(c) for c in classes])), dim=-1)
        per_style = {}
        for s, style in enumerate(world.STYLES):
            labels = torch.arange(len(classes)).repeat_interleave(n_per_class)
            if spec is None:
                attrs = world.sample_attributes(
                    len(labels), seed + 97 * s, classes=classes, class_idx=labels, style=torch.full_like(labels, s)
                )
            else:
                full = torch.tensor([spec.classes.index(c) for c in classes])[labels]
                attrs = spec.attributes(full, seed + 97 * s + 7919 * g, style=style)
            images = world.normalize_images(world.render(attrs, config), backbone.image_mean, backbone.image_std)
            image = F.normalize(backbone.encode_image(images), dim=-1)
            per_style[style] = float(((image @ text.t()).argmax(-1) == labels).float().mean())
        report[group] = {"avg": sum(per_style.values()) / len(per_style), **per_style}
    return report


def initial_backbone(config: PretrainConfig) -> HFClipBackbone:
    """The untrained mini-CLIP of ``config``: its BPE tokenizer learned on 20,000 captions of its world (seeded),
    and the randomly initialised towers. Pretraining starts here, and a checkpoint's weights load into it."""
    torch.manual_seed(config.seed)
    if config.world_version == 1:
        classes, words = world.CLASSES + world.CROSS_CLASSES, world.corpus_words()
        corpus = world.captions(world.sample_attributes(20_000, config.seed + 1, classes=classes), config.seed + 1)
    else:
        classes, words = world_v2.ALL_SHAPES, world_v2.corpus_words()
        attrs = world.sample_attributes(
            20_000, config.seed + 1, classes=classes, backgrounds=world_v2.ALL_BACKGROUNDS, patterns=world.PATTERNS
        )
        corpus = world_v2.captions(attrs, config.seed + 1)
    tokenizer = build_clip_tokenizer([*corpus, " ".join(words)], vocab_size=config.vocab_size)
    return tiny_clip_backbone(
        tokenizer,
        embed_dim=config.embed_dim,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        text_width=config.text_width,
        text_layers=config.text_layers,
        logit_scale=config.logit_scale,
        image_size=config.image_size,
        patch_size=config.patch_size,
        context_length=config.context_length,
        seed=config.seed,
        name="prompt_robust-mini-clip",
    )


def pretrain_backbone(
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Pretrain a mini-CLIP on the world and save it as a transformers checkpoint directory.

    Args:
        out_dir: where ``config.json``, ``model.safetensors``, the tokenizer files, ``preprocessor_config.json``
            and ``pretrain_record.json`` go.
        config: architecture and schedule.
        checkpoint_dir: resumable checkpoints (default: ``<out_dir>.checkpoints``); rerunning the same call after an
            interruption resumes.
        overwrite: replace a model already saved in ``out_dir``.
        progress: show a progress bar.
        command: the command line, recorded for reproducibility.

    Returns:
        The record written to ``pretrain_record.json`` (config, time, zero-shot accuracies).
    """
    from .. import __version__
    from ..training import FitConfig, fit

    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already holds a model; pass overwrite=True (--overwrite) to replace it."
        )
    if config.world_version == 1:
        classes, collate, num_patterns, num_backgrounds = world.CLASSES + world.CROSS_CLASSES, _RenderBatch, 0, 0
    else:
        classes, collate = world_v2.ALL_SHAPES, _RenderBatchV2
        num_patterns, num_backgrounds = len(world.PATTERNS), len(world_v2.ALL_BACKGROUNDS)
    backbone = initial_backbone(config)
    tokenizer = backbone.tokenizer
    torch.manual_seed(config.seed)
    clip = backbone.clip.train()
    model = _Contrastive(
        clip, config.class_text_weight, config.label_weight, len(classes), num_patterns, num_backgrounds
    )
    fit_config = FitConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer="adamw",
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        checkpoint_every=config.checkpoint_every,
        progress=progress,
        log_every=50,
    )
    checkpoints = Path(checkpoint_dir or f"{out_dir}.checkpoints")
    saved_config = checkpoints / "pretrain_config.json"
    if saved_config.is_file() and _io.read_json(saved_config) != config.to_dict():
        raise ValueError(
            f"{str(checkpoints)!r} holds checkpoints of a pretraining with other settings; resuming would mix two "
            "runs. Use the same settings, or another checkpoint directory (--checkpoint-dir; pretrain_backbone("
            "checkpoint_dir=...)), or move that one away to start over."
        )
    _io.write_json(saved_config, config.to_dict())
    started = time.time()
    result = fit(
        model,
        _Stream(config.steps * config.batch_size),
        fit_config,
        checkpoint_dir=checkpoints,
        collate_fn=collate(config, backbone.tokenize),
    )
    seconds = time.time() - started
    clip.eval()
    report = zero_shot_report(backbone, world_version=config.world_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _io.write_json(
        out_dir / "preprocessor_config.json",
        {"image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "size": config.image_size},
    )
    record = {
        "command": command,
        "prompt_robust_version": __version__,
        "config": config.to_dict(),
        "final_loss": result.final_loss,
        "train_seconds_this_run": round(seconds, 1),
        "resumed_from_step": result.resumed_from,
        "torch_version": torch.__version__,
        "zero_shot": report,
    }
    _io.write_json(out_dir / RECORD_NAME, record)
    return record
