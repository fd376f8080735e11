"""Text-sequence trimming: ``encode_text`` runs the text tower only up to the batch's last pooled (EOT) position.

The towers are causal and pool one position per sequence, so the trimmed features must equal the full-length
ones (to float rounding) for every learner, both backbones, every class-token position, deep text prompts and
per-sample chunks; and the trimmed run must really run fewer positions (a hook on the first text block counts).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import BACKBONES, CLASSNAMES, LEARNER_KWARGS, LEARNER_NAMES, make_backbone

from prompt_robust.learners import build_learner

torch.set_num_threads(1)

TOL = 1e-5  # fp32: the trimmed and full runs differ only by the order of float operations
# class names of different token lengths, so per-chunk lengths differ
UNEVEN = ["cat", "dog", "a large boat", "one small house tree"]


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    """One tiny backbone of each kind per module (learners freeze it; nothing here modifies it for good)."""
    return make_backbone(request.param)


@contextmanager
def seen_lengths(backbone):
    """Record the sequence length the first text block receives, one entry per text pass."""
    lengths: list[int] = []
    dim = 1 if backbone.layers_batch_first else 0

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        lengths.append(int(hidden.shape[dim]))

    handle = backbone.text_layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


def run(learner, images, trim: bool, **kwargs):
    """The learner's output with trimming on or off, caches dropped so the text tower really runs."""
    learner.backbone.trim_text = trim
    learner.__dict__.pop("_text_cache", None)
    try:
        with seen_lengths(learner.backbone) as lengths:
            out = learner(images, **kwargs)
    finally:
        learner.backbone.trim_text = True
    return out, lengths


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# every learner, both backbones
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_learner_features_equal_untrimmed(name, backbone, images):
    torch.manual_seed(0)
    learner = build_learner(name, backbone, CLASSNAMES, **LEARNER_KWARGS[name]).eval()
    with torch.no_grad():
        full, full_lengths = run(learner, images, trim=False)
        trimmed, trimmed_lengths = run(learner, images, trim=True)
    context = backbone.context_length
    assert full_lengths and set(full_lengths) == {context}
    assert trimmed_lengths and max(trimmed_lengths) < context  # it really trimmed
    assert max_diff(trimmed.text_features, full.text_features) <= TOL
    assert max_diff(trimmed.logits, full.logits) <= 100 * TOL  # logits are scaled by ~1/0.07


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_positions(position, backbone, images):
    torch.manual_seed(0)
    learner = build_learner("coop", backbone, UNEVEN, n_ctx=4, class_token_position=position).eval()
    ids = learner.prompts.input_ids
    expected = int(backbone.eot_positions(ids).max()) + 1
    with torch.no_grad():
        full, _ = run(learner, images, trim=False)
        trimmed, lengths = run(learner, images, trim=True)
    assert lengths == [expected] and expected < backbone.context_length
    assert max_diff(trimmed.text_features, full.text_features) <= TOL


def test_gradients_equal_untrimmed(backbone, images):
    """Training is unchanged too: the context receives the same gradient."""
    torch.manual_seed(0)
    learner = build_learner("coop", backbone, UNEVEN, n_ctx=4)
    labels = torch.tensor([0, 1, 2])
    grads = []
    for trim in (False, True):
        learner.ctx.grad = None
        out, _ = run(learner, images, trim=trim)
        torch.nn.functional.cross_entropy(out.logits, labels).backward()
        grads.append(learner.ctx.grad.clone())
    scale = float(grads[0].abs().max())  # gradients of O(1)-O(10): compare relative to their size
    assert scale > 0
    assert max_diff(grads[1], grads[0]) <= TOL * max(1.0, scale)


# ---------------------------------------------------------------------------------------------------------------
# per-sample prompts: trimmed per chunk
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_cocoop_per_sample_prompts_are_trimmed_per_chunk(chunk, backbone, images):
    torch.manual_seed(0)
    learner = build_learner("cocoop", backbone, UNEVEN, text_chunk_size=chunk).eval()
    eot = backbone.eot_positions(learner.prompts.input_ids)  # (n_cls,)
    flat = eot.repeat(images.shape[0])  # (b * n_cls,) in encode_prompts' order
    step = chunk or len(flat)
    expected = [int(flat[i : i + step].max()) + 1 for i in range(0, len(flat), step)]
    override = {"text": torch.randn(images.shape[0], *learner.ctx.shape)}
    with torch.no_grad():
        full, _ = run(learner, images, trim=False, prompt_override=override)
        trimmed, lengths = run(learner, images, trim=True, prompt_override=override)
    assert lengths == expected
    if chunk == 1:
        assert len(set(lengths)) > 1  # the class names' lengths differ, so do the passes
    assert trimmed.text_features.shape == (images.shape[0], len(UNEVEN), backbone.embed_dim)
    assert max_diff(trimmed.text_features, full.text_features) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# deep text prompts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [2, None])
