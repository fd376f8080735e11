"""Zero-shot pseudo-labels of the spurious attribute, from images and words only.

DPT ("Debiased Prompt Tuning in Vision-Language Model without Annotations", https://arxiv.org/abs/2503.08368)
needs no attribute annotation: the user names the attribute's values in words (``["land background",
"water background"]``) and zero-shot CLIP assigns every training image the value whose prompts it matches best.

Each value ``v`` is described by several templates (``"a photo with a {}."``, ``"a photo of something on a {}."``,
``"an image showing a {}."`` by default); the L2-normalised text features of the filled templates are averaged
and renormalised (CLIP's prompt ensembling), and an image takes the value of highest cosine similarity with its
prompt-free image feature ``learner.image_features(x)``.

Nothing here reads a true attribute: the functions see images (``pixel_values``) and words only.
:func:`pseudo_label_accuracy` takes true attributes, for reporting, and is never called by the weighting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .backbones.base import find_backbone
from .data.items import iterate_batches

__all__ = [
    "DEFAULT_TEMPLATES",
    "attribute_text_features",
    "classify_attributes",
    "pseudo_attribute_labels",
    "pseudo_label_accuracy",
]

#: the default zero-shot prompts of an attribute value (``DebiasConfig.templates`` defaults to them)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo with a {}.", "a photo of something on a {}.", "an image showing a {}.")


def _check_values(attribute_values: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[str]]:
    # the same rules (and messages) as DebiasConfig, for callers that use the functions directly (imported here:
    # the add-on's config imports this module's DEFAULT_TEMPLATES)
    from .addons.debias.config import DebiasConfig

    config = DebiasConfig(attribute_values=list(attribute_values), templates=list(templates))
    return [v.strip() for v in config.attribute_values], list(config.templates)


def _text_encoder(learner: nn.Module):
    encode = getattr(learner, "fixed_text_features", None)
    if callable(encode):
        return encode
    backbone = find_backbone(learner)
    if backbone is None:
        raise ValueError(
            f"pseudo-labelling needs CLIP text features of the attribute words, and {type(learner).__name__} has "
            "neither a prompt_robust ClipBackbone nor a fixed_text_features(texts) method. Give it "
            "fixed_text_features(texts) -> (n, embed_dim) in the space of image_features(), or use "
            "DebiasConfig(mode='oracle'|'groupdro'|'jtt') with group labels."
        )

    def encode_with_backbone(texts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return backbone.encode_text(backbone.tokenize(list(texts)))

    return encode_with_backbone


@torch.no_grad()
def attribute_text_features(
    learner: nn.Module, attribute_values: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """Zero-shot classifier of the attribute: one normalised text feature per value, averaged over templates.

    Uses ``learner.fixed_text_features(texts)`` (every reference learner has it; it caches) or, for a custom
    learner, the ClipBackbone it holds.

    Args:
        learner: a prompt learner (its frozen CLIP text tower is used, never its learned prompt).
        attribute_values: the attribute's values in words, ``>= 2``, distinct.
        templates: prompts with one ``{}`` placeholder for the value.

    Returns:
        ``(n_values, embed_dim)`` L2-normalised features.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> from prompt_robust.learners import ZeroShotCLIP
        >>> learner = ZeroShotCLIP(tiny_clip_backbone(layers=1), ["cat", "dog"])
        >>> attribute_text_features(learner, ["grass", "water"]).shape[0]
        2
    """
    values, templates = _check_values(attribute_values, templates)
    texts = [template.format(value) for value in values for template in templates]
    features = _text_encoder(learner)(texts).detach().float()  # (A * T, d)
    if features.dim() != 2 or features.shape[0] != len(texts):
        raise ValueError(
            f"text features of {len(texts)} prompts must have shape ({len(texts)}, embed_dim); got "
            f"{tuple(features.shape)}."
        )
    features = F.normalize(features, dim=-1).reshape(len(values), len(templates), -1)  # (A, T, d)
    return F.normalize(features.mean(dim=1), dim=-1)  # (A, d)


def classify_attributes(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-attribute of each image: the value of highest cosine similarity.

    Args:
        image_features: ``(b, d)`` image features (normalised here).
        text_features: ``(n_values, d)`` from :func:`attribute_text_features`.

    Returns:
        ``(labels (b,), similarities (b, n_values))``.

    Example:
        >>> labels, _ = classify_attributes(torch.tensor([[1.0, 0.1], [0.2, -1.0]]), torch.eye(2))
        >>> labels.tolist()
        [0, 0]
    """
    if image_features.dim() != 2 or image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and attribute text features {tuple(text_features.shape)} "
            "must be (b, d) and (n_values, d) in the same embedding space; does image_features() return CLIP's "
            "projected features?"
        )
    text = text_features.to(image_features.device, torch.float32)
    similarity = F.normalize(image_features.detach().float(), dim=-1) @ text.t()  # (b, A)
    return similarity.argmax(dim=-1), similarity


@torch.no_grad()
def pseudo_attribute_labels(
    learner: nn.Module,
    dataset: Dataset,
    attribute_values: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Zero-shot pseudo-attribute of every image of ``dataset`` (reads only ``pixel_values`` of each item).

    Paper: https://arxiv.org/abs/2503.08368

    Args:
        learner: a prompt learner; ``learner.image_features(x)`` (prompt-free) and its frozen text tower are used.
        dataset: items with ``"pixel_values"`` (dicts) or ``(pixel_values, label)`` pairs.
        attribute_values: the attribute's values in words, in the order pseudo-labels index them.
        templates: zero-shot prompts, ``{}`` = a value.
        batch_size: images per forward pass.
        progress: show a progress bar.

    Returns:
        ``(n,)`` long tensor of indices into ``attribute_values``.

    Example:
        >>> pseudo = pseudo_attribute_labels(learner, train, ["land background", "water background"])  # doctest: +SKIP
        >>> pseudo_label_accuracy(pseudo, train.attributes)  # reporting only  # doctest: +SKIP
        0.93
    """
    text = attribute_text_features(learner, attribute_values, templates)
    out = []
    for _, batch in iterate_batches(dataset, batch_size, ["pixel_values"], desc="pseudo-labels", progress=progress):
        pixel_values = batch["pixel_values"].to(text.device)
        labels, _ = classify_attributes(learner.image_features(pixel_values), text)
        out.append(labels.cpu())
    return torch.cat(out)


def pseudo_label_accuracy(pseudo_labels: Any, true_attributes: Any) -> float:
    """Fraction of pseudo-labels equal to the true attribute (reporting only: nothing in the weighting calls it).

    The true ids must index the same values in the same order as ``attribute_values`` (Waterbirds' places are
    ``["land", "water"]``, CelebA's spurious attribute ``["not male", "male"]``).

    Args:
        pseudo_labels: ``(n,)`` pseudo-attribute ids.
        true_attributes: ``(n,)`` true attribute ids.

    Example:
        >>> pseudo_label_accuracy([0, 1, 1, 0], [0, 1, 0, 0])
        0.75
    """
    from .eval.metrics import accuracy

    return accuracy(torch.as_tensor(pseudo_labels).flatten(), torch.as_tensor(true_attributes).flatten())
