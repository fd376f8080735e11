"""The counterfactual contrastive regularizer: the feature flow, counterfactual generation on a problem with
known answers, the InfoNCE loss and its gradients, configuration, errors, caching and saving."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, LEARNER_KWARGS, N_TRAIN
from test_custom_learner import MyTextBias

import prompt_robust as pr
import prompt_robust.addons.counterfactual  # registers the "counterfactual" add-on
from prompt_robust.addons.base import ForwardState
from prompt_robust.addons.counterfactual import (
    CounterfactualGenerator,
    FeatureFlow,
    FeatureFlowNet,
    choose_targets,
    counterfactual_quality,
    fit_feature_flow,
    fit_linear_probe,
)

SMALL = {"hidden_dim": 32, "depth": 1, "train_steps": 40, "train_batch_size": 12}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator), "labels": torch.tensor([0, 1, 2, 3])}


def build(bb, name="coop", **counterfactual):
    """A freshly seeded learner and its counterfactual-wrapped model."""
    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS[name])
    config = pr.CounterfactualConfig(**{**SMALL, **counterfactual})
    return learner, pr.wrap(learner, pr.RobustConfig(counterfactual=config))


@pytest.fixture(scope="module")
def prepared(bb, train_data):
    """A CoOp model whose feature flow is trained (module-wide; tests only read it)."""
    learner, model = build(bb, "coop")
    model.fit_addons(train_data, progress=False)
    return learner, model


# ---------------------------------------------------------------------------------------------------------------
# 1. one network, two fields


def test_marginal_and_conditional_velocities_differ_only_by_the_class_embedding():
    torch.manual_seed(0)
    net = FeatureFlowNet(feature_dim=6, num_classes=3, hidden_dim=16, depth=2)
    assert net.null_index == 3 and net.class_embedding.num_embeddings == 4
    x, t = torch.randn(5, 6), torch.rand(5)
    # an untrained network predicts zero velocity (the ODE is the identity) ...
    assert torch.equal(net(x, t, torch.full((5,), 1)), torch.zeros(5, 6))
    with torch.no_grad():  # ... so give the zero-initialised output map weights to see the fields
        net.outputs.weight.normal_()
    y = torch.tensor([0, 1, 2, 0, 1])
    null = torch.full((5,), net.null_index)
    conditional, marginal = net(x, t, y), net(x, t, null)
    assert not torch.allclose(conditional, marginal)
    assert torch.equal(net(x, t, y), conditional)  # the same label gives the same output, exactly
    # rows of a mixed batch are independent: a batch of labels equals each label alone
    mixed = net(x, t, torch.where(torch.arange(5) % 2 == 0, y, null))
    torch.testing.assert_close(mixed[0::2], conditional[0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1::2], marginal[1::2], rtol=0, atol=1e-6)
    # the null embedding is the only difference: copy it into the class rows and the fields coincide
    with torch.no_grad():
        net.class_embedding.weight[:3] = net.class_embedding.weight[3]
    assert torch.equal(net(x, t, y), marginal)


def test_feature_standardisation_round_trips_and_has_unit_scale():
    flow = FeatureFlow(feature_dim=16, num_classes=2, hidden_dim=8, depth=0)
    assert float(flow.feature_scale) == pytest.approx(4.0)  # sqrt(d) before fitting
    z = F.normalize(torch.randn(200, 16) + 2.0, dim=-1)
    flow.set_standardisation(z)
    x = flow.encode(z)
    assert x.mean(0).abs().max() < 1e-5 and x.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(flow.decode(x), z, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="identical"):
        flow.set_standardisation(z[:1].expand(10, -1))


# ---------------------------------------------------------------------------------------------------------------
# 2. guidance, proximity and inversion against known answers

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
STD = 0.5


def _mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    return MEANS[labels] + STD * torch.randn(n, 2, generator=generator), labels


@pytest.fixture(scope="module")
def toy():
    """A flow trained on a 2-D three-Gaussian mixture with known class means, and a probe on held-out points."""
    features, labels = _mixture(300, seed=0)
    flow = FeatureFlow(feature_dim=2, num_classes=3, hidden_dim=64, depth=1)
    result = fit_feature_flow(flow, features, labels, steps=600, lr=3e-3, batch_size=256, progress=False)
    assert flow.fitted and math.isfinite(result.final_loss)
    held_out, held_labels = _mixture(150, seed=1)
    probe = fit_linear_probe(held_out, held_labels, 3)
    queries = _mixture(120, seed=2)[0][:120:3]  # 40 class-0 points
    return flow, features, labels, probe, queries


def test_guided_counterfactual_moves_to_the_target_class_but_stays_close(toy):
    flow, features, labels, probe, z = toy
    source, target = torch.zeros(len(z), dtype=torch.long), torch.ones(len(z), dtype=torch.long)

    def generate(lam: float) -> torch.Tensor:
        gen = CounterfactualGenerator(
            flow, noise_level=0.5, guidance_scale=3.0, negative_guidance=1.0, proximity_weight=lam
        )
        return gen.generate(z, source, target).counterfactuals

    def quality(cf: torch.Tensor):
        return counterfactual_quality(z, cf, target, probe=probe, reference_features=features, reference_labels=labels)

    cf = generate(0.175)
    to_target_before, to_target_after = (z - MEANS[1]).norm(dim=1), (cf - MEANS[1]).norm(dim=1)
    to_source_after = (cf - MEANS[0]).norm(dim=1)
    assert to_target_after.mean() < 0.6 * to_target_before.mean()
    assert (to_target_after < to_source_after).float().mean() >= 0.9
    minimal = quality(cf)
    assert minimal.factual_validity == 0.0 and minimal.validity >= 0.9
    assert minimal.proximity < 1.0  # closer to z than the nearest real class-1 point is
    # the proximity term is what makes it minimal: without it the feature lands deeper in class 1
    unconstrained = quality(generate(0.0))
    assert unconstrained.validity == 1.0 and unconstrained.proximity > minimal.proximity + 0.1
    # a much stronger pull keeps the change smaller still (and no longer flips the class)
    assert (generate(0.5) - z).norm(dim=1).mean() < (cf - z).norm(dim=1).mean()


def test_minimal_change_search_keeps_the_largest_accepted_proximity_weight(toy):
    flow, _, _, _, z = toy
    source, target = torch.zeros(len(z), dtype=torch.long), torch.ones(len(z), dtype=torch.long)

    def validator(x: torch.Tensor) -> torch.Tensor:  # the Bayes classifier of the mixture (equal priors, stds)
        return -(x.unsqueeze(1) - MEANS).pow(2).sum(-1)

    settings = dict(noise_level=0.5, guidance_scale=3.0, negative_guidance=1.0)
    gen = CounterfactualGenerator(flow, proximity_search=3, proximity_max=0.8, validity_margin=0.1, **settings)
    out = gen.generate(z, source, target, validator=validator)
    grid = [0.1 * i for i in range(8)]  # what 3 bisection steps on [0, 0.8] can return
    assert all(min(abs(lam - g) for g in grid) < 1e-6 for lam in out.proximity.tolist())
    assert torch.equal(out.valid, gen.accepts(validator, out.counterfactuals, target))
    assert out.valid.float().mean() >= 0.9  # the unconstrained (λ = 0) counterfactuals flip, so the search can too
    assert out.evaluations == 2 * 5 * (1 + 1 + 3)  # midpoint: inversion + lower end + 3 bisection steps
    # each accepted λ is exactly the fixed-λ counterfactual of that weight, and one grid step more is rejected
    for lam in sorted(set(out.proximity[out.valid].tolist())):
        rows = (out.proximity - lam).abs() < 1e-6
        fixed = CounterfactualGenerator(flow, proximity_weight=lam, **settings).generate(
            z[rows], source[rows], target[rows]
        )
        torch.testing.assert_close(out.counterfactuals[rows], fixed.counterfactuals, rtol=0, atol=1e-5)
        if lam + 0.1 < 0.8:
            stronger = CounterfactualGenerator(flow, proximity_weight=lam + 0.1, **settings)
            more = stronger.generate(z[rows], source[rows], target[rows]).counterfactuals
            assert not gen.accepts(validator, more, target[rows]).all()
    # the search makes the change smaller than the lower end alone, at the validity the validator asks for
    lower = CounterfactualGenerator(flow, proximity_weight=0.0, **settings).generate(z, source, target)
    assert (out.counterfactuals - z).norm(dim=1).median() < (lower.counterfactuals - z).norm(dim=1).median()
    # without a validator there is no search: the fixed lower end
    plain = gen.generate(z, source, target)
    torch.testing.assert_close(plain.counterfactuals, lower.counterfactuals)
    assert plain.valid is None


def test_without_guidance_the_proximity_term_keeps_the_feature_in_place(toy):
    flow, *_, z = toy
    source = torch.zeros(len(z), dtype=torch.long)
    shifts = {}
    for lam in (0.0, 0.5):
        gen = CounterfactualGenerator(flow, guidance_scale=0.0, negative_guidance=0.0, proximity_weight=lam)
        cf = gen.generate(z, source, torch.ones_like(source)).counterfactuals
        shifts[lam] = (cf - z).norm(dim=1).mean().item()
        assert (cf - MEANS[0]).norm(dim=1).mean() < (cf - MEANS[1]).norm(dim=1).mean()  # still class 0
    class_gap = (MEANS[1] - MEANS[0]).norm().item()
    assert shifts[0.5] < 0.5 * shifts[0.0] and shifts[0.5] < 0.05 * class_gap, shifts


def test_inversion_then_forward_with_the_same_class_reconstructs_the_feature(toy):
    flow, *_, z = toy
    y = torch.zeros(len(z), dtype=torch.long)
    errors = {}
    for method, steps in (("euler", 5), ("midpoint", 5), ("midpoint", 20)):
        gen = CounterfactualGenerator(
            flow, guidance_scale=1.0, negative_guidance=0.0, proximity_weight=0.0, num_steps=steps, method=method
        )
        out = gen.generate(z, y, y)
        # the inverted state really is far from the data (the round trip is not trivially the identity)
        assert (out.inverted - flow.encode(z)).norm(dim=1).mean() > 0.5
        assert out.evaluations == 2 * gen.sampler.evaluations_per_sample
        errors[(method, steps)] = (out.counterfactuals - z).norm(dim=1).max().item()
    assert errors[("midpoint", 20)] < errors[("midpoint", 5)] < 0.02 < errors[("euler", 5)] < 0.5, errors


def test_guided_velocity_is_the_documented_combination():
    """Ground truth with a stub flow whose fields are known constants per label."""
    flow = FeatureFlow(feature_dim=3, num_classes=3, hidden_dim=8, depth=0)
    table = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])  # rows: y = 0, 1, 2, null
    flow.velocity = lambda x, t, labels: table[labels] + 0 * x  # type: ignore[method-assign]
    x, anchor = torch.tensor([[0.2, -0.1, 0.3]]), torch.tensor([[1.0, 1.0, 1.0]])
    source, target, t = torch.tensor([0]), torch.tensor([2]), torch.tensor(0.75)
    w, w_neg, lam = 3.0, 1.0, 0.25
    gen = CounterfactualGenerator(flow, guidance_scale=w, negative_guidance=w_neg, proximity_weight=lam)
    guided = table[3] + w * (table[2] - table[3]) - w_neg * (table[0] - table[3])
    expected = (1 - lam) * guided + lam * (anchor - x) / (1 - 0.75)
    torch.testing.assert_close(gen.guided_velocity(x, t, source, target, anchor), expected)
    # the predicted clean point of the blend is the λ-mix of the guided prediction and the anchor
    torch.testing.assert_close(x + 0.25 * expected, (1 - lam) * (x + 0.25 * guided) + lam * anchor)


def test_an_untrained_flow_leaves_features_unchanged():
    flow = FeatureFlow(feature_dim=4, num_classes=3, hidden_dim=8, depth=1)
    z = torch.randn(6, 4)
    y = torch.arange(6) % 3
    out = CounterfactualGenerator(flow, proximity_weight=0.0).generate(z, y, (y + 1) % 3)
    torch.testing.assert_close(out.counterfactuals, z, rtol=0, atol=1e-6)


def test_choose_targets():
    labels = torch.tensor([0, 1, 2])
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0], [0.0, 9.0, 1.0, 2.0], [4.0, 4.0, 9.0, 0.0]])
    assert choose_targets(labels, 4, 1, scores=scores).tolist() == [[2], [3], [0]]  # ties: the lower index
    assert choose_targets(labels, 4, 3, scores=scores).tolist() == [[2, 3, 1], [3, 2, 0], [0, 1, 3]]
    assert choose_targets(labels, 4, 5, scores=scores)[:, 3:].tolist() == [[2, 3], [3, 2], [0, 1]]  # cycles
    random = choose_targets(labels.repeat(50), 4, 3, mode="random", generator=torch.Generator().manual_seed(0))
    assert (random != labels.repeat(50)[:, None]).all()
    assert all(len(set(row)) == 3 for row in random.tolist())  # distinct within a sample
    assert set(random[:, 0].tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"confusable.*scores"):
        choose_targets(labels, 4, 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        choose_targets(torch.tensor([0]), 1, 1, mode="random")


# ---------------------------------------------------------------------------------------------------------------
# 3. the regularizer: loss, gradients, composition


@pytest.mark.parametrize(
    ("name", "text_side"),
    [("coop", ["ctx"]), ("cocoop", ["ctx", "meta_net"]), ("maple", ["text_prompts"])],  # MaPLe's coupling: vision
)
def test_regularizer_gradient_reaches_only_the_prompt(bb, train_data, batch, name, text_side):
    learner, model = build(bb, name, num_counterfactuals=2)
    addon = model.addons["counterfactual"]
    assert model.stages() == ["prompt"]  # the flow is no training stage of its own
    logs = model.fit_addons(train_data, progress=False)
    assert logs["counterfactual/num_features"] == N_TRAIN and math.isfinite(logs["counterfactual/flow_loss"])
    assert addon.fitted and all(not p.requires_grad for p in addon.flow.parameters())
    model.train()
    output = learner(batch["pixel_values"])
    terms = addon.loss_terms(ForwardState.for_batch(learner, batch, output))
    loss, logs = terms.loss, terms.logs
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    assert set(logs) == {
        "counterfactual/loss",
        "counterfactual/validity",
        "counterfactual/cosine",
        "counterfactual/proximity_weight",
    }
    loss.backward()
    # every prompt tensor that shapes the class text features gets a gradient
    text_params = [p for n, p in learner.named_parameters() if n.split(".")[0] in text_side]
    assert text_params and all(p.requires_grad and p.grad is not None for p in text_params)
    assert sum(p.grad.abs().sum() for p in text_params) > 0
    assert all(p.grad is None for p in learner.backbone.parameters())
    assert all(p.grad is None for p in addon.flow.parameters())


def test_loss_is_infonce_with_counterfactual_negatives(prepared, batch):
    learner, model = prepared
    addon = model.addons["counterfactual"]
    model.train()
    output = learner(batch["pixel_values"])
    terms = addon.loss_terms(ForwardState.for_batch(learner, batch, output))
    loss, logs = terms.loss, terms.logs
    z = learner.image_features(batch["pixel_values"])
    cf, targets = addon.counterfactuals(z, batch["labels"], scores=output.logits, text_features=output.text_features)
    assert cf.shape == (4, 1, z.shape[1]) and (targets != batch["labels"][:, None]).all()
    # confusable targets: the highest other logit
    masked = output.logits.detach().clone()
    masked[torch.arange(4), batch["labels"]] = -float("inf")
    assert targets[:, 0].tolist() == masked.argmax(1).tolist()
    torch.testing.assert_close(cf.norm(dim=-1), torch.ones(4, 1))
    text = output.text_features[batch["labels"]]  # (b, d)
    scores = torch.cat([(text * z).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", text, cf)], dim=1) / 0.07
    expected = F.cross_entropy(scores, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    assert logs["counterfactual/loss"] == pytest.approx(float(expected.detach()), rel=1e-6)
    assert 0 < logs["counterfactual/cosine"] < 1
    # the model's loss is the task loss plus weight x the regularizer
    out = model(**batch)
    task = F.cross_entropy(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, task + expected)
    assert out.logs["counterfactual/loss"] == pytest.approx(float(expected.detach()), rel=1e-6)


def test_counterfactuals_move_features_toward_the_target_class(prepared, train_data):
    """On the tiny backbone's features: the counterfactual is nearer the target class's training features."""
    _, model = prepared
    addon = model.addons["counterfactual"]
    features, labels = addon.dataset_features(train_data, progress=False)
    targets = (labels + 1) % len(CLASSNAMES)
    cf, _ = addon.counterfactuals(features, labels, targets)
    centroids = F.normalize(torch.stack([features[labels == c].mean(0) for c in range(len(CLASSNAMES))]), dim=-1)
    before = (features * centroids[targets]).sum(-1)
    after = (cf[:, 0] * centroids[targets]).sum(-1)
    assert (after > before).float().mean() >= 0.75, (before, after)


def test_visual_only_prompts_get_a_warning_not_a_silent_no_op(bb, train_data, batch):
    _, model = build(bb, "vpt")
    model.fit_addons(train_data, progress=False)
    model.train()
    with pytest.warns(UserWarning, match="does not reach any trainable tensor"):
        model(**batch)


def test_combines_with_the_refiner(bb, train_data, batch):
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, CLASSNAMES, **LEARNER_KWARGS["coop"])
    refiner = pr.RefinerConfig(hidden_dim=32, layers=1, heads=4, inner_steps=1, train_steps=5, train_batch_size=12)
    config = pr.RobustConfig(refiner=refiner, counterfactual=pr.CounterfactualConfig(**SMALL))
    model = pr.wrap(learner, config)
    assert model.stages() == ["prompt", "refiner", "refiner_joint"]
    model.fit_addons(train_data, progress=False)
    model.fit_addons(train_data, progress=False)
    assert model.addons["refiner"].fitted and model.stage == "prompt"
    model.train()
    out = model(**batch)
    # refined per-sample prompts give per-sample text features (b, n_cls, d); the regularizer uses them
    assert out.learner_output.text_features.dim() == 3
    assert math.isfinite(out.logs["counterfactual/loss"])
    out.loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.addons["counterfactual"].flow.parameters())
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# 4. configuration and errors


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        ({"noise_level": 0.0}, r"noise_level must be in \(0, 1\].*got 0\.0"),
        ({"noise_level": 1.5}, r"noise_level must be in \(0, 1\]"),
        ({"temperature": 0.0}, r"temperature must be > 0; got 0\.0"),
        ({"temperature": -0.1}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        (
            {"target": "confusible"},
            r"unknown counterfactual target 'confusible'; valid: confusable, random\..*'confusable'",
        ),
        ({"method": "rk4"}, r"unknown counterfactual ODE method 'rk4'; valid: euler, midpoint"),
        ({"proximity_weight": 1.0}, r"proximity_weight must be in \[0, 1\)"),
        ({"proximity_search": -1}, "proximity_search must be an integer >= 0"),
        ({"proximity_weight": 0.5, "proximity_max": 0.4}, r"proximity_max must be in \(proximity_weight=0.5, 1\)"),
        ({"validity_margin": -0.1}, "validity_margin must be >= 0"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"negative_guidance": -0.5}, "negative_guidance must be >= 0"),
        ({"num_counterfactuals": 0}, "num_counterfactuals must be an integer >= 1; got 0"),
        ({"num_steps": True}, "num_steps must be an integer >= 1; got True"),
        ({"weight": -1.0}, "weight must be >= 0"),
        ({"cond_dropout": 1.0}, r"cond_dropout must be in \[0, 1\)"),
        ({"cond_dropout": 0.0}, "never trains the marginal"),
        ({"depth": -1}, "depth must be an integer >= 0"),
        ({"train_lr": 0.0}, "train_lr must be > 0"),
        ({"twin": "attributes"}, "Did you mean 'attribute'"),
        ({"twin": "attribute"}, "needs attribute_values: at least 2 distinct words"),
        ({"twin": "attribute", "attribute_values": ["grass", "grass"]}, "at least 2 distinct"),
        (
            {"twin": "attribute", "attribute_values": ["a", "b"], "attribute_templates": ["x"]},
            "placeholder",
        ),
    ],
)
def test_bad_configs_raise_clear_value_errors(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        pr.CounterfactualConfig(**fields)


def test_config_round_trips_through_json():
    config = pr.RobustConfig(counterfactual=pr.CounterfactualConfig(num_counterfactuals=3, target="random"))
    assert pr.RobustConfig.from_dict(config.to_dict()) == config
    pr.CounterfactualConfig(cond_dropout=0.0, guidance_scale=1.0, negative_guidance=0.0)  # plain sampling is fine
    with pytest.raises(ValueError, match="has no field"):
        pr.CounterfactualConfig.from_dict({"guidance": 2.0})


def test_loss_before_fitting_says_to_fit(bb, batch):
    _, model = build(bb, "coop")
    assert not model.addons["counterfactual"].fitted
    model.train()
    with pytest.raises(RuntimeError, match=r"feature flow is not fitted.*model\.fit_addons\(train_data\)"):
        model(**batch)
    model(batch["pixel_values"])  # predicting needs no counterfactual (no labels, no loss)


class _BiasWithClasses(MyTextBias):
    """The docs' custom learner (returns a bare logits tensor), with the class list the add-on needs."""

    def __init__(self, backbone, classnames):
        super().__init__(backbone, classnames)
        self.classnames = list(classnames)


