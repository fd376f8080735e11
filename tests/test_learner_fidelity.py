"""The learners as their papers and reference code define them, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import prompt_robust as pr
from prompt_robust.learners.base import ClassPrompts


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


def _tokens(backbone, text: str) -> list[int]:
    """The token ids of ``text`` between BOS and EOT."""
    ids = backbone.tokenize([text])[0]
    return ids[1 : int(backbone.eot_positions(ids[None])[0])].tolist()


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_names_with_punctuation_move_as_the_reference_moves_them(backbone, position):
    """CoOp's reference moves the bare name's token count (``len(tokenize(name))``) of the "{name}." tokens; a name
    ending in punctuation that merges with the "." (CLIP's BPE: "church (outdoor)." ends in one ")." token) must
    move that merged token with it, not leave it behind."""
    names = ["church (outdoor)", "cat!", "dog"]
    n_ctx = 4
    prompts = ClassPrompts(backbone, names, n_ctx, position)
    bos = int(backbone.tokenize(["x"])[0, 0])
    merged = 0
    for row, name in enumerate(names):
        text = _tokens(backbone, f"{name}.")  # name and "." as they appear in the prompt
        k = len(_tokens(backbone, name))  # the reference's name_len
        merged += k == len(text)
        ctx = [bos] * n_ctx  # placeholders (their embeddings are replaced by the context)
        if position == "front":
            body = text[:k] + ctx + text[k:]
        else:
            body = ctx[: n_ctx // 2] + text[:k] + ctx[n_ctx // 2 :] + text[k:]
        ids = prompts.input_ids[row].tolist()
        eot = int(backbone.eot_positions(prompts.input_ids[row : row + 1])[0])
        assert ids[: eot + 1] == [bos, *body, ids[eot]], name
    if type(backbone).__name__ == "OpenClipBackbone":  # CLIP's real BPE: the case is exercised
        assert merged >= 1


def test_maple_defaults_to_the_papers_two_learned_tokens_with_of_a_fixed(bb):
    """MaPLe's repository: "a photo of a {class}." with the first N_CTX=2 tokens learned (initialised from "a
    photo"), "of a" fixed text; at initialisation the prompt's token embeddings are exactly the sentence's."""
    names = ["cat", "dog", "bird"]
    learner = pr.build_learner("maple", bb, names, depth=2)
    assert learner.n_ctx == 2 and learner.prompt_tokens()["text"].shape == (2 * 2, bb.text_width)
    expected_ids = bb.tokenize([f"a photo of a {name}." for name in names])
    assert torch.equal(learner.prompts.input_ids, expected_ids)
    with torch.no_grad():
        built = learner.prompts.assemble(learner.text_prompts[0].unsqueeze(0))
        torch.testing.assert_close(built, bb.token_embedding(expected_ids), rtol=0, atol=0)
        moved = learner.prompts.assemble(torch.zeros(1, 2, bb.text_width))
    assert moved[:, 1:3].abs().sum() == 0 and torch.equal(moved[:, 3:], built[:, 3:])  # only "a photo" is learned
    every = pr.build_learner("maple", bb, names, depth=2, ctx_layout="all")  # the other layout stays selectable
    assert every.n_ctx == len(_tokens(bb, "a photo of a"))
    with pytest.raises(ValueError, match=r"n_ctx=9 learned tokens must lie in 1\.\."):
        pr.build_learner("maple", bb, names, depth=2, n_ctx=9)
