"""The papers' own numbers, shown beside ours when the backbone has CLIP ViT-B/16's architecture.

Only numbers found in a stored public source are listed, each with that source; a table cell whose number was not
found stays empty (the table says so). Found so far: the base-to-new averages over the 11 datasets (3 seeds, 16
shots, ViT-B/16) in the README of ``muzairkhattak/multimodal-prompt-learning`` ("MaPLe in comparison with existing
methods": CLIP, CoOp, CoCoOp as reported in the CoCoOp paper's Table 1, and MaPLe; "Model Zoo": Deep Vision
Prompting, trained with the config of our ``vpt`` preset). Per-dataset, cross-dataset, domain-generalisation and
spurious-correlation numbers were not found in the stored sources.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PAPER_NUMBERS", "is_paper_backbone", "paper_numbers"]

_MAPLE_README = (
    "muzairkhattak/multimodal-prompt-learning README.md (average over 11 datasets, 3 seeds; CLIP, CoOp and CoCoOp "
    "as reported in the CoCoOp paper, Table 1)"
)
_MODEL_ZOO = "muzairkhattak/multimodal-prompt-learning README.md, Model Zoo: Deep Vision Prompting (configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml)"

#: ``{protocol: {(dataset, method): {"values": {metric: percent}, "source": text}}}``; dataset ``"average"`` is
#: the average row of the table
PAPER_NUMBERS: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "base2new": {
        ("average", "zeroshot"): {"values": {"base": 69.34, "new": 74.22, "hm": 71.70}, "source": _MAPLE_README},
        ("average", "coop"): {"values": {"base": 82.69, "new": 63.22, "hm": 71.66}, "source": _MAPLE_README},
        ("average", "cocoop"): {"values": {"base": 80.47, "new": 71.69, "hm": 75.83}, "source": _MAPLE_README},
        ("average", "maple"): {"values": {"base": 82.28, "new": 75.14, "hm": 78.55}, "source": _MAPLE_README},
        ("average", "vpt"): {"values": {"base": 80.24, "new": 73.43, "hm": 76.68}, "source": _MODEL_ZOO},
    },
    "cross_dataset": {},
    "domain_generalization": {},
    "spurious": {},
}


def paper_numbers(protocol: str, dataset: str, method: str) -> dict[str, Any] | None:
    """The paper's numbers for ``method`` on ``dataset`` of ``protocol`` (None: none found, or an add-on method,
    which no paper reports on these tables).

    Example:
        >>> paper_numbers("base2new", "average", "coop")["values"]["hm"]
        71.66
        >>> paper_numbers("base2new", "average", "coop+refiner") is None
        True
    """
    return PAPER_NUMBERS.get(protocol, {}).get((dataset, method))


#: CLIP ViT-B/16: joint space, tower widths, input size, context, depths; 14 x 14 patches + CLS
_VIT_B16 = {
    "embed_dim": 512,
    "text_width": 512,
    "vision_width": 768,
    "image_size": 224,
    "context_length": 77,
    "num_text_layers": 12,
    "num_vision_layers": 12,
}
_VIT_B16_TOKENS = (224 // 16) ** 2 + 1


def is_paper_backbone(backbone: Any) -> bool:
    """Whether ``backbone`` has CLIP ViT-B/16's architecture (the papers' backbone): its dimensions, and 197 vision
    positions (16-pixel patches; ViT-B/32 has the same widths with 50). The weights cannot be checked: the papers
    used OpenAI's.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> is_paper_backbone(tiny_clip_backbone(layers=1))
        False
    """
    dims = getattr(backbone, "dims", None)
    if not isinstance(dims, dict) or any(dims.get(k) != v for k, v in _VIT_B16.items()):
        return False
    for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
        lowered = name.lower()
        if "position" in lowered and ("vision" in lowered or "visual" in lowered) and isinstance(tensor, torch.Tensor):
            if tensor.dim() >= 1 and tensor.shape[-2 if tensor.dim() > 1 else 0] == _VIT_B16_TOKENS:
                return True
    return False
