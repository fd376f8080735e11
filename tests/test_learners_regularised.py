"""KgCoOp and PromptSRC: learners whose training objective carries a regulariser (``LearnerOutput.loss``).

Their terms against hand-computed values, gradients, training through ``prompt_robust.fit``, every add-on on top,
per-sample prompts, and PromptSRC's Gaussian prompt aggregation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, make_backbone
from test_learners import _separable_task
from torch.optim.optimizer import register_optimizer_step_post_hook

import prompt_robust as pr
from prompt_robust.learners import LEARNERS, GaussianPromptAggregation, KgCoOpConfig, PromptSRC, PromptSRCConfig
from prompt_robust.learners.promptsrc import CLIP_IMAGENET_TEMPLATES, gaussian_epoch_weights

NAMES = ["kgcoop", "promptsrc"]
#: small templates: the tiny backbone's context (32 positions) and vocabulary are small
TEMPLATES = ["a photo of a {}.", "a picture of the {}.", "the small {}."]
KWARGS = {"kgcoop": {}, "promptsrc": {"templates": TEMPLATES}}


def build(name: str, backbone, **kwargs):
    torch.manual_seed(0)
    return pr.build_learner(name, backbone, CLASSNAMES, **{**KWARGS[name], **kwargs})


LABELS = torch.tensor([0, 1, 3])


def _clip_text(backbone, templates, normalize_each):
    """Frozen CLIP class features by hand: every template's features, averaged, normalised."""
    with torch.no_grad():
        rows = []
        for template in templates:
            features = backbone.encode_text(backbone.tokenize([template.format(c) for c in CLASSNAMES]))
            rows.append(F.normalize(features, dim=-1) if normalize_each else features)
    return F.normalize(torch.stack(rows).mean(0), dim=-1)  # (n_cls, d)


def _learner_params(model, backbone):
    backbone_ids = {id(p) for p in backbone.parameters()}
    return [(n, p) for n, p in model.named_parameters() if n.startswith("learner.") and id(p) not in backbone_ids]


# ---------------------------------------------------------------------------------------------------------------
# registry and configs


def test_registered_with_the_reference_defaults(bb):
    assert LEARNERS["kgcoop"].config_class is KgCoOpConfig and LEARNERS["promptsrc"] is PromptSRC
    kg = pr.build_learner("kgcoop", bb, CLASSNAMES)
    assert (kg.config.n_ctx, kg.config.ctx_init, kg.config.lam) == (4, "a photo of a", 8.0)
    assert kg.config.templates == ["a photo of a {}."]
    src = PromptSRCConfig()
    assert (src.n_ctx, src.n_ctx_vision, src.text_depth, src.vision_depth) == (4, 4, 9, 9)
    assert (src.text_loss_weight, src.image_loss_weight, src.kl_weight) == (25.0, 10.0, 1.0)
    assert src.templates is None and len(CLIP_IMAGENET_TEMPLATES) == 60
    with pytest.raises(ValueError, match="lam"):
        KgCoOpConfig(lam=-1.0)
    with pytest.raises(ValueError, match="vision_depth"):
        PromptSRCConfig(vision_depth=-1)
    with pytest.raises(ValueError, match="templates"):
        PromptSRCConfig(templates=["no placeholder"])
    with pytest.raises(ValueError, match="kgcoop"):
        pr.build_learner("kgcoopp", bb, CLASSNAMES)


# ---------------------------------------------------------------------------------------------------------------
# KgCoOp: CE + lam * distance to the hand-crafted features


def test_kgcoop_loss_is_cross_entropy_plus_lambda_times_the_distance(bb, images):
    learner = build("kgcoop", bb, ctx_init=None, n_ctx=4, lam=3.0, templates=["a photo of a {}.", "the {}."])
    model = pr.wrap(learner).train()
    out = model(images, labels=LABELS)
    text = out.learner_output.text_features.detach()  # (n_cls, d)
    clip = _clip_text(bb, ["a photo of a {}.", "the {}."], normalize_each=True)
    distance = (1 - (text * clip).sum(-1)).mean()
    # the reference's 1 - cos is half the paper's squared L2 distance of unit vectors
    torch.testing.assert_close(distance, 0.5 * (text - clip).pow(2).sum(-1).mean())
    assert distance > 1e-3  # random context: far from the hand-crafted prompt
    ce = F.cross_entropy(out.logits, LABELS)
    torch.testing.assert_close(out.loss, ce + 3.0 * distance)
    assert out.logs["learner/loss"] == pytest.approx(3.0 * distance.item(), rel=1e-5)
    # in eval mode: no term, the plain cross-entropy
    model.eval()
    assert learner(images).loss is None
    torch.testing.assert_close(model(images, labels=LABELS).loss, F.cross_entropy(learner(images).logits, LABELS))


