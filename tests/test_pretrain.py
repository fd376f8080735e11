"""The mini-CLIP pretraining stream: reproducible batches with hard-negative groups."""

from __future__ import annotations

import torch

from prompt_robust.backbones.tiny import build_clip_tokenizer, tiny_clip_backbone
from prompt_robust.bench import world
from prompt_robust.bench.pretrain import PretrainConfig, _Contrastive, _RenderBatch


def _collate(**kwargs):
    tokenizer = build_clip_tokenizer([" ".join(world.corpus_words())])
    backbone = tiny_clip_backbone(tokenizer, context_length=32)
    return _RenderBatch(
        PretrainConfig(**{"world_version": 1, "image_size": 32, "patch_size": 8, **kwargs}), backbone.tokenize
    ), backbone


def test_a_batch_is_a_pure_function_of_its_indices():
    collate, _ = _collate(group_size=6, grouped_fraction=0.5)
    a, b, c = collate(list(range(24))), collate(list(range(24))), collate(list(range(24, 48)))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert torch.equal(a["labels"], torch.arange(24))


def test_grouped_part_shares_colour_background_and_style_with_distinct_classes(monkeypatch):
    seen = {}
    original = world.render

    def spy(attrs, config=None):
        seen["attrs"] = attrs
        return original(attrs, config or world.WorldConfig())

    monkeypatch.setattr(world, "render", spy)
    collate, _ = _collate(group_size=6, grouped_fraction=0.5)
    collate(list(range(24)))
    attrs = seen["attrs"]
    for g in range(2):  # 24 * 0.5 = 12 grouped images = 2 groups of 6
        part = slice(6 * g, 6 * g + 6)
        for field in ("colour", "background", "style"):
            assert len(set(getattr(attrs, field)[part].tolist())) == 1, field
        assert len(set(attrs.class_idx[part].tolist())) == 6
    # the free part is not grouped
    assert len(set(attrs.colour[12:].tolist())) > 1


def test_contrastive_loss_is_symmetric_infonce():
    collate, backbone = _collate(group_size=1)
    batch = collate(list(range(8)))
    out = _Contrastive(backbone.clip)(batch["pixel_values"], batch["input_ids"])
    logits = out.logits
    targets = torch.arange(8)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(out.loss, (ce(logits, targets) + ce(logits.t(), targets)) / 2)
    assert logits.shape == (8, 8)