def test_maple_deep_text_prompts_per_sample(chunk, backbone, images):
    torch.manual_seed(0)
    learner = build_learner("maple", backbone, UNEVEN, depth=2, text_chunk_size=chunk).eval()
    override = {"text": torch.randn(images.shape[0], *learner.prompt_tokens()["text"].shape)}
    with torch.no_grad():
        full, _ = run(learner, images, trim=False, prompt_override=override)
        trimmed, lengths = run(learner, images, trim=True, prompt_override=override)
        shared, _ = run(learner, images, trim=True)
    assert max(lengths) < backbone.context_length
    assert max_diff(trimmed.text_features, full.text_features) <= TOL
    assert max_diff(trimmed.text_features, shared.text_features) > 1e-3  # the deep prompts really act


def test_deep_prompts_longer_than_the_text_keep_their_slots(backbone):
    """Deep prompts reaching past a short text's EOT widen the kept prefix to ``1 + n_tokens``."""
    ids = backbone.tokenize(["cat.", "dog."])
    eot = int(backbone.eot_positions(ids).max())
    n_tokens = eot + 3
    generator = torch.Generator().manual_seed(0)
    deep = {1: torch.randn(2, n_tokens, backbone.text_width, generator=generator)}
    assert backbone.text_length(ids) == eot + 1
    assert backbone.text_length(ids, deep) == 1 + n_tokens
    with torch.no_grad(), seen_lengths(backbone) as lengths:
        trimmed = backbone.encode_text(ids, deep_prompts=deep)
    full = backbone.encode_text(ids, deep_prompts=deep, trim=False)
    assert lengths == [1 + n_tokens]
    assert max_diff(trimmed, full) <= TOL
    assert max_diff(trimmed, backbone.encode_text(ids)) > 1e-3  # the deep prompts replaced the EOT state


def test_deep_prompts_that_do_not_fit_are_still_refused(backbone):
    ids = backbone.tokenize(["cat."])
    too_many = {1: torch.zeros(backbone.context_length, backbone.text_width)}
    for trim in (True, False):
        with pytest.raises(ValueError, match="do not fit"):
            backbone.encode_text(ids, deep_prompts=too_many, trim=trim)


# ---------------------------------------------------------------------------------------------------------------
# edge cases and the switch
# ---------------------------------------------------------------------------------------------------------------
def test_text_filling_the_context(backbone):
    """An EOT at the last position: nothing to trim, and a short text beside it is not cut either."""
    context = backbone.context_length
    full_text = " ".join(["cat"] * (context - 2))  # BOS + (context - 2) words + EOT
    ids = backbone.tokenize([full_text, "dog."])
    assert backbone.eot_positions(ids).tolist()[0] == context - 1
    assert backbone.text_length(ids) == context
    with torch.no_grad(), seen_lengths(backbone) as lengths:
        trimmed = backbone.encode_text(ids)
    assert lengths == [context]
    assert max_diff(trimmed, backbone.encode_text(ids, trim=False)) <= TOL
    # the short text alone is trimmed and gets the same feature as beside the long one
    short = backbone.encode_text(ids[1:])
    assert max_diff(short, trimmed[1:]) <= TOL


def test_token_embeds_are_trimmed_with_the_ids(backbone):
    ids = backbone.tokenize(["a photo of a cat.", "dog."])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeds = backbone.token_embedding(ids) + 0.1 * torch.randn(*ids.shape, backbone.text_width, generator=generator)
        trimmed = backbone.encode_text(ids, token_embeds=embeds)
        full = backbone.encode_text(ids, token_embeds=embeds, trim=False)
        plain = backbone.encode_text(ids)
    assert max_diff(trimmed, full) <= TOL
    assert max_diff(trimmed, plain) > 1e-3  # the embeddings really replaced the lookup


def test_trim_switch_attribute_and_argument(backbone):
    ids = backbone.tokenize(["a photo of a cat."])
    context = backbone.context_length
    short = int(backbone.eot_positions(ids)[0]) + 1
    with torch.no_grad(), seen_lengths(backbone) as lengths:
        backbone.encode_text(ids)
        backbone.encode_text(ids, trim=False)
        backbone.trim_text = False
        try:
            backbone.encode_text(ids)
            backbone.encode_text(ids, trim=True)
        finally:
            backbone.trim_text = True
    assert lengths == [short, context, context, short]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.modules())  # no hook left behind