def test_kgcoop_regulariser_is_zero_when_the_context_is_the_hand_crafted_prompt(bb, images):
    # ctx "a photo of a" + class name + "." is exactly the template "a photo of a {}."
    learner = build("kgcoop", bb).train()
    out = learner(images)
    torch.testing.assert_close(out.text_features, _clip_text(bb, ["a photo of a {}."], True), atol=1e-5, rtol=0)
    assert abs(out.loss.item()) < 1e-5
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn_like(learner.ctx))
    assert learner(images).loss.item() > 1e-3
    learner.set_classnames(["car", "tree"])  # the hand-crafted features follow the class list
    assert learner.hand_crafted_features().shape == (2, bb.embed_dim)


def test_kgcoop_term_alone_pulls_the_context_towards_the_hand_crafted_prompt(bb, images):
    learner = build("kgcoop", bb, ctx_init=None, n_ctx=4).train()
    optimizer = torch.optim.SGD([learner.ctx], lr=0.05)
    before = learner(images).loss.item()
    for _ in range(5):
        loss = learner(images).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert learner(images).loss.item() < before


# ---------------------------------------------------------------------------------------------------------------
# PromptSRC: the self-regulating terms


def test_promptsrc_terms_equal_hand_computed_l1_and_kl(bb, images):
    learner = build("promptsrc", bb, text_loss_weight=2.0, image_loss_weight=3.0, kl_weight=0.5)
    model = pr.wrap(learner).train()
    out = model(images, labels=LABELS)
    text, image, logits = (out.learner_output.text_features, out.learner_output.image_features, out.logits)
    clip_text = _clip_text(bb, TEMPLATES, normalize_each=False)  # the reference averages raw features
    with torch.no_grad():
        clip_image = F.normalize(bb.encode_image(images), dim=-1)
    assert not torch.allclose(image, clip_image, atol=1e-3)  # the vision prompts change the image features
    text_l1 = (text - clip_text).abs().mean()
    image_l1 = (image - clip_image).abs().mean()
    p_zs = torch.softmax(bb.logit_scale * clip_image @ clip_text.t(), dim=-1)
    kl = (p_zs * (p_zs.log() - torch.log_softmax(logits, dim=-1))).sum() / logits.numel()
    terms = learner.regularization_terms(out.learner_output, images)
    torch.testing.assert_close(terms["text_l1"], text_l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["image_l1"], image_l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["logits_kl"], kl, atol=1e-6, rtol=1e-4)
    expected = 2.0 * text_l1 + 3.0 * image_l1 + 0.5 * kl
    torch.testing.assert_close(out.learner_output.loss, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, LABELS) + expected, atol=1e-6, rtol=1e-4)
    assert learner.eval()(images).loss is None


def test_promptsrc_sites_depths_and_default_templates(bb):
    learner = pr.build_learner("promptsrc", bb, CLASSNAMES)  # depth 9 capped at the backbone's 2 layers
    assert learner.text_depth == learner.vision_depth == 2
    tokens = learner.prompt_tokens()
    assert tokens["text"].shape == (2 * 4, bb.text_width) and tokens["vision"].shape == (2 * 4, bb.vision_width)
    # the first text layer starts from "a photo of a"; deeper layers and vision prompts are small and random
    ids = bb.tokenize(["a photo of a"])
    torch.testing.assert_close(learner.text_prompts[0], bb.token_embedding(ids)[0, 1:5])
    assert learner.config.templates is None  # CLIP's ImageNet ensemble, as the reference
    text_only = build("promptsrc", bb, vision_depth=0, text_depth=1)
    assert set(text_only.prompt_tokens()) == {"text"} and text_only.prompt_tokens()["text"].shape == (4, 32)


