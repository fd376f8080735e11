"""OpenClipBackbone on a tiny open_clip CLIP with the real BPE tokenizer (built in-process, no downloads)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import import_optional

open_clip = import_optional("open_clip")

from prompt_robust.backbones.open_clip import OpenClipBackbone, tiny_open_clip_backbone  # noqa: E402
from prompt_robust.learners import build_learner  # noqa: E402

torch.set_num_threads(1)

CLASSNAMES = ["cat", "dog", "bird", "fish"]
EOT_ID = 49407
TINY_CFG = {  # what tiny_open_clip_backbone() builds, as an open_clip model config
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def backbone() -> OpenClipBackbone:
    return tiny_open_clip_backbone(seed=0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ids(backbone) -> torch.Tensor:
    return backbone.tokenize(["a photo of a cat.", "dog", "an itap of a large boat."])


def _no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# text tower
# ---------------------------------------------------------------------------------------------------------------
def test_dims_and_layout(backbone):
    assert backbone.dims == {
        "embed_dim": 32,
        "text_width": 32,
        "vision_width": 32,
        "image_size": 32,
        "context_length": 32,
        "vocab_size": 49408,
        "num_text_layers": 2,
        "num_vision_layers": 2,
    }
    # open_clip >= 2.24 runs its blocks batch-first; the adapter must follow the model, not a default.
    assert backbone.layers_batch_first is backbone.model.transformer.batch_first is True
    assert backbone.backbone_type == "open_clip"
    assert backbone.logit_scale.dim() == 0
    torch.testing.assert_close(backbone.logit_scale, torch.tensor(1 / 0.07))


def test_token_embeds_equal_to_lookup_give_identical_features(backbone, ids):
    plain = backbone.encode_text(ids)
    with torch.no_grad():
        embeds = backbone.token_embedding(ids)
    assert torch.equal(backbone.encode_text(ids, token_embeds=embeds), plain)
    # and the hook really is where encode_text reads embeddings: other embeddings, other features
    other = backbone.encode_text(ids, token_embeds=embeds + 0.1 * torch.randn_like(embeds))
    assert (other - plain).abs().max() > 1e-3


def test_eot_positions_are_where_open_clip_pools(backbone, ids):
    eot = backbone.eot_positions(ids)
    assert eot.tolist() == [row.index(EOT_ID) for row in ids.tolist()]
    with torch.no_grad():
        embeds = backbone.token_embedding(ids)
    plain = backbone.encode_text(ids)
    rows = torch.arange(ids.shape[0])
    # a random push (a constant shift would vanish in the LayerNorms)
    push = torch.randn(ids.shape[0], backbone.text_width, generator=torch.Generator().manual_seed(1))
    at_eot, after_eot = embeds.clone(), embeds.clone()
    at_eot[rows, eot] += push
    after_eot[rows, eot + 1] += push
    # the causal mask hides later tokens from the pooled one: only the EOT position and before matter
    assert torch.equal(backbone.encode_text(ids, token_embeds=after_eot), plain)
    changed = backbone.encode_text(ids, token_embeds=at_eot)
    assert ((changed - plain).abs().amax(dim=-1) > 1e-3).all()


def test_eos_pooling_reads_first_eos(backbone, ids):
    model = tiny_open_clip_backbone(seed=0).model
    model.text_pool_type, model.text_eos_id = "eos", EOT_ID
    eos = OpenClipBackbone(model, backbone.tokenizer)
    assert torch.equal(eos.eot_positions(ids), backbone.eot_positions(ids))
    assert torch.equal(eos.encode_text(ids), backbone.encode_text(ids))


@pytest.mark.parametrize("pool", ["first", "last", "none"])
def test_pooling_away_from_eot_is_refused(backbone, pool):
    model = tiny_open_clip_backbone(seed=0).model
    model.text_pool_type = pool
    with pytest.raises(NotImplementedError, match=pool):
        OpenClipBackbone(model, backbone.tokenizer)


def test_deep_text_prompts_equal_to_layer_output_change_nothing(backbone, ids):
    # Replacing layer 1's input tokens 1..n by exactly what layer 0 produced there must be a no-op: this pins
    # down the hook's layout (batch_first) and positions.
    captured = {}
    handle = backbone.text_layers[0].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    plain = backbone.encode_text(ids)
    handle.remove()
    same = captured["x"][:, 1:5]  # (b, 4, w)
    assert torch.equal(backbone.encode_text(ids, deep_prompts={1: same}), plain)
    other = backbone.encode_text(ids, deep_prompts={1: torch.randn(4, backbone.text_width)})
    assert (other - plain).abs().max() > 1e-3


def test_tokenize_fits_exactly_and_refuses_longer_texts(backbone):
    fits = " ".join(["word"] * 30)  # 30 tokens + BOS + EOT = the context length 32
    ids = backbone.tokenize([fits])
    assert ids.shape == (1, 32) and ids[0, -1] == EOT_ID
    with pytest.raises(ValueError, match=r"33 tokens long.*context length 32"):
        backbone.tokenize(["a", fits + " word"])


# ---------------------------------------------------------------------------------------------------------------
# image tower
# ---------------------------------------------------------------------------------------------------------------
def test_patch_tokens_hook_sees_embedded_tokens_before_ln_pre(backbone, images):
    visual = backbone.model.visual
    with torch.no_grad():
        patches = visual.conv1(images).flatten(2).transpose(1, 2)  # (b, 16, w)
        cls = visual.class_embedding.expand(images.shape[0], 1, -1)  # (b, 1, w)
        expected = torch.cat([cls, patches], dim=1) + visual.positional_embedding  # (b, 17, w)
    seen = []

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens)
        return tokens

    handle = backbone._register_patch_tokens_hook(fn)
    try:
        hooked = backbone.encode_image(images)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], expected)
    assert torch.equal(hooked, backbone.encode_image(images))


def test_visual_prompts_and_deep_prompts_change_the_output(backbone, images):
    plain = backbone.encode_image(images)
    prompts = torch.randn(4, backbone.vision_width)
    shallow = backbone.encode_image(images, prompts=prompts)
    assert shallow.shape == plain.shape and (shallow - plain).abs().max() > 1e-3
    deep = backbone.encode_image(images, prompts=prompts, deep_prompts={1: torch.randn(3, 4, backbone.vision_width)})
    assert (deep - shallow).abs().amax(dim=-1).min() > 1e-4  # every sample got its own deep prompts
    with pytest.raises(ValueError, match="pass `prompts`"):
        backbone.encode_image(images, deep_prompts={1: prompts})


def test_prompted_image_features_match_a_hand_written_vpt_forward(backbone, images):
    # VPT / MaPLe as in their reference code: prompts after CLS, before ln_pre, no position embedding; deep
    # prompts replace the same positions before later blocks; the class token is pooled.
    visual = backbone.model.visual
    prompts, deep = torch.randn(4, backbone.vision_width), torch.randn(3, 4, backbone.vision_width)
    with torch.no_grad():
        patches = visual.conv1(images).flatten(2).transpose(1, 2)  # (b, 16, w)
        tokens = torch.cat([visual.class_embedding.expand(3, 1, -1), patches], dim=1) + visual.positional_embedding
        tokens = torch.cat([tokens[:, :1], prompts.expand(3, -1, -1), tokens[:, 1:]], dim=1)  # (b, 21, w)
        tokens = visual.transformer.resblocks[0](visual.ln_pre(tokens))
        tokens = visual.transformer.resblocks[1](torch.cat([tokens[:, :1], deep, tokens[:, 5:]], dim=1))
        expected = visual.ln_post(tokens[:, 0]) @ visual.proj  # (b, d)
        got = backbone.encode_image(images, prompts=prompts, deep_prompts={1: deep})
    torch.testing.assert_close(got, expected)


def test_deep_visual_prompts_equal_to_layer_output_change_nothing(backbone, images):
    prompts = torch.randn(4, backbone.vision_width)
    captured = {}
    handle = backbone.vision_layers[0].register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    shallow = backbone.encode_image(images, prompts=prompts)
    handle.remove()
    same = captured["x"][:, 1:5]  # (b, 4, w): what layer 0 made of the inserted prompts
    assert torch.equal(backbone.encode_image(images, prompts=prompts, deep_prompts={1: same}), shallow)


def test_wrong_pixel_size_raises(backbone):
    with pytest.raises(ValueError, match=r"expects \(batch, 3, 32, 32\)"):
        backbone.encode_image(torch.zeros(2, 3, 64, 64))


def test_prompted_calls_leave_the_raw_model_bit_identical(backbone, ids, images):
    model = backbone.model
    with torch.no_grad():
        text_before, image_before = model.encode_text(ids), model.encode_image(images)
        embeds = backbone.token_embedding(ids) + 0.5
    backbone.encode_text(ids, token_embeds=embeds, deep_prompts={1: torch.randn(2, backbone.text_width)})
    prompts = torch.randn(4, backbone.vision_width)
    backbone.encode_image(images, prompts=prompts, deep_prompts={1: prompts})
    assert _no_hooks_left(model)
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), text_before)
        assert torch.equal(model.encode_image(images), image_before)


# ---------------------------------------------------------------------------------------------------------------
# construction and loading
# ---------------------------------------------------------------------------------------------------------------
def test_resnet_tower_is_refused(backbone):
    cfg = open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=32, image_size=64)
    text = open_clip.CLIPTextCfg(context_length=32, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=text)
    with pytest.raises(TypeError, match="VisionTransformer"):
        OpenClipBackbone(model, backbone.tokenizer)
    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenClipBackbone.from_pretrained("RN50")


def test_unknown_model_name_lists_close_names():
    with pytest.raises(ValueError, match="Did you mean 'ViT-B-16'"):
        OpenClipBackbone.from_pretrained("ViT-B-61")


def test_weights_must_be_an_existing_local_safetensors_file(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors.*only local weight files"):
        OpenClipBackbone.from_pretrained("ViT-B-16", missing)
    with pytest.raises(FileNotFoundError, match="'openai'"):  # a pretrained tag is not a file
        OpenClipBackbone.from_pretrained("ViT-B-16", "openai")
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"not a \.safetensors file.*Convert it"):
        OpenClipBackbone.from_pretrained("ViT-B-16", pickled)
    with pytest.raises(ValueError, match="not a file"):
        OpenClipBackbone.from_pretrained("ViT-B-16", tmp_path)
    with pytest.raises(ValueError, match="never downloads"):
        OpenClipBackbone.from_pretrained("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")


def test_from_pretrained_loads_safetensors_into_a_registered_config(backbone, ids, images, tmp_path, monkeypatch):
    from open_clip import factory
    from safetensors.torch import save_file

    # keep open_clip's global config registry as it was once the test is over
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    (tmp_path / "prtest-tiny-clip.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(tmp_path / "prtest-tiny-clip.json")
    weights = tmp_path / "open_clip_model.safetensors"
    save_file(backbone.model.state_dict(), str(weights))

    loaded = OpenClipBackbone.from_pretrained("prtest-tiny-clip", weights)
    assert loaded.name == str(weights.resolve()) and not loaded.model.training
    assert loaded.fingerprint() == backbone.fingerprint()
    assert torch.equal(loaded.tokenize(["a photo of a cat."]), backbone.tokenize(["a photo of a cat."]))
    torch.testing.assert_close(loaded.encode_text(ids), backbone.encode_text(ids), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image(images), backbone.encode_image(images), rtol=0, atol=0)
    # without weights: the same architecture, randomly initialised
    fresh = OpenClipBackbone.from_pretrained("prtest-tiny-clip")
    assert fresh.dims == backbone.dims and fresh.fingerprint() != backbone.fingerprint()


def test_missing_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'prompt_robust\[open_clip\]'"):
        tiny_open_clip_backbone()


# ---------------------------------------------------------------------------------------------------------------
# learners on the open_clip backbone
# ---------------------------------------------------------------------------------------------------------------
def test_coop_initialised_from_template_equals_zero_shot(backbone, images):
    zeroshot = build_learner("zeroshot", backbone, CLASSNAMES)  # template "a photo of a {}."
    coop = build_learner("coop", backbone, CLASSNAMES, ctx_init="a photo of a")
    with torch.no_grad():
        expected, got = zeroshot(images).logits, coop(images).logits
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("zeroshot", {}),
        ("coop", {"n_ctx": 16}),
        ("cocoop", {}),
        ("vpt", {"n_tokens": 4, "deep": True}),
        ("maple", {"depth": 2}),
    ],
)
def test_learners_run_and_train_only_their_own_parameters(name, kwargs, backbone, images):
    torch.manual_seed(0)
    learner = build_learner(name, backbone, CLASSNAMES, **kwargs)
    logits = learner(images).logits
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(logits).all()
    assert all(not p.requires_grad for p in backbone.parameters())
    own = [(n, p) for n, p in learner.named_parameters() if not n.startswith("backbone.")]
    if name == "zeroshot":
        assert not own and not logits.requires_grad
        return
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert own
    for param_name, param in own:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {param_name}"