def test_learner_without_text_features_gets_a_clear_error(bb, train_data, batch):
    learner = _BiasWithClasses(bb, CLASSNAMES)
    model = pr.wrap(learner, pr.RobustConfig(counterfactual=pr.CounterfactualConfig(**SMALL)))
    model.fit_addons(train_data, progress=False)
    with pytest.raises(ValueError, match=r"needs the class text features.*without `text_features`.*LearnerOutput"):
        model(**batch)


def test_learner_without_classnames_or_with_one_class_is_refused(bb):
    with pytest.raises(ValueError, match="set a list attribute `classnames`"):
        pr.wrap(MyTextBias(bb, CLASSNAMES), pr.RobustConfig(counterfactual=pr.CounterfactualConfig(**SMALL)))
    one = MyTextBias(bb, CLASSNAMES)
    one.classnames = ["cat"]  # a custom learner is not checked on construction; the add-on refuses it
    with pytest.raises(ValueError, match="at least 2 classes"):
        pr.wrap(one, pr.RobustConfig(counterfactual=pr.CounterfactualConfig(**SMALL)))


def test_labels_outside_the_prepared_classes_are_refused(prepared):
    _, model = prepared
    addon = model.addons["counterfactual"]
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        addon.counterfactuals(torch.randn(2, addon.flow.feature_dim), torch.tensor([0, 1]), torch.tensor([1, 7]))