# ---------------------------------------------------------------------------------------------------------------
# both learners through the contract


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_only_the_prompt_tensors(name, backbone, images):
    model = pr.wrap(build(name, backbone, ctx_init=None)).train()
    model(images, labels=LABELS).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    params = _learner_params(model, backbone)
    expected = {"kgcoop": {"learner.ctx"}, "promptsrc": {"learner.text_prompts", "learner.vision_prompts"}}[name]
    assert {n for n, _ in params} == expected
    for param_name, param in params:
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {param_name}"
    if name == "kgcoop":  # and the regulariser on its own reaches the context as well
        model.zero_grad()
        model.learner(images).loss.backward()
        assert model.learner.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_override_equal_to_the_learned_prompt_is_the_shared_path(name, bb, images):
    learner = build(name, bb, ctx_init=None).train()
    with torch.no_grad():
        shared = learner(images)
        sites = learner.prompt_tokens()
        full = {site: value.unsqueeze(0).expand(3, -1, -1).clone() for site, value in sites.items()}
        overrides = [full] + ([{site: value} for site, value in full.items()] if len(full) > 1 else [])
        for override in overrides:  # every site at once, and each site alone
            out = learner(images, prompt_override=override)
            per_sample_text = (
                (3, len(CLASSNAMES), bb.embed_dim) if "text" in override else (len(CLASSNAMES), bb.embed_dim)
            )
            assert out.text_features.shape == per_sample_text
            torch.testing.assert_close(out.logits, shared.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.image_features, shared.image_features, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out.loss, shared.loss, atol=1e-6, rtol=1e-5)
        # an override changes only its own sample
        changed = {site: value.clone() for site, value in full.items()}
        for value in changed.values():
            value[1] += torch.randn_like(value[1])
        logits = learner(images, prompt_override=changed).logits
    torch.testing.assert_close(logits[[0, 2]], shared.logits[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[1], shared.logits[1])


@pytest.mark.parametrize("name", NAMES)
def test_fit_trains_with_the_regulariser_and_the_loss_decreases(name):
    backbone = make_backbone("hf", seed=1)
    model = pr.wrap(build(name, backbone))
    x, y = _separable_task(8, seed=0)
    data = [(x[i], int(y[i])) for i in range(len(y))]
    config = pr.FitConfig(steps=24, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.0, progress=False)
    result = pr.fit(model, data, config)
    assert all(math.isfinite(v) for v in result.losses)
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    model.train()
    out = model(x[:16], labels=y[:16])
    assert out.logs["learner/loss"] > 0  # the regulariser was part of the objective


# ---------------------------------------------------------------------------------------------------------------
# every add-on on top


def _addon_config(addon: str | None) -> pr.RobustConfig:
    if addon is None:
        return pr.RobustConfig()
    configs = {
        "refiner": pr.RefinerConfig(
            hidden_dim=32, layers=1, heads=4, inner_steps=1, train_steps=5, train_batch_size=12, joint_steps=0
        ),
        "counterfactual": pr.CounterfactualConfig(hidden_dim=32, depth=1, train_steps=10, train_batch_size=12),
        "invariance": pr.InvarianceConfig(lam=1.0, dim=8, interventions=["grayscale"]),
        "debias": pr.DebiasConfig(attribute_values=["grass", "water"]),
    }
    return pr.RobustConfig(**{addon: configs[addon]})


@pytest.mark.parametrize("addon", [None, "refiner", "counterfactual", "invariance", "debias"])
@pytest.mark.parametrize("name", NAMES)
def test_every_addon_forward_train_step_and_adapter_round_trip(name, addon, bb, train_data, images, tmp_path):
    learner = build(name, bb)
    model = pr.wrap(learner, _addon_config(addon))
    if addon is not None:
        model.fit_addons(train_data, progress=False)
        assert model.addons[addon].fitted and model.stage == "prompt"
    model.train()
    out = model(images, labels=LABELS)
    assert out.logits.shape == (3, len(CLASSNAMES)) and math.isfinite(out.loss.item())
    assert "learner/loss" in out.logs
    if addon == "refiner":  # refined per-sample prompts for every site
        assert out.learner_output.text_features.dim() == 3
    if addon in ("counterfactual", "debias"):  # their own terms are in the same objective
        assert any(key.startswith(f"{addon}/") for key in out.logs)
    before = {n: p.detach().clone() for n, p in _learner_params(model, bb)}
    result = pr.fit(model, train_data, pr.FitConfig(steps=1, batch_size=6, lr=0.01, progress=False))
    assert math.isfinite(result.final_loss)
    assert any(not torch.equal(p, before[n]) for n, p in _learner_params(model, bb)), "the prompt did not train"
    model.eval()
    with torch.no_grad():
        expected = model(images).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb).eval()
    assert type(loaded.learner) is type(learner) and loaded.learner.config == learner.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, expected, atol=1e-5, rtol=1e-5)


