"""The counterfactual generator's memo (``CounterfactualConfig.cache_mb``): training with it gives the per-step
counterfactuals and loss (and the same loss in expectation over random targets), repeated features cost no
network call, a changed flow empties it, the size cap evicts, and ``cache_mb=0`` is the per-step path exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES

import prompt_robust as pr
import prompt_robust.addons.counterfactual  # registers the "counterfactual" add-on
from prompt_robust.addons.base import ForwardState
from prompt_robust.addons.counterfactual import CounterfactualGenerator, FeatureFlow, fit_feature_flow

SMALL = {"hidden_dim": 32, "depth": 1, "train_steps": 40, "train_batch_size": 12}
#: memo rows against rows of a differently composed batch: batched matrix products may round differently in the
#: last bits (measured: 3e-8 on these counterfactuals, 1.2e-7 on their loss, 4.8e-7 on the demo's loss)
ATOL = 1e-6


def build(bb, train_data, **settings):
    """A seeded CoOp learner wrapped with class counterfactuals, its feature flow fitted (seed 0)."""
    torch.manual_seed(0)
    learner = pr.build_learner("coop", bb, CLASSNAMES, n_ctx=4)
    config = pr.CounterfactualConfig(**{**SMALL, "twin": "class", **settings})
    model = pr.wrap(learner, pr.RobustConfig(counterfactual=config))
    model.fit_addons(train_data, seed=0, progress=False)
    return learner, model


def record_generations(addon):
    """Every call of the add-on's generator, in order: ``(features, targets, CounterfactualOutput)``."""
    calls, generate = [], addon.generator.generate

    def spy(features, labels, targets, validator=None):
        calls.append((features, targets, generate(features, labels, targets, validator)))
        return calls[-1][-1]

    addon.generator.generate = spy
    return calls


def train(model, train_data, *, epochs=3, batch_size=4, lr=0.5, seed=0):
    """Prompt training over the fixed few-shot set (the same batches for the same seed): the counterfactual loss
    of every step, the generator's calls (:func:`record_generations`) and the trained prompt."""
    images = torch.stack([image for image, _ in train_data])
    labels = torch.tensor([label for _, label in train_data])
    addon = model.addons["counterfactual"]
    calls = record_generations(addon)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)  # a large step, so the prompt (and its confusable classes) moves
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # random targets draw from the global RNG
    model.train()
    losses = []
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=order).split(batch_size):
            out = model(pixel_values=images[index], labels=labels[index])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.logs["counterfactual/loss"])
    return losses, calls, [p.detach().clone() for p in params]


# ---------------------------------------------------------------------------------------------------------------
# 1. the same counterfactuals and loss as per-step generation, step by step


@pytest.mark.parametrize("search", [0, 3])
@pytest.mark.parametrize("target", ["confusable", "random"])
def test_training_with_the_memo_gives_the_per_step_counterfactuals_and_loss(bb, train_data, target, search):
    settings = {"target": target, "proximity_search": search, "num_counterfactuals": 2}
    runs = {}
    for cache_mb in (0.0, 16.0):
        _, model = build(bb, train_data, cache_mb=cache_mb, **settings)
        runs[cache_mb] = train(model, train_data)
    (losses, calls, prompt), (memo_losses, memo_calls, memo_prompt) = runs[0.0], runs[16.0]
    outputs, memo_outputs = [out for *_, out in calls], [out for *_, out in memo_calls]
    assert len(outputs) == len(memo_outputs) == 9  # 3 epochs x 3 batches
    for out, memo_out in zip(outputs, memo_outputs, strict=True):
        assert torch.equal(memo_out.proximity, out.proximity)  # the search kept the same λ for every row
        torch.testing.assert_close(memo_out.counterfactuals, out.counterfactuals, rtol=0, atol=ATOL)
        torch.testing.assert_close(memo_out.inverted, out.inverted, rtol=0, atol=ATOL)
        if search:
            assert torch.equal(memo_out.valid, out.valid)
    assert memo_losses == pytest.approx(losses, abs=ATOL)
    for p, memo_p in zip(prompt, memo_prompt, strict=True):
        torch.testing.assert_close(memo_p, p, rtol=0, atol=1e-5)
    # and the memo did work: later epochs reuse inversions and candidates
    per_step = sum(out.evaluations for out in outputs)
    memoised = sum(out.evaluations for out in memo_outputs)
    assert memoised < 0.75 * per_step, (memoised, per_step)


