"""transformers CLIP: local checkpoints, EOT pooling, PEFT-wrapped models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLASSNAMES, make_backbone

import prompt_robust as pr
from prompt_robust.backbones import HFClipBackbone, load_backbone


def _manual_pooled_text(backbone, ids):
    """Text features computed from transformers' own last hidden state at the EOT we expect."""
    clip = backbone.clip
    hidden = clip.text_model(input_ids=ids).last_hidden_state  # (n, L, w), final layer norm applied
    eot = (ids == backbone.tokenizer.eos_token_id).int().argmax(-1)
    return clip.text_projection(hidden[torch.arange(len(ids)), eot])


def test_local_checkpoint_round_trip(hf_backbone, images, tmp_path):
    hf_backbone.clip.save_pretrained(tmp_path / "clip")
    hf_backbone.tokenizer.save_pretrained(tmp_path / "clip")
    for loaded in (HFClipBackbone.from_pretrained(tmp_path / "clip"), load_backbone(f"hf:{tmp_path / 'clip'}")):
        assert loaded.identity() == HFClipBackbone(hf_backbone.clip, hf_backbone.tokenizer, name=loaded.name).identity()
        torch.testing.assert_close(loaded.encode_image(images), hf_backbone.encode_image(images))
        ids = loaded.tokenize(["a photo of a cat."])
        torch.testing.assert_close(loaded.encode_text(ids), hf_backbone.encode_text(ids))


def test_missing_checkpoint_files_are_named(hf_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFClipBackbone.from_pretrained(tmp_path / "nowhere")
    hf_backbone.clip.save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer\.json or vocab\.json"):
        HFClipBackbone.from_pretrained(tmp_path / "no_tokenizer")


@pytest.mark.parametrize("legacy", [False, True])
def test_eot_pooling_reads_the_eot_token(legacy, hf_backbone):
    """Both of transformers' pooling rules must land on the EOT (the legacy one takes the largest id)."""
    if legacy:
        hf_backbone.clip.config.text_config.eos_token_id = 2
        hf_backbone.clip.text_model.eos_token_id = 2
        hf_backbone._eos_token_id = 2
    ids = hf_backbone.tokenize(["a photo of a cat.", "a dog"])
    eot = hf_backbone.eot_positions(ids)
    assert eot.tolist() == [7, 3]
    assert torch.all(ids[torch.arange(2), eot] == hf_backbone.tokenizer.eos_token_id)
    torch.testing.assert_close(hf_backbone.encode_text(ids), _manual_pooled_text(hf_backbone, ids))


def test_tokenizer_from_another_model_is_refused(hf_backbone):
    hf_backbone.clip.config.text_config.eos_token_id = 5
    with pytest.raises(ValueError, match="eos_token_id=5"):
        HFClipBackbone(hf_backbone.clip, hf_backbone.tokenizer)


def test_too_long_text_is_refused(hf_backbone):
    with pytest.raises(ValueError, match="context length"):
        hf_backbone.tokenize(["a " * 40 + "cat"])


def test_fingerprint_tells_weights_apart():
    assert make_backbone("hf", seed=0).fingerprint() != make_backbone("hf", seed=1).fingerprint()
    assert make_backbone("hf", seed=0).fingerprint() == make_backbone("hf", seed=0).fingerprint()


def test_peft_lora_backbone_trains_lora_and_prompts_together(images):
    import peft

    base = make_backbone("hf")
    lora = peft.get_peft_model(
        base.clip, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    )
    backbone = HFClipBackbone(lora, base.tokenizer, name="tiny+lora")
    assert backbone.is_peft
    # LoRA starts as the identity: same features as the plain model
    plain = make_backbone("hf")
    torch.testing.assert_close(backbone.encode_image(images), plain.encode_image(images))
    model = pr.wrap(pr.build_learner("maple", backbone, CLASSNAMES, depth=2))
    model(images, labels=torch.tensor([0, 1, 2])).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any(n.startswith("learner.text_prompts") for n in trained)
    for name, param in model.named_parameters():
        if "lora_B" in name or "text_prompts" in name:
            assert param.grad is not None, name
        if not param.requires_grad:
            assert param.grad is None, name
    # the base weights stayed frozen
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)


def test_peft_lora_recipe_round_trip(images, tmp_path):
    """The documented recipe: LoRA saved and loaded by PEFT itself, prompts and add-ons by prompt_robust."""
    import peft

    base = make_backbone("hf")
    lora = peft.get_peft_model(base.clip, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    backbone = HFClipBackbone(lora, base.tokenizer, name="tiny+lora")
    model = pr.wrap(pr.build_learner("coop", backbone, CLASSNAMES, n_ctx=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(images, labels=torch.tensor([0, 1, 2])).loss.backward()
        optimizer.step()
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)  # LoRA moved
    model.eval()
    with torch.no_grad():
        expected = model(images).logits
    lora.save_pretrained(tmp_path / "lora")  # PEFT's own adapter files
    model.save_pretrained(tmp_path / "prompts")  # the learner's prompt (+ add-ons), never backbone tensors
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    saved = set(json.loads((tmp_path / "prompts" / "adapter_config.json").read_text()))
    assert "robust_config" in saved

    fresh = make_backbone("hf")  # same seed: the same base weights, as a user's base checkpoint
    reloaded_lora = peft.PeftModel.from_pretrained(fresh.clip, tmp_path / "lora")
    backbone2 = HFClipBackbone(reloaded_lora, fresh.tokenizer, name="tiny+lora")
    model2 = pr.RobustPromptModel.from_pretrained(tmp_path / "prompts", backbone=backbone2).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(images).logits, expected)
    # the prompts alone on the base model (without the LoRA) are refused: another backbone
    with pytest.raises(ValueError, match=r"peft: adapter has 'default=LORA\(q_proj,v_proj;r=4\)'.*PeftModel"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "prompts", backbone=make_backbone("hf"))
