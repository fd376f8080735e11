"""The pieces two or more parts of the library share (issue 15): the flow-matching loss and time embedding, the
linear probe, accuracy, the collate, the device lookup, the counterfactual generator's settings, the top-level
training API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prompt_robust as pr
from prompt_robust.addons.counterfactual import CounterfactualGenerator, FeatureFlow, fit_linear_probe
from prompt_robust.addons.refiner import PromptFlowNet
from prompt_robust.data.items import collate_images_labels, collate_items
from prompt_robust.eval import LinearProbe, accuracy
from prompt_robust.flows import TimeEmbedding, flow_matching_loss, time_embedding
from prompt_robust.layers import module_device

# ---------------------------------------------------------------------------------------------------------------
# flows


def test_flow_matching_loss_is_the_straight_path_regression_with_the_documented_draws():
    x1 = torch.randn(6, 4)
    seen = {}

    def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["xt"], seen["t"] = xt, t
        return 2 * xt

    loss = flow_matching_loss(velocity, x1, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # the ground truth: noise first, then one time per row
    x0 = torch.randn(6, 4, generator=generator)
    t = torch.rand(6, 1, generator=generator)
    xt = (1 - t) * x0 + t * x1
    torch.testing.assert_close(seen["xt"], xt, rtol=0, atol=0)
    torch.testing.assert_close(seen["t"], t.squeeze(1), rtol=0, atol=0)
    torch.testing.assert_close(loss, ((2 * xt - (x1 - x0)) ** 2).mean())
    # without a generator: the global RNG of x1's device, drawn in the same order
    torch.manual_seed(5)
    plain = flow_matching_loss(velocity, x1)
    torch.manual_seed(5)
    x0, t = torch.randn_like(x1), torch.rand(6, 1)
    torch.testing.assert_close(plain, F.mse_loss(2 * ((1 - t) * x0 + t * x1), x1 - x0))


def test_feature_flow_loss_draws_noise_times_then_dropout_from_one_stream():
    flow = FeatureFlow(feature_dim=3, num_classes=2, hidden_dim=8, depth=1)
    nn.init.normal_(flow.net.outputs.weight)  # a non-zero field, so the labels matter
    features, labels = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    loss = flow.flow_matching_loss(features, labels, cond_dropout=0.5, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    x1 = flow.encode(features)
    x0, t = torch.randn(5, 3, generator=generator), torch.rand(5, 1, generator=generator)
    drop = torch.rand(5, generator=generator) < 0.5
    used = torch.where(drop, torch.full_like(labels, flow.null_index), labels)
    expected = F.mse_loss(flow.velocity((1 - t) * x0 + t * x1, t.squeeze(1), used), x1 - x0)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_time_embedding_keeps_the_saved_names_and_shares_one_time_over_the_batch():
    embed = TimeEmbedding(8)
    assert sorted(embed.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # adapters saved before
    torch.testing.assert_close(embed(torch.tensor(0.25), batch=3), embed(torch.full((3,), 0.25), batch=3))
    net = PromptFlowNet({"text": (2, 4)}, cond_dim=3, hidden_dim=8, layers=1, heads=2)
    assert {"time.0.weight", "time.2.weight"} <= set(net.state_dict())
    assert {"net.time.0.weight", "net.time.2.weight"} <= set(FeatureFlow(2, 2, hidden_dim=8).state_dict())
    features = time_embedding(torch.tensor([0.0, 0.5]), 6)
    torch.testing.assert_close(features[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))  # sin 0 = 0, cos 0 = 1


# ---------------------------------------------------------------------------------------------------------------
# probe and accuracy


def test_counterfactual_probe_is_the_shared_probe_in_its_settings():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=generator), torch.arange(60) % 3
    module = fit_linear_probe(x, y, 3, weight_decay=1e-3, max_iter=40)
    shared = LinearProbe(
        2e-3,
        max_iter=40,
        normalize=False,
        dtype=torch.float32,
        device=None,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
        history_size=100,
        fused=True,
    ).fit(x, y, 3)
    assert torch.equal(module.weight, shared.weight) and torch.equal(module.bias, shared.bias)
    assert not module.weight.requires_grad and isinstance(module, nn.Linear)
    torch.testing.assert_close(module(x), shared.logits(x))
    # the fused and unfused logits are the same function (they differ only in rounding)
    unfused = LinearProbe(1e-3, normalize=False).fit(x, y, 3)
    fused = LinearProbe(1e-3, normalize=False, fused=True).fit(x, y, 3)
    torch.testing.assert_close(unfused.weight, fused.weight, rtol=1e-6, atol=1e-8)


def test_linear_probe_minimises_the_documented_objective():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=generator, dtype=torch.float64), torch.arange(50) % 2
    probe = LinearProbe(0.1, normalize=False).fit(x, y)

    def largest_gradient(penalty: float) -> float:
        weight, bias = probe.weight.clone().requires_grad_(True), probe.bias.clone().requires_grad_(True)
        loss = F.cross_entropy(x @ weight.t() + bias, y) + penalty * weight.pow(2).sum()
        return max(float(g.abs().max()) for g in torch.autograd.grad(loss, (weight, bias)))

    # a stationary point of the strictly convex loss with penalty reg/2 (and not of the one with penalty reg)
    assert largest_gradient(0.05) < 1e-6 < 1e-3 < largest_gradient(0.1)


def test_accuracy_takes_indices_or_scores():
    logits, labels = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    assert accuracy(logits, labels) == accuracy(logits.argmax(-1), labels) == 2 / 3
    with pytest.raises(ValueError, match="differ in length: 3 vs 2"):
        accuracy(logits, labels[:2])


# ---------------------------------------------------------------------------------------------------------------
# collate and device


class _Guarded(dict):
    def __getitem__(self, key):
        if key == "secret":
            raise AssertionError("read a key that was not asked for")
        return super().__getitem__(key)


def test_collate_items_passes_extras_through_and_reads_only_what_is_asked():
    items = [{"pixel_values": torch.full((3, 2, 2), float(i)), "labels": i, "groups": 10 + i} for i in range(3)]
    batch = collate_items(items)
    assert list(batch) == ["pixel_values", "labels", "groups"]
    assert batch["groups"].tolist() == [10, 11, 12] and batch["pixel_values"].shape == (3, 3, 2, 2)
    pairs = collate_items([(item["pixel_values"], item["labels"]) for item in items])
    assert torch.equal(pairs["pixel_values"], batch["pixel_values"]) and torch.equal(pairs["labels"], batch["labels"])
    guarded = [_Guarded(item, secret=1) for item in items]
    assert list(collate_items(guarded, keys=["labels"])) == ["labels"]
    with pytest.raises(ValueError, match=r"no \['groups'\] key"):
        collate_items([(torch.zeros(3, 2, 2), 0)], keys=["labels", "groups"])
    checked = collate_images_labels(items)
    assert list(checked) == ["pixel_values", "labels"] and checked["labels"].dtype == torch.long


def test_module_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.Identity()) == torch.device("cpu")  # no parameters: the CPU


# ---------------------------------------------------------------------------------------------------------------
# counterfactual generator settings, top-level API


def test_generator_settings_have_one_source_of_defaults():
    flow = FeatureFlow(feature_dim=2, num_classes=2, hidden_dim=8, depth=0)
    gen, config = CounterfactualGenerator(flow), pr.CounterfactualConfig()
    for name in CounterfactualGenerator.SETTINGS:
        if name in ("num_steps", "method"):
            continue
        assert getattr(gen, name) == getattr(config, name), name
    assert (gen.sampler.num_steps, gen.sampler.method) == (config.num_steps, config.method)
    custom = pr.CounterfactualConfig(proximity_search=0, validity_margin=0.0, num_steps=3, method="euler")
    gen = CounterfactualGenerator(flow, custom, noise_level=0.25)
    assert (gen.proximity_search, gen.validity_margin, gen.noise_level) == (0, 0.0, 0.25)
    assert repr(gen.sampler) == "ODESampler(num_steps=3, method='euler')"
    assert vars(CounterfactualGenerator.from_config(flow, custom)).keys() == vars(gen).keys()
    with pytest.raises(ValueError, match="noise_level must be in"):
        CounterfactualGenerator(flow, noise_level=0.0)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['temperature'\]"):
        CounterfactualGenerator(flow, temperature=0.1)


def test_training_api_is_exported():
    from prompt_robust import training

    assert (pr.fit, pr.evaluate, pr.FitConfig) == (training.fit, training.evaluate, training.FitConfig)
    assert {"fit", "evaluate", "FitConfig", "load_backbone", "build_learner"} <= set(pr.__all__)