# ---------------------------------------------------------------------------------------------------------------
# 2. the same loss in expectation (random targets, averaged over draws)


def _infonce(text, labels, z, counterfactuals, tau):
    """Per-sample InfoNCE of the true-class text feature against ``z`` and its counterfactuals ``(b, K, d)``."""
    true_text = text[labels].float()
    scores = torch.cat(
        [(true_text * z).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", true_text, counterfactuals)], 1
    )
    return torch.logsumexp(scores / tau, dim=1) - scores[:, 0] / tau  # (b,)


def test_loss_expectation_over_random_targets_matches_the_per_step_loss(bb, train_data):
    learner, model = build(bb, train_data, target="random", proximity_search=2)
    _, per_step_model = build(bb, train_data, target="random", proximity_search=2, cache_mb=0.0)
    images = torch.stack([image for image, _ in train_data])
    labels = torch.tensor([label for _, label in train_data])
    batch = {"pixel_values": images, "labels": labels}
    model.train()
    with torch.no_grad():
        output = learner(images)
        z = learner.image_features(images).float()
    state = ForwardState.for_batch(learner, batch, output)
    memo_addon, addon = model.addons["counterfactual"], per_step_model.addons["counterfactual"]
    tau = memo_addon.config.temperature

    # the exact expectation: every sample's target is uniform over the other classes, so average the per-step
    # loss of each sample over all of them
    n_classes = len(CLASSNAMES)
    per_target = torch.zeros(len(labels), n_classes)
    for shift in range(1, n_classes):
        targets = (labels + shift) % n_classes
        cf, _ = addon.counterfactuals(z, labels, targets, text_features=output.text_features)
        per_target[torch.arange(len(labels)), targets] = _infonce(output.text_features, labels, z, cf, tau)
    expected = float((per_target.sum(1) / (n_classes - 1)).mean())

    def draws(target_addon, seed, n=200):
        torch.manual_seed(seed)
        with torch.no_grad():
            return torch.tensor([float(target_addon.loss_terms(state).logs["counterfactual/loss"]) for _ in range(n)])

    memo_draws, per_step_draws = draws(memo_addon, seed=1), draws(addon, seed=2)
    for sample in (memo_draws, per_step_draws):
        error = float(sample.std()) / math.sqrt(len(sample))
        assert abs(float(sample.mean()) - expected) < 4 * error, (float(sample.mean()), expected, error)
    # with the same draws the two are the same loss (not only in expectation)
    torch.testing.assert_close(draws(memo_addon, seed=2, n=50), per_step_draws[:50], rtol=0, atol=ATOL)
    info = memo_addon.generator.cache_info()
    assert info.hits > 10 * info.misses  # 12 samples x 3 targets x a few λ: the memo serves nearly every draw


# ---------------------------------------------------------------------------------------------------------------
# 3. repeated features cost no network call


def test_second_epoch_is_served_by_the_memo_without_network_calls(bb, train_data):
    _, model = build(bb, train_data, proximity_search=3, num_counterfactuals=2)
    addon = model.addons["counterfactual"]
    network = []  # one entry per call of the velocity network
    velocity = addon.flow.velocity
    addon.flow.velocity = lambda *args: network.append(1) or velocity(*args)
    # a frozen prompt (lr 0) makes the second epoch ask for exactly the first epoch's targets and λ
    _, calls, _ = train(model, train_data, epochs=2, lr=0.0)
    outputs = [out for *_, out in calls]
    first, second = outputs[:3], outputs[3:]
    assert all(out.evaluations > 0 for out in first)
    assert sum(out.evaluations for out in first) == len(network)  # evaluations counts the network calls made
    info = addon.generator.cache_info()
    assert [out.evaluations for out in second] == [0, 0, 0]
    assert len(network) == sum(out.evaluations for out in first)  # no call in the second epoch
    assert info.entries > 0 and info.evictions == 0 and info.invalidations == 0
    # the K = 2 copies of a feature share one inversion: 12 inverted rows, not 24
    inverted = [key for key in addon.generator._memo.entries if key[0] == "inverted"]
    assert len(inverted) == len(train_data)
    # the same (feature, class, target, λ) gives the same counterfactual, whichever batch it came in
    by_row = {}
    for features, targets, out in calls:
        for z, y_target, cf, lam in zip(features, targets, out.counterfactuals, out.proximity, strict=True):
            by_row.setdefault((tuple(z.tolist()), int(y_target), float(lam)), []).append(cf)
    assert len(by_row) < sum(len(out.counterfactuals) for out in outputs)  # rows did repeat
    assert all(torch.equal(cfs[0], cf) for cfs in by_row.values() for cf in cfs[1:])


def test_changed_features_miss_the_memo(bb, train_data):
    """Features that differ (e.g. augmented views) are other keys: correct, but nothing is saved."""
    _, model = build(bb, train_data, proximity_search=0)
    generator = model.addons["counterfactual"].generator
    z = F.normalize(torch.randn(6, generator.flow.feature_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    y, targets = torch.arange(6) % 4, (torch.arange(6) + 1) % 4
    first = generator.generate(z, y, targets)
    assert generator.generate(z, y, targets).evaluations == 0
    nudged = generator.generate(z + 1e-6, y, targets)
    assert nudged.evaluations == first.evaluations
    assert generator.generate(z, y, (targets + 1) % 4).evaluations == first.evaluations // 2  # new target: no inversion


# ---------------------------------------------------------------------------------------------------------------
# 4. a changed flow empties the memo; 5. the size cap; 6. cache_mb=0


def _mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    return means[labels] + 0.5 * torch.randn(n, 2, generator=generator), labels


@pytest.fixture(scope="module")
def toy():
    """A small flow on a 2-D three-Gaussian mixture and 8 queries of class 0 towards class 1."""
    features, labels = _mixture(120, seed=0)
    flow = FeatureFlow(feature_dim=2, num_classes=3, hidden_dim=32, depth=1)
    fit_feature_flow(flow, features, labels, steps=150, lr=3e-3, batch_size=64, progress=False)
    z = _mixture(24, seed=1)[0][::3]  # (8, 2) class-0 points
    return flow, z, torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)


def _validator(x: torch.Tensor) -> torch.Tensor:
    return -(x.unsqueeze(1) - torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]])).pow(2).sum(-1)


