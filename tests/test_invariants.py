"""Ground-truth invariants that must hold exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSNAMES

import prompt_robust as pr


def test_coop_initialised_from_text_equals_zero_shot(backbone, images):
    """CoOp whose context is the embedding of "a photo of a" is zero-shot CLIP with "a photo of a {class}."."""
    zeroshot = pr.build_learner("zeroshot", backbone, CLASSNAMES, templates=["a photo of a {}."])
    coop = pr.build_learner("coop", backbone, CLASSNAMES, ctx_init="a photo of a")
    assert coop.n_ctx == 4
    # the assembled token ids are exactly the zero-shot prompt's ids
    expected_ids = backbone.tokenize([f"a photo of a {name}." for name in CLASSNAMES])
    eot = backbone.eot_positions(expected_ids)
    assert torch.equal(coop.prompts.input_ids[:, 5:], expected_ids[:, 5:])
    assert torch.equal(backbone.eot_positions(coop.prompts.input_ids), eot)
    expected = zeroshot(images).logits
    assert (coop(images).logits - expected).abs().max() < 1e-5
    # ... and still after wrap() with no add-on
    assert (pr.wrap(coop, pr.RobustConfig())(images).logits - expected).abs().max() < 1e-5


def test_cocoop_with_zero_meta_net_equals_coop(hf_backbone, images):
    cocoop = pr.build_learner("cocoop", hf_backbone, CLASSNAMES, ctx_init="a photo of a")
    torch.nn.init.zeros_(cocoop.meta_net[2].weight)
    torch.nn.init.zeros_(cocoop.meta_net[2].bias)
    coop = pr.build_learner("coop", hf_backbone, CLASSNAMES, ctx_init="a photo of a")
    out = cocoop(images)
    assert out.text_features.shape == (3, len(CLASSNAMES), hf_backbone.embed_dim)
    torch.testing.assert_close(out.logits, coop(images).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["vpt", "maple"])
def test_visual_prompts_change_image_features_only_through_prompts(name, hf_backbone, images):
    kwargs = {"vpt": {"n_tokens": 2}, "maple": {"depth": 2}}[name]
    learner = pr.build_learner(name, hf_backbone, CLASSNAMES, **kwargs)
    prompted = learner(images).image_features
    plain = learner.image_features(images)
    assert not torch.allclose(prompted, plain)
    assert torch.allclose(plain, torch.nn.functional.normalize(hf_backbone.encode_image(images), dim=-1))


def test_text_chunking_gives_identical_features(hf_backbone, images):
    full = pr.build_learner("cocoop", hf_backbone, CLASSNAMES)
    chunked = pr.build_learner("cocoop", hf_backbone, CLASSNAMES, text_chunk_size=5)
    chunked.load_state_dict(full.state_dict())
    torch.testing.assert_close(chunked(images).logits, full(images).logits, rtol=0, atol=1e-5)


def test_maple_per_sample_deep_prompts_match_a_loop_over_samples(hf_backbone, images):
    learner = pr.build_learner("maple", hf_backbone, CLASSNAMES, depth=2)
    base = learner.prompt_tokens()["text"].detach()
    override = base.unsqueeze(0) + 0.1 * torch.randn(3, *base.shape, generator=torch.Generator().manual_seed(0))
    batched = learner(images, prompt_override={"text": override}).logits
    for i in range(3):
        with torch.no_grad():
            learner.text_prompts.copy_(override[i].reshape_as(learner.text_prompts))
        single = learner(images[i : i + 1]).logits
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-5)