def test_learner_term_is_added_only_while_the_learner_trains(bb, train_data, images):
    learner = build("kgcoop", bb, ctx_init=None)
    refiner = pr.RefinerConfig(hidden_dim=32, layers=1, heads=4, inner_steps=1, train_steps=3, train_batch_size=12)
    model = pr.wrap(learner, pr.RobustConfig(refiner=refiner))
    model.fit_addons(train_data, progress=False)
    model.train()
    model.set_stage("refiner_joint")  # the prompt is frozen there (joint_train_prompt=False)
    assert "learner/loss" not in model(images, labels=LABELS).logs
    model.set_stage("prompt")
    assert "learner/loss" in model(images, labels=LABELS).logs


# ---------------------------------------------------------------------------------------------------------------
# Gaussian-weighted prompt aggregation


def test_gaussian_epoch_weights_follow_the_normal_density():
    weights = gaussian_epoch_weights(20, mean=15.0, std=1.0)
    density = torch.tensor([math.exp(-0.5 * (e - 15.0) ** 2) for e in range(1, 21)], dtype=torch.float64)
    torch.testing.assert_close(weights, density / density.sum())
    assert int(weights.argmax()) == 14 and float(weights.sum()) == pytest.approx(1.0)
    assert torch.isfinite(gaussian_epoch_weights(5, mean=1000.0, std=1.0)).all()  # far mean: finite, on epoch 5


def test_gpa_with_fit_gives_the_weighted_average_of_the_epoch_end_prompts(bb):
    learner = build("promptsrc", bb)
    model = pr.wrap(learner)
    data = [(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 4) for i in range(6)]
    config = pr.FitConfig(epochs=4, batch_size=4, lr=0.05, optimizer="adamw", progress=False)  # 2 steps / epoch
    snapshots, steps = [], []

    def snapshot(optimizer, args, kwargs):  # registered first, so it sees each step before the aggregation
        steps.append(1)
        if len(steps) % 2 == 0:
            snapshots.append([p.detach().clone() for p in (learner.text_prompts, learner.vision_prompts)])

    handle = register_optimizer_step_post_hook(snapshot)
    try:
        with GaussianPromptAggregation.for_fit(learner, len(data), config, mean=3.0, std=1.0) as gpa:
            pr.fit(model, data, config)
    finally:
        handle.remove()
    assert (gpa.epochs, gpa.steps_per_epoch, gpa.epochs_seen, gpa.applied) == (4, 2, 4, True)
    weights = gaussian_epoch_weights(4, 3.0, 1.0)
    for i, param in enumerate((learner.text_prompts, learner.vision_prompts)):
        expected = sum(float(w) * snap[i] for w, snap in zip(weights, snapshots, strict=True))
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(param.detach(), snapshots[-1][i])  # not simply the last epoch's prompt
    # the hook is gone: later steps do not move the count
    pr.fit(model, data, pr.FitConfig(steps=1, batch_size=4, progress=False))
    assert gpa.steps == 8
    # a run of FitConfig.steps that ends inside an epoch: its last step ends the last epoch
    config = pr.FitConfig(steps=3, batch_size=4, progress=False)
    with GaussianPromptAggregation.for_fit(learner, len(data), config, mean=1.0, std=1.0) as partial:
        pr.fit(model, data, config)
    assert (partial.epochs, partial.epochs_seen, partial.applied) == (2, 2, True)


def test_gpa_by_hand_and_its_errors(bb):
    learner = build("kgcoop", bb)
    gpa = GaussianPromptAggregation(learner, epochs=3, steps_per_epoch=1, mean=2.0, std=1.0)
    with pytest.raises(RuntimeError, match="update"):
        gpa.apply()
    values = []
    for epoch in range(2):  # only two of three epochs: the average is renormalised over those seen
        with torch.no_grad():
            learner.ctx.add_(1.0)
        values.append(learner.ctx.detach().clone())
        gpa.update(epoch)
    gpa.apply()
    w = gaussian_epoch_weights(3, 2.0, 1.0)[:2]
    torch.testing.assert_close(learner.ctx.detach(), (w[0] * values[0] + w[1] * values[1]) / w.sum())
    with pytest.raises(ValueError, match="epoch must lie"):
        gpa.update(3)
    with pytest.raises(ValueError, match="std"):
        GaussianPromptAggregation(learner, epochs=3, steps_per_epoch=1, std=0.0)
    with pytest.warns(UserWarning, match="saw 0 of 3 epochs"):
        with GaussianPromptAggregation(learner, epochs=3, steps_per_epoch=1):
            pass
    learner.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable tensors"):
        GaussianPromptAggregation(learner, epochs=3, steps_per_epoch=1)