def test_refitting_loading_or_editing_the_flow_empties_the_memo(toy):
    flow, z, source, target = toy
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    try:
        gen = CounterfactualGenerator(flow, proximity_search=2)
        before = gen.generate(z, source, target, _validator)
        assert gen.generate(z, source, target, _validator).evaluations == 0
        fit_feature_flow(flow, *_mixture(120, seed=5), steps=30, lr=3e-3, batch_size=64, seed=5, progress=False)
        refitted = gen.generate(z, source, target, _validator)
        assert refitted.evaluations == before.evaluations and gen.cache_info().invalidations == 1
        fresh = CounterfactualGenerator(flow, proximity_search=2, cache_mb=0).generate(z, source, target, _validator)
        assert torch.equal(refitted.counterfactuals, fresh.counterfactuals)  # the new flow's, not the memo's
        flow.load_state_dict(state)  # loading the first weights again: their counterfactuals again
        loaded = gen.generate(z, source, target, _validator)
        assert loaded.evaluations == before.evaluations and gen.cache_info().invalidations == 2
        assert torch.equal(loaded.counterfactuals, before.counterfactuals)
        with torch.no_grad():  # any in-place change of a weight or buffer
            flow.net.outputs.bias.add_(0.1)
        assert gen.generate(z, source, target, _validator).evaluations == before.evaluations
        gen.noise_level = 0.7  # and a changed setting
        assert gen.generate(z, source, target, _validator).evaluations == before.evaluations
        assert gen.cache_info().invalidations == 4
    finally:
        flow.load_state_dict(state)


def test_refitting_the_add_on_empties_the_memo(bb, train_data):
    learner, model = build(bb, train_data)
    addon = model.addons["counterfactual"]
    images = torch.stack([image for image, _ in train_data[:4]])
    batch = {"pixel_values": images, "labels": torch.arange(4)}
    model.train()
    with torch.no_grad():
        output = learner(images)
        first = addon.loss_terms(ForwardState.for_batch(learner, batch, output)).loss
    assert addon.generator.cache_info().entries > 0
    model.fit_addons(train_data, seed=1, refit=True, progress=False)  # another seed: another flow
    assert addon.generator.cache_info().entries == 0
    _, other = build(bb, train_data, cache_mb=0.0)
    other.fit_addons(train_data, seed=1, refit=True, progress=False)
    with torch.no_grad():
        refitted = addon.loss_terms(ForwardState.for_batch(learner, batch, output)).loss
        expected = other.addons["counterfactual"].loss_terms(ForwardState.for_batch(learner, batch, output)).loss
    assert not torch.allclose(refitted, first)
    torch.testing.assert_close(refitted, expected, rtol=0, atol=ATOL)


