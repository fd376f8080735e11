"""CLIP backbones behind one protocol (:class:`ClipBackbone`).

``load_backbone`` builds one from a short spec string, so configs and the CLI can name a backbone:

* ``embedded``: the mini-CLIP shipped with the package (pretrained on the procedural world);
* ``hf:/path/to/dir`` (or a bare directory path): a transformers CLIP checkpoint saved with ``save_pretrained``;
* ``open_clip:ViT-B-16`` (random init) or ``open_clip:ViT-B-16:/path/weights.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import BackboneIdentity, ClipBackbone
from .hf_clip import HFClipBackbone

__all__ = ["BACKBONES", "BackboneIdentity", "ClipBackbone", "HFClipBackbone", "load_backbone", "register_backbone"]

#: ``<prefix>`` of a ``<prefix>:<rest>`` spec -> the function building a backbone from ``<rest>``
BACKBONES: dict[str, Callable[[str], ClipBackbone]] = {}


def register_backbone(prefix: str) -> Callable[[Callable[[str], ClipBackbone]], Callable[[str], ClipBackbone]]:
    """Decorator registering a loader for specs ``<prefix>:<rest>``: adding a backbone family = one module with a
    :class:`ClipBackbone` subclass + this one line.

    Example:
        >>> @register_backbone("my_clip")
        ... def _load(rest: str) -> ClipBackbone: ...
        >>> "my_clip" in BACKBONES
        True
        >>> del BACKBONES["my_clip"]
    """
    if not (prefix.isidentifier() and len(prefix) > 1):  # one letter would shadow Windows drive letters
        raise ValueError(f"a backbone prefix must be an identifier of 2+ characters; got {prefix!r}.")

    def register(loader: Callable[[str], ClipBackbone]) -> Callable[[str], ClipBackbone]:
        if prefix in BACKBONES and BACKBONES[prefix] is not loader:
            raise ValueError(f"backbone prefix {prefix!r} is already registered.")
        BACKBONES[prefix] = loader
        return loader

    return register


@register_backbone("hf")
def _load_hf(rest: str) -> ClipBackbone:
    return HFClipBackbone.from_pretrained(rest)


@register_backbone("open_clip")
def _load_open_clip(rest: str) -> ClipBackbone:
    from .open_clip import OpenClipBackbone  # open_clip is an optional extra: imported only when asked for

    model_name, _, weights = rest.partition(":")
    return OpenClipBackbone.from_pretrained(model_name, weights or None)


def load_backbone(spec: str | Path) -> ClipBackbone:
    """Build a backbone from a spec string (see the module docstring).

    Args:
        spec: ``embedded``, ``hf:<dir>``, ``<dir>``, ``open_clip:<model>``,
            ``open_clip:<model>:<weights.safetensors>``, or ``<prefix>:<rest>`` of a registered backbone family.

    Example:
        >>> load_backbone("hf:/models/clip-vit-b16")  # doctest: +SKIP
    """
    spec = str(spec)
    if spec in ("embedded", "embedded-v1"):
        from .embedded import EMBEDDED_DIR, EMBEDDED_V1_DIR

        directory = EMBEDDED_DIR if spec == "embedded" else EMBEDDED_V1_DIR
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded mini-CLIP is missing from {directory}; reinstall prompt_robust or recreate it with "
                "`prompt-robust pretrain-backbone` (its pretrain_record.json has the command)."
            )
        return HFClipBackbone.from_pretrained(directory)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in BACKBONES:
        return BACKBONES[prefix](rest)
    return HFClipBackbone.from_pretrained(spec)  # a bare directory of a transformers CLIP checkpoint
