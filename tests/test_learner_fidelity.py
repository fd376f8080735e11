"""The learners as their papers and reference code define them, checked against hand-computed values."""

from __future__ import annotations

import math

import torch

import prompt_robust as pr


def _set_scale(backbone, value: float) -> None:
    param = backbone.clip.logit_scale if hasattr(backbone, "clip") else backbone.model.logit_scale
    with torch.no_grad():
        param.fill_(math.log(value))


def test_logit_scale_is_not_clamped_at_inference(backbone):
    """CLIP, transformers and open_clip clamp the learned scale at 100 only while training CLIP; a checkpoint
    whose scale exceeds 100 predicts with its own scale (as in the learners' reference code)."""
    _set_scale(backbone, 150.0)
    assert float(backbone.logit_scale) == torch.tensor(math.log(150.0)).exp().item()
    learner = pr.build_learner("zeroshot", backbone, ["cat", "dog"])
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        out = learner(images)
        cosines = out.image_features @ out.text_features.t()
    torch.testing.assert_close(out.logits, 150.0 * cosines, rtol=1e-5, atol=1e-4)
