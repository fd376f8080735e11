"""A user's own learner, written here and not in the package, wraps through the documented contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import CLASSNAMES
from torch import nn

import prompt_robust as pr


# --- the user's code: a learned bias on the class text features (25 lines, see docs/learner_contract.md) ---
class MyTextBias(nn.Module):
    def __init__(self, backbone, classnames):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        with torch.no_grad():
            ids = backbone.tokenize([f"a photo of a {c}." for c in classnames])
            self.register_buffer("class_text", F.normalize(backbone.encode_text(ids), dim=-1), persistent=False)
        self.bias = nn.Parameter(torch.zeros(2, backbone.embed_dim))  # (n_tokens, dim)

    def prompt_tokens(self):
        return {"text_bias": self.bias}

    def image_features(self, pixel_values):
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(pixel_values), dim=-1)

    def forward(self, pixel_values, prompt_override=None):
        bias = self.bias.sum(0) if not prompt_override else prompt_override["text_bias"].sum(1)[:, None]
        text = F.normalize(self.class_text + bias, dim=-1)  # (n_cls, d) or (b, n_cls, d)
        image = self.image_features(pixel_values)
        logits = image @ text.t() if text.dim() == 2 else torch.einsum("bd,bcd->bc", image, text)
        return self.backbone.logit_scale * logits


# --- end of the user's code ---


def test_custom_learner_wraps_trains_and_round_trips(hf_backbone, images, tmp_path):
    learner = MyTextBias(hf_backbone, CLASSNAMES)
    model = pr.wrap(learner, pr.RobustConfig())
    out = model(images, labels=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out.logits, learner(images))
    out.loss.backward()
    assert learner.bias.grad is not None and learner.bias.grad.abs().sum() > 0
    with torch.no_grad():
        learner.bias.add_(torch.randn_like(learner.bias))
    expected = model(images).logits
    assert list(model.trainable_state_dict()) == ["learner.bias"]
    model.save_pretrained(tmp_path / "mine")
    fresh = MyTextBias(hf_backbone, CLASSNAMES)
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "mine", learner=fresh)
    torch.testing.assert_close(loaded(images).logits, expected)
    assert model.unwrap() is learner


def test_module_missing_the_contract_is_refused():
    class NotALearner(nn.Module):
        def forward(self, x):
            return x

    try:
        pr.wrap(NotALearner())
    except TypeError as err:
        assert "prompt_tokens" in str(err) and "image_features" in str(err) and "learner_contract" in str(err)
    else:  # pragma: no cover - the test fails here
        raise AssertionError("wrap() accepted a module without the learner contract")
