"""Where the mini-CLIPs shipped with the package live (``load_backbone("embedded")`` / ``"embedded-v1"``).

The weights sit in ``prompt_robust/assets/`` (installed as package data). They are made by the synthetic
benchmark's pretraining (:mod:`prompt_robust.bench.pretrain`, ``prompt-robust pretrain-backbone``), whose
``pretrain_record.json`` beside the weights holds the command that recreates them; loading them needs nothing
from the benchmark, so the paths live here, in the core.

Example:
    >>> (EMBEDDED_DIR / "model.safetensors").is_file()
    True
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED_DIR", "EMBEDDED_V1_DIR"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: where the shipped mini-CLIP lives inside the package (pretrained on world 2)
EMBEDDED_DIR = _ASSETS / "mini_clip"
#: the first mini-CLIP, pretrained on world 1 (32 px): ``load_backbone("embedded-v1")``
EMBEDDED_V1_DIR = _ASSETS / "mini_clip_v1"
