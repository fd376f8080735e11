"""CLIP backbones behind one protocol (:class:`ClipBackbone`).

``load_backbone`` builds one from a short spec string, so configs and the CLI can name a backbone:

* ``embedded``: the mini-CLIP shipped with the package (pretrained on the procedural world);
* ``hf:/path/to/dir`` (or a bare directory path): a transformers CLIP checkpoint saved with ``save_pretrained``;
* ``open_clip:ViT-B-16`` (random init) or ``open_clip:ViT-B-16:/path/weights.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from .base import BackboneIdentity, ClipBackbone
from .hf_clip import HFClipBackbone

__all__ = ["BackboneIdentity", "ClipBackbone", "HFClipBackbone", "load_backbone"]


def load_backbone(spec: str | Path) -> ClipBackbone:
    """Build a backbone from a spec string (see the module docstring).

    Args:
        spec: ``hf:<dir>``, ``<dir>``, ``open_clip:<model>`` or ``open_clip:<model>:<weights.safetensors>``.

    Example:
        >>> load_backbone("hf:/models/clip-vit-b16")  # doctest: +SKIP
    """
    spec = str(spec)
    if spec in ("embedded", "embedded-v1"):
        from ..pretrain import EMBEDDED_DIR, EMBEDDED_V1_DIR

        directory = EMBEDDED_DIR if spec == "embedded" else EMBEDDED_V1_DIR
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded mini-CLIP is missing from {directory}; reinstall prompt_robust or recreate it with "
                "`prompt-robust pretrain-backbone` (its pretrain_record.json has the command)."
            )
        return HFClipBackbone.from_pretrained(directory)
    if spec.startswith("open_clip:"):
        from .open_clip import OpenClipBackbone

        model_name, _, weights = spec[len("open_clip:") :].partition(":")
        return OpenClipBackbone.from_pretrained(model_name, weights or None)
    return HFClipBackbone.from_pretrained(spec[len("hf:") :] if spec.startswith("hf:") else spec)
