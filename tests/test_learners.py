"""The learner matrix: every reference learner on every backbone, through wrap()."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSNAMES, LEARNER_KWARGS, LEARNER_NAMES, make_backbone

import prompt_robust as pr
from prompt_robust.learners import LearnerOutput

PROMPTED = [name for name in LEARNER_NAMES if name != "zeroshot"]


def build(name: str, backbone, classnames=CLASSNAMES, **kwargs):
    torch.manual_seed(0)
    return pr.build_learner(name, backbone, classnames, **{**LEARNER_KWARGS[name], **kwargs})


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_forward_shapes_and_wrap_identity(name, backbone, images):
    learner = build(name, backbone)
    out = learner(images)
    assert isinstance(out, LearnerOutput)
    assert out.logits.shape == (3, len(CLASSNAMES))
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    model = pr.wrap(learner, pr.RobustConfig())
    wrapped = model(images, labels=torch.tensor([0, 1, 2]))
    # no add-on: exactly the learner's logits
    assert torch.equal(wrapped.logits, learner(images).logits)
    assert torch.allclose(wrapped.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("name", PROMPTED)
def test_gradients_reach_only_prompt_parameters(name, backbone, images):
    model = pr.wrap(build(name, backbone))
    out = model(images, labels=torch.tensor([0, 1, 3]))
    out.loss.backward()
    backbone_params = {id(p) for p in backbone.parameters()}
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    learner_params = [(n, p) for n, p in model.named_parameters() if id(p) not in backbone_params]
    assert learner_params, "a prompt learner must have trainable prompt parameters"
    for param_name, param in learner_params:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {param_name}"


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_save_load_round_trip(name, backbone, images, tmp_path):
    model = pr.wrap(build(name, backbone))
    with torch.no_grad():  # move prompts away from their initialisation so loading really has to restore them
        for param in model.trainable_state_dict().values():
            param.add_(0.05 * torch.randn_like(param))
    expected = model(images).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=backbone)
    assert type(loaded.learner) is type(model.learner)
    torch.testing.assert_close(loaded(images).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", PROMPTED)
def test_adapter_holds_only_learner_tensors(name, hf_backbone):
    model = pr.wrap(build(name, hf_backbone))
    state = model.trainable_state_dict()
    assert state and all(key.startswith("learner.") and ".backbone." not in key for key in state)
    n_backbone = sum(p.numel() for p in hf_backbone.parameters())
    assert sum(t.numel() for t in state.values()) < n_backbone


@pytest.mark.parametrize("name", LEARNER_NAMES)
def test_unwrap_restores_bit_identical_backbone(name, backbone, images):
    ids = backbone.tokenize([f"a photo of a {c}." for c in CLASSNAMES])
    # compare under no_grad both times: torch picks other (equally valid) attention kernels when gradients flow
    with torch.no_grad():
        before_img = backbone.encode_image(images)
        before_txt = backbone.encode_text(ids)
    learner = build(name, backbone)
    model = pr.wrap(learner)
    loss = model(images, labels=torch.tensor([0, 1, 2])).loss
    if loss.requires_grad:  # zero-shot CLIP has nothing to train
        loss.backward()
    assert model.unwrap() is learner
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(images), before_img)
        assert torch.equal(backbone.encode_text(ids), before_txt)
    # and the hooks are gone from every module
    for module in backbone.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("name", PROMPTED)
def test_per_sample_override_equal_to_learned_prompt_is_identity(name, hf_backbone, images):
    learner = build(name, hf_backbone)
    sites = learner.prompt_tokens()
    override = {site: value.detach().unsqueeze(0).expand(3, -1, -1).clone() for site, value in sites.items()}
    torch.testing.assert_close(learner(images, prompt_override=override).logits, learner(images).logits)
    with pytest.raises(ValueError, match="must have shape"):
        learner(images, prompt_override={site: value[:2] for site, value in override.items()})
    with pytest.raises(ValueError, match="no prompt site"):
        learner(images, prompt_override={"nowhere": torch.zeros(3, 1, 1)})


def test_override_changes_each_sample_independently(hf_backbone, images):
    learner = build("coop", hf_backbone)
    ctx = learner.prompt_tokens()["text"].detach()
    override = ctx.unsqueeze(0).repeat(3, 1, 1)
    override[1] += torch.randn_like(override[1])
    base = learner(images).logits
    changed = learner(images, prompt_override={"text": override}).logits
    torch.testing.assert_close(changed[[0, 2]], base[[0, 2]])
    assert not torch.allclose(changed[1], base[1])


def test_class_token_positions_and_class_specific_context(hf_backbone, images):
    for position in ("end", "middle", "front"):
        learner = build("coop", hf_backbone, class_token_position=position)
        ids = learner.prompts.input_ids
        # the EOT is where the backbone's pooling reads, whatever the layout
        eot = hf_backbone.eot_positions(ids)
        assert torch.all(ids[torch.arange(len(ids)), eot] == hf_backbone.tokenizer.eos_token_id)
        assert learner(images).logits.shape == (3, 4)
    csc = build("coop", hf_backbone, class_specific=True)
    assert csc.prompt_tokens()["text"].shape == (4 * 4, hf_backbone.text_width)
    with pytest.raises(ValueError, match="class-specific"):
        csc.set_classnames(["car", "tree"])


@pytest.mark.parametrize("name", PROMPTED)
def test_set_classnames_transfers_learned_prompts(name, hf_backbone, images):
    learner = build(name, hf_backbone)
    learner.set_classnames(["car", "tree", "house"])
    assert learner(images).logits.shape == (3, 3)


def _separable_task(n_per_class: int, seed: int):
    """Four classes told apart by colour: a task any prompt learner can fit on a random CLIP."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1.0, -1], [-1, -1, 1.0], [1.0, 1.0, -1]])
    labels = torch.arange(4).repeat_interleave(n_per_class)
    images = colours[labels][:, :, None, None] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return images, labels


@pytest.mark.parametrize("kind", ["hf", "open_clip"])
@pytest.mark.parametrize("name", PROMPTED)
def test_training_raises_accuracy(name, kind):
    backbone = make_backbone(kind, seed=1)
    model = pr.wrap(build(name, backbone))
    train_x, train_y = _separable_task(8, seed=0)
    test_x, test_y = _separable_task(16, seed=1)

    def accuracy():
        with torch.no_grad():
            return (model(test_x).logits.argmax(-1) == test_y).float().mean().item()

    before = accuracy()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = torch.randperm(len(train_y), generator=generator)[:16]
        loss = model(train_x[batch], labels=train_y[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert after >= 0.9, f"{name} on {kind}: accuracy {before:.2f} -> {after:.2f}"
    assert after > before + 0.2