# ---------------------------------------------------------------------------------------------------------------
# 5. determinism, cache, saving


def test_prepare_is_seeded_and_cached_without_overwriting(bb, train_data, tmp_path):
    _, first = build(bb, "coop")
    logs = first.fit_addons(train_data, seed=3, cache_dir=tmp_path, progress=False)
    assert logs["counterfactual/flow_cached"] == 0.0
    folders = sorted(tmp_path.glob("counterfactual-flow-*"))
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"flow.safetensors", "flow.json"}
    saved = (folders[0] / "flow.safetensors").read_bytes()
    state = {k: v.clone() for k, v in first.addons["counterfactual"].flow.state_dict().items()}

    _, again = build(bb, "coop")
    again_logs = again.fit_addons(train_data, seed=3, cache_dir=tmp_path, progress=False)
    assert again_logs["counterfactual/flow_cached"] == 1.0
    assert again_logs["counterfactual/flow_loss"] == pytest.approx(logs["counterfactual/flow_loss"])
    for key, value in again.addons["counterfactual"].flow.state_dict().items():
        assert torch.equal(value, state[key]), key

    _, uncached = build(bb, "coop")  # the same seed without a cache trains the same flow
    uncached.fit_addons(train_data, seed=3, progress=False)
    for key, value in uncached.addons["counterfactual"].flow.state_dict().items():
        assert torch.equal(value, state[key]), key

    _, other = build(bb, "coop")  # another seed: another cache entry, the first one untouched
    other.fit_addons(train_data, seed=4, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("counterfactual-flow-*"))) == 2
    assert (folders[0] / "flow.safetensors").read_bytes() == saved
    assert not torch.equal(other.addons["counterfactual"].flow.net.outputs.weight, state["net.outputs.weight"])

    (folders[0] / "flow.safetensors").write_bytes(b"damaged")  # a damaged entry is retrained, not trusted
    _, repaired = build(bb, "coop")
    assert (
        repaired.fit_addons(train_data, seed=3, cache_dir=tmp_path, progress=False)["counterfactual/flow_cached"] == 0.0
    )
    for key, value in repaired.addons["counterfactual"].flow.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert (folders[0] / "flow.safetensors").read_bytes() == saved