def test_the_size_cap_evicts_the_least_recently_used_rows(toy):
    flow, z, source, target = toy
    row = 2 * 4 + 768  # a 2-d float32 row and the bookkeeping counted per entry
    gen = CounterfactualGenerator(flow, proximity_search=0, cache_mb=10 * row / (1 << 20))  # room for 10 rows

    def generate(rows):
        return gen.generate(z[rows], source[rows], target[rows])

    first, single = generate(slice(0, 4)), generate(slice(4, 5))  # an inversion and a candidate per row: 10 rows
    assert (gen.cache_info().entries, gen.cache_info().evictions) == (10, 0)
    assert generate(slice(0, 4)).evaluations == 0  # used again: row 4 is now the least recently used
    generate(slice(5, 6))  # 2 more rows: row 4's two go, not the older rows 0-3
    info = gen.cache_info()
    assert (info.entries, info.evictions, info.nbytes) == (10, 2, 10 * row) and info.nbytes <= info.max_bytes
    assert generate(slice(0, 4)).evaluations == 0
    again = generate(slice(4, 5))
    assert again.evaluations == single.evaluations == 20  # inverted and integrated again
    torch.testing.assert_close(again.counterfactuals, single.counterfactuals, rtol=0, atol=ATOL)
    assert gen.cache_info().nbytes <= gen.cache_info().max_bytes
    # a cap smaller than one row keeps nothing and still generates
    tiny = CounterfactualGenerator(flow, proximity_search=0, cache_mb=100 / (1 << 20))
    torch.testing.assert_close(tiny.generate(z[:4], source[:4], target[:4]).counterfactuals, first.counterfactuals)
    assert tiny.cache_info().entries == 0
    gen.clear_cache()
    assert (gen.cache_info().entries, gen.cache_info().nbytes) == (0, 0)


def _per_step_reference(gen, features, labels, targets, validator):
    """The generation algorithm as it was before the memo (copied from the previous version of ``generate``)."""
    flow = gen.flow
    x1 = flow.encode(features)
    xt0, evaluations = gen.invert(x1, labels)
    span, start = gen.noise_level, gen.t0

    def integrate(lam):
        nonlocal evaluations

        def forwards(s, x):
            return span * gen.guided_velocity(x, start + span * s, labels, targets, x1, lam)

        out = gen.sampler.sample(forwards, xt0)
        evaluations += out.evaluations
        return flow.decode(out.sample).to(features.dtype)

    low = torch.full((features.shape[0],), gen.proximity_weight)
    best = integrate(low)
    valid = gen.accepts(validator, best, targets)
    high = torch.full_like(low, gen.proximity_max)
    for _ in range(gen.proximity_search):
        middle = (low + high) / 2
        candidate = integrate(middle)
        accepted = gen.accepts(validator, candidate, targets)
        best = torch.where(accepted.unsqueeze(1), candidate, best)
        valid = valid | accepted
        low, high = torch.where(accepted, middle, low), torch.where(accepted, high, middle)
    return best, xt0, evaluations, low, valid


@pytest.mark.parametrize("search", [0, 3])
def test_cache_mb_zero_is_the_per_step_path_exactly(toy, search):
    flow, z, source, target = toy
    reference = _per_step_reference(
        CounterfactualGenerator(flow, proximity_search=search), z, source, target, _validator
    )
    off = CounterfactualGenerator(flow, proximity_search=search, cache_mb=0)
    on = CounterfactualGenerator(flow, proximity_search=search)
    for _ in range(2):  # every call integrates the whole batch again
        out = off.generate(z, source, target, _validator)
        assert torch.equal(out.counterfactuals, reference[0]) and torch.equal(out.inverted, reference[1])
        assert out.evaluations == reference[2] == 2 * 5 * (2 + search)
        assert torch.equal(out.proximity, reference[3]) and torch.equal(out.valid, reference[4])
    assert off.cache_info() == off.cache_info().__class__(0, 0, 0, 0, 0, 0, 0)
    # a memo's first call on distinct rows computes the same batches, so it is bit-identical too
    first = on.generate(z, source, target, _validator)
    assert torch.equal(first.counterfactuals, reference[0]) and first.evaluations == reference[2]