def test_save_and_load_give_identical_counterfactuals_and_loss(prepared, bb, batch, tmp_path):
    learner, model = prepared
    with torch.no_grad():
        learner.ctx.add_(0.1 * torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0)))
    try:
        model.train()  # the regularizer is part of the training loss (eval mode gives the plain task loss)
        addon = model.addons["counterfactual"]
        state = model.trainable_state_dict()
        for key in ("flow.feature_mean", "flow.feature_scale", "flow.trained_steps", "flow.net.class_embedding.weight"):
            assert f"addons.counterfactual.{key}" in state
        z = learner.image_features(batch["pixel_values"])
        with torch.no_grad():
            out = model(**batch)
            cf, targets = addon.counterfactuals(z, batch["labels"], scores=out.logits)
        model.save_pretrained(tmp_path / "adapter")
        loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb)
        loaded.train()
        loaded_addon = loaded.addons["counterfactual"]
        assert loaded_addon.fitted
        assert float(loaded_addon.flow.feature_scale) == float(addon.flow.feature_scale)
        with torch.no_grad():
            loaded_out = loaded(**batch)
            loaded_cf, loaded_targets = loaded_addon.counterfactuals(z, batch["labels"], scores=loaded_out.logits)
        assert torch.equal(loaded_targets, targets)
        torch.testing.assert_close(loaded_cf, cf, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded_out.loss, out.loss, rtol=0, atol=1e-6)
        assert loaded_out.logs["counterfactual/loss"] == pytest.approx(out.logs["counterfactual/loss"], abs=1e-6)
        loaded.eval()  # eval mode: the plain cross-entropy, no regularizer
        with torch.no_grad():
            plain = loaded(**batch)
        expected = F.cross_entropy(plain.logits, batch["labels"])
        torch.testing.assert_close(plain.loss, expected)
        assert "counterfactual/loss" not in plain.logs
    finally:
        with torch.no_grad():  # the module-wide model is shared: restore its prompt
            learner.ctx.sub_(0.1 * torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------------------------
# 5. attribute twins: the nuisance changes, the class is kept


def _attribute_world(d: int = 16, seed: int = 0):
    """Features = class direction + attribute direction (+ noise); 90% of class c carry attribute c % 2."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    labels = torch.arange(4).repeat_interleave(20)
    attributes = labels % 2
    attributes[::10] = 1 - attributes[::10]  # the minority: 10% on the other value
    features = 2.0 * basis[labels] + 1.0 * basis[8 + attributes] + 0.01 * torch.randn(80, d, generator=g)
    return basis, labels, attributes, features


def test_attribute_offsets_recover_the_attribute_directions_without_the_class(bb, monkeypatch):
    basis, labels, attributes, features = _attribute_world(bb.embed_dim)
    from prompt_robust import attributes as pseudo

    # a zero-shot attribute classifier that reads the attribute exactly
    monkeypatch.setattr(pseudo, "attribute_text_features", lambda *args, **kwargs: basis[8:10].clone())
    _, model = build(bb, "coop", twin="attribute", attribute_values=["grass", "water"])
    addon = model.addons["counterfactual"]
    logs = addon.fit_attribute_offsets(features, labels)
    assert addon.fitted and logs["counterfactual/attribute_share/water"] == pytest.approx(0.5)
    z = F.normalize(features, dim=-1)
    twins, read, targets = addon.attribute_twins(z)
    assert torch.equal(read, attributes) and torch.equal(targets, 1 - attributes)
    # the exact twin: the same class direction with the other attribute
    exact = F.normalize(2.0 * basis[labels] + 1.0 * basis[8 + (1 - attributes)], dim=-1)
    assert (twins * exact).sum(-1).min() > 0.98
    # the offsets carry no class: plain means of the values would (class and attribute are correlated)
    o = addon.attribute_offsets
    assert ((o[1] - o[0]) @ basis[:4].t()).abs().max() < 0.05
    plain = z[attributes == 1].mean(0) - z[attributes == 0].mean(0)
    assert (plain @ basis[:4].t()).abs().max() > 0.2


def _split_by_sign(monkeypatch, d: int) -> None:
    """A zero-shot attribute classifier that reads the sign of a fixed direction (the random test backbone
    names no attribute)."""
    from prompt_robust import attributes as pseudo

    v = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(5)), dim=0)
    monkeypatch.setattr(pseudo, "attribute_text_features", lambda *args, **kwargs: torch.stack([v, -v]))


def test_attribute_twin_loss_is_the_twins_cross_entropy_and_reaches_the_prompt(bb, train_data, batch, monkeypatch):
    _split_by_sign(monkeypatch, bb.embed_dim)
    learner, model = build(bb, "coop", twin="attribute", attribute_values=["grass", "water"])
    model.fit_addons(train_data, progress=False)
    addon = model.addons["counterfactual"]
    assert addon.fitted and not addon.flow.fitted  # no feature flow is trained for attribute twins
    model.train()
    torch.manual_seed(3)
    out = model(**batch)
    assert {"counterfactual/loss", "counterfactual/kept_class", "counterfactual/attribute_flipped"} <= set(out.logs)
    # ground truth: the same twins (same random targets) through the learner's class text features
    torch.manual_seed(3)
    z = learner.image_features(batch["pixel_values"])
    twins, _, _ = addon.attribute_twins(z)
    text = learner(batch["pixel_values"]).text_features
    expected = F.cross_entropy(bb.logit_scale * twins @ text.t(), batch["labels"])
    assert out.logs["counterfactual/loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    learner.zero_grad()
    out.loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_attribute_twins_survive_save_and_load(bb, train_data, batch, tmp_path, monkeypatch):
    _split_by_sign(monkeypatch, bb.embed_dim)
    _, model = build(bb, "coop", twin="attribute", attribute_values=["grass", "water"])
    model.fit_addons(train_data, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb)
    a, b = model.addons["counterfactual"], loaded.addons["counterfactual"]
    assert b.fitted
    z = a.learner.image_features(batch["pixel_values"])
    targets = torch.tensor([1, 0, 1, 0])
    torch.testing.assert_close(a.attribute_twins(z, targets)[0], b.attribute_twins(z, targets)[0], atol=0, rtol=0)


def test_an_attribute_value_nobody_has_is_refused(bb, monkeypatch):
    basis, labels, _, features = _attribute_world(bb.embed_dim)
    from prompt_robust import attributes as pseudo

    # a classifier that reads every image as the first value
    monkeypatch.setattr(
        pseudo, "attribute_text_features", lambda *a, **k: torch.stack([basis[8] + basis[9], -basis[8]])
    )
    _, model = build(bb, "coop", twin="attribute", attribute_values=["grass", "lava"])
    with pytest.raises(ValueError, match=r"no training image is read as \['lava'\]"):
        model.addons["counterfactual"].fit_attribute_offsets(features, labels)
    assert not model.addons["counterfactual"].fitted


def test_a_value_nobody_has_is_dropped_when_two_remain(bb, monkeypatch, caplog):
    basis, labels, attributes, features = _attribute_world(bb.embed_dim)
    from prompt_robust import attributes as pseudo

    # the first two values read the attribute exactly; "lava" (-basis[8] - basis[9]) never wins
    text = torch.stack([basis[8], basis[9], -basis[8] - basis[9]])
    monkeypatch.setattr(pseudo, "attribute_text_features", lambda *a, **k: text)
    _, model = build(bb, "coop", twin="attribute", attribute_values=["grass", "water", "lava"])
    addon = model.addons["counterfactual"]
    with caplog.at_level("WARNING"):
        logs = addon.fit_attribute_offsets(features, labels)
    assert "['lava']" in caplog.text and logs["counterfactual/attribute_values_seen"] == 2.0
    assert addon.fitted and addon.attribute_seen.tolist() == [True, True, False]
    z = F.normalize(features, dim=-1)
    _, read, targets = addon.attribute_twins(z)
    assert torch.equal(read, attributes) and torch.equal(targets, 1 - attributes)  # never towards "lava"
    with pytest.raises(ValueError, match=r"\['lava'\] never occurred"):
        addon.attribute_twins(z[:2], torch.tensor([2, 0]))


def test_auto_twin_uses_attribute_twins_exactly_when_the_attribute_is_named(bb):
    assert build(bb, "coop")[1].addons["counterfactual"].twin == "class"
    named = build(bb, "coop", attribute_values=["grass", "water"])[1].addons["counterfactual"]
    assert named.twin == "attribute" and hasattr(named, "attribute_offsets")
    with pytest.raises(ValueError, match="at least 2 distinct"):
        pr.CounterfactualConfig(attribute_values=["grass"])


def test_background_kept_reads_both_sides_with_the_attribute_classifier(bb, monkeypatch):
    from prompt_robust import attributes as pseudo
    from prompt_robust.bench.suites.counterfactual import background_kept

    d = bb.embed_dim
    basis = torch.eye(d)
    # six background "words": the first six axes
    monkeypatch.setattr(pseudo, "attribute_text_features", lambda *a, **k: basis[:6])
    factual = F.normalize(basis[[0, 1, 2, 3]] + 0.1, dim=-1)
    same = factual.unsqueeze(1).expand(-1, 2, -1)
    assert background_kept(None, factual, same) == 1.0
    moved = torch.stack([basis[[0, 5]], basis[[1, 1]], basis[[4, 4]], basis[[3, 2]]])  # (4, 2, d)
    assert background_kept(None, factual, moved) == pytest.approx(4 / 8)  # 1 + 2 + 0 + 1 of 8 kept
