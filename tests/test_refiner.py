"""The prompt-space diffusion refiner: sampler accuracy, per-sample targets, stages, sampling, saving, caching."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, LEARNER_KWARGS, N_TRAIN
from test_custom_learner import MyTextBias

import prompt_robust as pr
from prompt_robust.addons.refiner import PromptFlowNet, overfit_prompts
from prompt_robust.addons.refiner import targets as targets_module
from prompt_robust.flows import ODESampler

SMALL = {"hidden_dim": 32, "layers": 1, "heads": 4, "inner_steps": 2, "train_steps": 30, "train_batch_size": 12}


@pytest.fixture(scope="module")
def test_images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(bb, name="coop", **refiner):
    """A freshly seeded learner and its refiner-wrapped model."""
    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS[name])
    config = pr.RefinerConfig(**{**SMALL, **refiner})
    return learner, pr.wrap(learner, pr.RobustConfig(refiner=config))


def collate(items):
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


@pytest.fixture(scope="module")
def fitted(bb, train_data):
    """A CoOp learner with a trained refiner (module-wide; tests only read it or restore what they change)."""
    learner, model = build(bb, "coop")
    model.fit_addons(train_data, progress=False)
    model.eval()
    return learner, model


# ---------------------------------------------------------------------------------------------------------------
# 1-2. the sampler


def _errors(method, rate, steps):
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    exact = x0 * math.exp(rate(None))
    out = {}
    for n in steps:
        result = ODESampler(num_steps=n, method=method).sample(lambda t, x: rate(t) * x, x0)
        assert result.sample.dtype == torch.float64 and result.sample.shape == x0.shape
        out[n] = float((result.sample - exact).abs().max())
    return out


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_sampler_observed_order_on_linear_odes(method, order):
    a, b = -1.3, -0.8
    autonomous = _errors(method, lambda t: a, (4, 8, 16))  # dx/dt = a x -> x0 exp(a)
    # dx/dt = (a + b t) x -> x0 exp(a + b / 2); t=None stands for the exponent of the exact solution
    timed = _errors(method, lambda t: a + b / 2 if t is None else a + b * t, (4, 8, 16))
    for errors in (autonomous, timed):
        for n in (4, 8):
            observed = math.log2(errors[n] / errors[2 * n])
            assert abs(observed - order) < 0.3, (method, errors, observed)
        assert errors[16] < errors[8] < errors[4]


def test_sampler_steps_match_hand_written_schemes():
    a, b = -1.3, 0.7

    def velocity(t, x):
        return (a + b * t) * x

    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    h = 1 / 5
    euler, midpoint, rk38 = x0.clone(), x0.clone(), x0.clone()
    for k in range(5):
        t = k / 5
        euler = euler + h * velocity(t, euler)
        midpoint = midpoint + h * velocity(t + h / 2, midpoint + h / 2 * velocity(t, midpoint))
        k1 = velocity(t, rk38)  # the 3/8-rule RK4 of torchdiffeq
        k2 = velocity(t + h / 3, rk38 + h * k1 / 3)
        k3 = velocity(t + 2 * h / 3, rk38 + h * (k2 - k1 / 3))
        k4 = velocity(t + h, rk38 + h * (k1 - k2 + k3))
        rk38 = rk38 + h * (k1 + 3 * k2 + 3 * k3 + k4) / 8
    for method, expected, evaluations in (("euler", euler, 5), ("midpoint", midpoint, 10), ("rk4", rk38, 20)):
        times = []

        def recorded(t, x, times=times):
            times.append(float(t))
            return velocity(t, x)

        sampler = ODESampler(num_steps=5, method=method)
        out = sampler.sample(recorded, x0)
        torch.testing.assert_close(out.sample, expected, rtol=0, atol=1e-12)
        assert out.evaluations == evaluations == sampler.evaluations_per_sample == len(times)
        if method == "euler":
            assert times == pytest.approx([k / 5 for k in range(5)], abs=1e-15)


def test_sampler_keeps_dtype_and_shape_of_the_state():
    x0 = torch.ones(2, 3, 4)
    out = ODESampler(3, "midpoint").sample(lambda t, x: -x, x0)
    assert out.sample.dtype == torch.float32 and out.sample.shape == (2, 3, 4)
    torch.testing.assert_close(out.sample, torch.full_like(x0, (1 - 1 / 3 + 1 / 18) ** 3))


# ---------------------------------------------------------------------------------------------------------------
# 3. configuration errors


def test_bad_configs_raise_clear_value_errors(bb):
    with pytest.raises(ValueError, match="num_steps"):
        pr.RefinerConfig(num_steps=0)
    with pytest.raises(ValueError, match="rk5") as err:
        pr.RefinerConfig(method="rk5")
    assert all(name in str(err.value) for name in ("euler", "midpoint", "rk4"))
    assert "Did you mean 'rk4'?" in str(err.value)  # the closest valid name is suggested
    with pytest.raises(ValueError, match="num_steps"):
        ODESampler(0)
    with pytest.raises(ValueError, match="num_steps"):
        ODESampler(True)
    with pytest.raises(ValueError, match="heun") as err:
        ODESampler(5, "heun")
    assert all(name in str(err.value) for name in ("euler", "midpoint", "rk4"))
    with pytest.raises(ValueError, match="hidden_dim"):
        pr.RefinerConfig(hidden_dim=30, heads=4)
    with pytest.raises(ValueError, match="heads"):
        PromptFlowNet({"text": (4, 32)}, cond_dim=8, hidden_dim=30, heads=4)
    with pytest.raises(ValueError, match="prompt"):
        PromptFlowNet({}, cond_dim=8)
    zeroshot = pr.build_learner("zeroshot", bb, CLASSNAMES)
    with pytest.raises(ValueError, match="prompt"):
        pr.wrap(zeroshot, pr.RobustConfig(refiner=pr.RefinerConfig()))


# ---------------------------------------------------------------------------------------------------------------
# 4. per-sample overfitted targets


@pytest.mark.parametrize("name", ["coop", "vpt", "cocoop", "maple"])
def test_overfit_prompts_batched_equals_one_sample_at_a_time(bb, train_data, name):
    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS[name])
    batch = collate([{"pixel_values": x, "labels": y} for x, y in train_data[:4]])
    x, y = batch["pixel_values"], batch["labels"]
    prompts, before, after = overfit_prompts(learner, x, y, steps=1, lr=0.05)
    base = {site: p.detach().clone() for site, p in learner.prompt_tokens().items()}
    for i in range(4):
        single, b_i, a_i = overfit_prompts(learner, x[i : i + 1], y[i : i + 1], steps=1, lr=0.05)
        for site in base:
            assert prompts[site].shape == (4, *base[site].shape)
            torch.testing.assert_close(prompts[site][i : i + 1], single[site], rtol=0, atol=1e-5)
        torch.testing.assert_close(before[i : i + 1], b_i, rtol=0, atol=1e-5)
        torch.testing.assert_close(after[i : i + 1], a_i, rtol=0, atol=1e-5)
    # the learner itself is untouched
    for site, p in learner.prompt_tokens().items():
        assert torch.equal(p.detach(), base[site])
    assert all(p.grad is None for p in learner.parameters())


def test_overfit_prompts_one_step_is_the_normalised_per_sample_gradient_step(bb, train_data):
    """Ground truth from a single-sample autograd pass: p_i = p - lr * RMS(p) * g_i / RMS(g_i)."""
    learner, _ = build(bb, "coop")
    batch = collate([{"pixel_values": x, "labels": y} for x, y in train_data[:3]])
    x, y = batch["pixel_values"], batch["labels"]
    lr = 0.05
    prompts, before, _ = overfit_prompts(learner, x, y, steps=1, lr=lr)
    base = learner.prompt_tokens()["text"].detach()
    for i in range(3):
        p = base.clone().unsqueeze(0).requires_grad_(True)
        loss = F.cross_entropy(learner(x[i : i + 1], prompt_override={"text": p}).logits, y[i : i + 1])
        (grad,) = torch.autograd.grad(loss, p)
        expected = base - lr * base.pow(2).mean().sqrt() * grad[0] / grad[0].pow(2).mean().sqrt()
        torch.testing.assert_close(prompts["text"][i], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(before[i], loss.detach(), rtol=0, atol=1e-5)
    # zero steps: the learned prompt and the learner's own per-sample loss
    same, b0, a0 = overfit_prompts(learner, x, y, steps=0, lr=lr)
    assert torch.equal(same["text"], base.expand(3, *base.shape))
    torch.testing.assert_close(b0, F.cross_entropy(learner(x).logits, y, reduction="none"), rtol=0, atol=1e-5)
    assert torch.equal(a0, b0)


@pytest.mark.parametrize("name", ["coop", "vpt"])
def test_overfitting_lowers_every_samples_loss(bb, train_data, name):
    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS[name])
    batch = collate([{"pixel_values": x, "labels": y} for x, y in train_data])
    _, before, after = overfit_prompts(learner, batch["pixel_values"], batch["labels"], steps=3, lr=0.01)
    assert before.shape == after.shape == (N_TRAIN,)
    assert (after < before).all(), (before, after)


# ---------------------------------------------------------------------------------------------------------------
# 5-6. identity before training; what trains in which stage


@pytest.mark.parametrize("name", ["coop", "vpt", "maple"])
def test_untrained_refiner_is_the_identity(bb, test_images, name):
    learner, model = build(bb, name)
    refiner = model.addons["refiner"]
    assert refiner.fitted is False
    for mode in (True, False):
        model.train(mode)
        assert torch.equal(model(test_images).logits, learner(test_images).logits)
    with pytest.raises(RuntimeError, match="fit_addons"):
        refiner.refined_prompts(test_images)


def test_refiner_stage_trains_only_the_velocity_network(bb, train_data):
    learner, model = build(bb, "coop")
    refiner = model.addons["refiner"]
    assert model.stages() == ["prompt", "refiner", "refiner_joint"]
    assert all(not p.requires_grad for p in refiner.net.parameters())  # "prompt" stage
    assert learner.ctx.requires_grad
    model.set_stage("refiner")
    targets = refiner.build_targets(train_data, progress=False)
    batch = collate([targets[i] for i in range(4)])
    assert set(batch) == {"pixel_values", "labels", "refiner_cond", "refiner_delta_text"}
    model.train()
    out = model(**batch)
    assert out.logits is None and out.loss.dim() == 0 and "refiner/fm_loss" in out.logs
    out.loss.backward()
    for name, param in learner.named_parameters():  # the prompt and the frozen backbone
        assert param.grad is None and not param.requires_grad, name
    for name, param in refiner.net.named_parameters():
        assert param.requires_grad and param.grad is not None, name
    # the zero-initialised output maps get a non-zero gradient
    assert refiner.net.outputs["text"].weight.grad.abs().sum() > 0
    assert int(refiner.trained_steps) == 1  # a training step with a gradient counts

    model.set_stage("prompt")
    assert all(not p.requires_grad for p in refiner.net.parameters())
    assert learner.ctx.requires_grad


@pytest.mark.parametrize("train_prompt", [True, False])
def test_joint_stage_trains_the_prompt_only_when_asked(bb, train_data, train_prompt):
    learner, model = build(bb, "coop", train_steps=5, joint_train_prompt=train_prompt)
    refiner = model.addons["refiner"]
    model.fit_addons(train_data, progress=False)
    assert refiner.fitted
    model.set_stage("refiner_joint")
    model.train()
    model.zero_grad(set_to_none=True)  # fit_addons leaves the last step's gradients on the network
    batch = collate([refiner.build_targets(train_data, progress=False)[i] for i in range(4)])
    out = model(**batch)
    assert out.logits.shape == (4, len(CLASSNAMES)) and "refiner/fm_loss" in out.logs
    out.loss.backward()
    assert learner.ctx.requires_grad is train_prompt
    if train_prompt:
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    else:
        assert learner.ctx.grad is None
    assert refiner.net.outputs["text"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in learner.backbone.parameters())

    # through fit_addons: the joint stage moves the learned prompt exactly when joint_train_prompt is set
    learner2, model2 = build(bb, "coop", train_steps=3, joint_steps=3, joint_train_prompt=train_prompt)
    ctx = learner2.ctx.detach().clone()
    logs = model2.fit_addons(train_data, progress=False)
    assert "refiner_joint/final_loss" in logs and math.isfinite(logs["refiner_joint/final_loss"])
    assert torch.equal(learner2.ctx.detach(), ctx) is not train_prompt
    assert model2.stage == "prompt"


# ---------------------------------------------------------------------------------------------------------------
# 7. any modality, including a user's own learner


def text_bias_learner(backbone, classnames):
    """The user's learner of docs/learner_contract.md, with a non-zero initial bias."""
    learner = MyTextBias(backbone, classnames)
    with torch.no_grad():
        learner.bias.copy_(0.1 * torch.randn(learner.bias.shape))
    return learner


@pytest.mark.parametrize("name", ["coop", "cocoop", "vpt", "maple", "custom"])
def test_refiner_works_for_every_modality(bb, train_data, test_images, name):
    if name == "custom":
        torch.manual_seed(0)
        learner = text_bias_learner(bb, CLASSNAMES)
        model = pr.wrap(learner, pr.RobustConfig(refiner=pr.RefinerConfig(**SMALL)))
    else:
        learner, model = build(bb, name)
    if name == "vpt":
        assert learner.depth == 2  # deep prompts
    logs = model.fit_addons(train_data, progress=False)
    assert math.isfinite(logs["refiner/final_loss"])
    refiner = model.addons["refiner"]
    assert refiner.fitted and model.stage == "prompt"
    model.eval()
    with torch.no_grad():
        prompts = refiner.refined_prompts(test_images)
        tokens = learner.prompt_tokens()
        assert set(prompts) == set(tokens)
        for site, value in tokens.items():
            assert prompts[site].shape == (len(test_images), *value.shape)
            assert torch.isfinite(prompts[site]).all()
            assert not torch.allclose(prompts[site], value.expand_as(prompts[site]))
        logits = model(test_images).logits
        bare = learner(test_images)
        bare = bare if isinstance(bare, torch.Tensor) else bare.logits
    assert logits.shape == (len(test_images), len(CLASSNAMES)) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, bare, rtol=0, atol=1e-6)


def test_zero_initialised_prompt_gets_moving_targets_or_a_clear_error(bb, train_data):
    torch.manual_seed(0)
    learner = MyTextBias(bb, CLASSNAMES)  # the docs' learner starts at bias 0
    assert not learner.bias.any()
    model = pr.wrap(learner, pr.RobustConfig(refiner=pr.RefinerConfig(**SMALL)))
    try:
        targets = model.addons["refiner"].build_targets(train_data, progress=False)
    except (ValueError, FloatingPointError):
        return  # refusing with an explanation is a correct answer too
    assert (targets.loss_after < targets.loss_before).all()


# ---------------------------------------------------------------------------------------------------------------
# 8. deterministic sampling and averaging


def test_seeded_prompts_depend_on_the_image_only(fitted, test_images):
    _, model = fitted
    refiner = model.addons["refiner"]
    assert refiner.config.noise_seed is not None
    with torch.no_grad():
        batch = refiner.refined_prompts(test_images)["text"]
        again = refiner.refined_prompts(test_images)["text"]
        assert torch.equal(batch, again)
        for i in (0, 3):
            alone = refiner.refined_prompts(test_images[i : i + 1])["text"]
            torch.testing.assert_close(alone, batch[i : i + 1], rtol=0, atol=1e-5)
        # images are refined differently
        assert not torch.allclose(batch[0], batch[1])
        logits = model(test_images).logits
        torch.testing.assert_close(model(test_images[2:3]).logits, logits[2:3], rtol=0, atol=1e-5)


def test_unseeded_prompts_are_fresh_each_call(fitted, test_images, monkeypatch):
    _, model = fitted
    refiner = model.addons["refiner"]
    monkeypatch.setattr(refiner.config, "noise_seed", None)
    with torch.no_grad():
        first = refiner.refined_prompts(test_images)["text"]
        second = refiner.refined_prompts(test_images)["text"]
    assert torch.isfinite(first).all() and not torch.allclose(first, second)


def test_num_samples_averages_the_offsets_of_each_noise(fitted, test_images, monkeypatch):
    learner, model = fitted
    refiner = model.addons["refiner"]
    with torch.no_grad():
        cond = learner.image_features(test_images)
        k3 = refiner.sample_offsets(cond, num_samples=3)["text"]
        k1 = refiner.sample_offsets(cond, num_samples=1)["text"]
        assert torch.isfinite(k3).all() and not torch.allclose(k3, k1)
        assert torch.equal(refiner.sample_offsets(cond, num_samples=3)["text"], k3)
        # the K noises of a seeded refiner, then one offset per noise
        seed = refiner.config.noise_seed
        rows = torch.randn(3, refiner.state_size, generator=torch.Generator().manual_seed(seed))
        singles = []
        for row in rows:
            monkeypatch.setattr(refiner, "_noise", lambda batch, samples, device, dtype, row=row: row.expand(batch, -1))
            singles.append(refiner.sample_offsets(cond, num_samples=1)["text"])
        monkeypatch.undo()
    torch.testing.assert_close(k3, torch.stack(singles).mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(k1, singles[0], rtol=0, atol=1e-5)  # K=1 draws the first seeded noise
    # config.num_samples is the default of refined_prompts
    monkeypatch.setattr(refiner.config, "num_samples", 3)
    with torch.no_grad():
        prompts = refiner.refined_prompts(test_images)["text"]
    expected = learner.prompt_tokens()["text"].detach() + refiner.scale("text") * k3
    torch.testing.assert_close(prompts, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 9. adapter round trip


def test_save_and_load_keep_the_refined_prompts(fitted, bb, test_images, tmp_path):
    _, model = fitted
    refiner = model.addons["refiner"]
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=bb)
    loaded.eval()
    loaded_refiner = loaded.addons["refiner"]
    assert loaded_refiner.fitted and int(loaded_refiner.trained_steps) == int(refiner.trained_steps)
    assert loaded.config.refiner == model.config.refiner
    torch.testing.assert_close(loaded_refiner.scale("text"), refiner.scale("text"), rtol=0, atol=0)
    with torch.no_grad():
        expected = refiner.refined_prompts(test_images)["text"]
        torch.testing.assert_close(loaded_refiner.refined_prompts(test_images)["text"], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(test_images).logits, model(test_images).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 10. target cache


def _folders(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("refiner-targets-"))


def _assert_same_targets(a, b, atol=0.0):
    torch.testing.assert_close(a.cond, b.cond, rtol=0, atol=atol)
    torch.testing.assert_close(a.loss_before, b.loss_before, rtol=0, atol=atol)
    torch.testing.assert_close(a.loss_after, b.loss_after, rtol=0, atol=atol)
    assert set(a.deltas) == set(b.deltas)
    for site in a.deltas:
        torch.testing.assert_close(a.deltas[site], b.deltas[site], rtol=0, atol=atol)


def test_target_cache_loads_resumes_and_never_overwrites(bb, train_data, tmp_path, monkeypatch):
    _, model = build(bb, "coop", target_batch_size=5)
    refiner = model.addons["refiner"]
    first = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False)
    (folder,) = _folders(tmp_path)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.safetensors" for i in range(3)]  # 5 + 5 + 2 samples
    assert first.cache_path == folder and len(first) == N_TRAIN
    assert first.cond.shape == (N_TRAIN, bb.embed_dim) and first.deltas["text"].shape == (N_TRAIN, 4, bb.text_width)
    snapshot = {p.name: p.read_bytes() for p in shards}

    def refuse(*args, **kwargs):
        raise AssertionError("the cached targets were recomputed")

    monkeypatch.setattr(targets_module, "overfit_prompts", refuse)
    _assert_same_targets(refiner.build_targets(train_data, cache_dir=tmp_path, progress=False), first)

    class Counting(list):  # counts item reads: a cached batch's images are not read (only the cache key's)
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return list.__getitem__(self, index)

    _assert_same_targets(refiner.build_targets(Counting(train_data), cache_dir=tmp_path, progress=False), first)
    assert Counting.reads == N_TRAIN  # the fingerprint hashes every item of this small set once; nothing more

    # other settings: a new folder, the first untouched
    monkeypatch.undo()
    monkeypatch.setattr(refiner.config, "inner_lr", 0.1)
    other = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False)
    assert len(_folders(tmp_path)) == 2 and other.cache_path != folder
    assert not torch.allclose(other.deltas["text"], first.deltas["text"])
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))} == snapshot
    monkeypatch.undo()

    # a missing shard (an interrupted pass) is the only one recomputed
    (folder / "shard-00001.safetensors").unlink()
    calls = []
    original = targets_module.overfit_prompts

    def counting(learner, pixel_values, labels, **kwargs):
        calls.append(pixel_values.shape[0])
        return original(learner, pixel_values, labels, **kwargs)

    monkeypatch.setattr(targets_module, "overfit_prompts", counting)
    resumed = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False)
    assert calls == [5]
    assert (folder / "shard-00001.safetensors").is_file()
    _assert_same_targets(resumed, first, atol=1e-6)


def test_target_cache_tracks_the_learned_prompt_in_the_refiner_stage(bb, train_data, tmp_path):
    learner, model = build(bb, "coop")
    refiner = model.addons["refiner"]
    model.set_stage("refiner")
    first = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(5)))
    second = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False)
    fresh = refiner.build_targets(train_data, progress=False)  # no cache: the ground truth
    assert len(_folders(tmp_path)) == 2
    _assert_same_targets(second, fresh, atol=1e-6)
    assert not torch.allclose(second.deltas["text"], first.deltas["text"])


# ---------------------------------------------------------------------------------------------------------------
# 11. the generator learns


def test_refiner_training_lowers_the_flow_matching_loss(bb, train_data):
    _, model = build(bb, "coop", train_steps=150)
    refiner = model.addons["refiner"]
    targets = refiner.build_targets(train_data, progress=False)
    x1 = torch.cat([targets.deltas[s] / refiner.scale(s) for s in targets.deltas], dim=1)
    torch.testing.assert_close(x1.pow(2).mean(), torch.tensor(1.0), rtol=1e-4, atol=0)  # unit-RMS offsets

    def expected_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(float(refiner.flow_matching_loss(targets.cond, targets.deltas)) for _ in range(20)) / 20

    before = expected_loss()
    # the untrained network predicts zero velocity: E|x1 - x0|^2 = E|x1|^2 + E|x0|^2 = 2 per coordinate
    assert before == pytest.approx(2.0, abs=0.05)
    logs = model.fit_addons(train_data, progress=False)
    after = expected_loss()
    assert after < 0.8 * before, (before, after)
    assert logs["refiner/final_loss"] < 0.85 * before
    assert logs["refiner/targets_loss_after"] < logs["refiner/targets_loss_before"]


# ---------------------------------------------------------------------------------------------------------------
# 12. stage errors


def test_stage_errors_name_the_way_out(bb, train_data):
    _, model = build(bb, "coop")
    with pytest.raises(ValueError, match="refinr") as err:
        model.set_stage("refinr")
    assert all(stage in str(err.value) for stage in ("prompt", "refiner", "refiner_joint"))
    assert model.stage == "prompt"
    model.set_stage("refiner")
    batch = collate([{"pixel_values": x, "labels": y} for x, y in train_data[:2]])
    with pytest.raises(ValueError, match="build_targets") as err:
        model(**batch)
    assert "fit_addons" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# label-free group targets


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    points = centers[truth] + 0.5 * torch.randn(60, 2, generator=g)
    assignment, found = targets_module.kmeans(points, 3, seed=1)
    # the same partition up to the cluster numbering
    assert all(len(set(assignment[truth == c].tolist())) == 1 for c in range(3))
    assert len(set(assignment.tolist())) == 3
    torch.testing.assert_close(found[assignment], centers[truth], atol=0.5, rtol=0)
    assert torch.equal(targets_module.kmeans(points, 3, seed=1)[0], assignment)
    with pytest.raises(ValueError, match="k must be between 1 and the number of points"):
        targets_module.kmeans(points, 61)


def test_discover_groups_cut_across_classes():
    """Features = class direction + style direction: the groups are the styles, not the classes."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    labels = torch.arange(4).repeat(12)  # 4 classes
    styles = torch.arange(3).repeat_interleave(16)  # 3 styles, every class in every style
    features = 3 * basis[labels] + 1.0 * basis[4 + styles] + 0.05 * torch.randn(48, 16, generator=g)
    groups = targets_module.discover_groups(features, labels, 3, seed=0)
    assert all(len(set(groups[styles == s].tolist())) == 1 for s in range(3))
    assert len(set(groups.tolist())) == 3
    # without removing the class means the same k-means would split by class
    plain = targets_module.kmeans(torch.nn.functional.normalize(features, dim=-1), 3, seed=0)[0]
    assert not all(len(set(plain[styles == s].tolist())) == 1 for s in range(3))


def test_group_prompts_are_the_normalised_summed_gradient_step(bb, train_data):
    """Ground truth: copy j moves by -lr RMS(p) g_j / RMS(g_j), g_j the gradient of its samples' summed loss
    with one shared prompt; a copy without samples stays."""
    learner, _ = build(bb, "coop")
    batch = collate([{"pixel_values": x, "labels": y} for x, y in train_data[:6]])
    x, y = batch["pixel_values"], batch["labels"]
    assignment = torch.tensor([0, 1, 0, 1, 1, 0])
    lr = 0.05
    # two batches: gradients add up across them
    batches = [(x[:4], y[:4], assignment[:4]), (x[4:], y[4:], assignment[4:])]
    prompts, before, after = targets_module.descend_prompts(learner, batches, 3, steps=1, lr=lr)
    base = learner.prompt_tokens()["text"].detach()
    for j in range(2):
        p = base.clone().requires_grad_(True)
        members = assignment == j
        loss = F.cross_entropy(_logits_with(learner, x[members], p), y[members], reduction="sum")
        (grad,) = torch.autograd.grad(loss, p)
        expected = base - lr * base.pow(2).mean().sqrt() * grad / grad.pow(2).mean().sqrt()
        torch.testing.assert_close(prompts["text"][j], expected, rtol=0, atol=1e-6)
    assert torch.equal(prompts["text"][2], base)  # no sample: no move
    assert before.shape == after.shape == (6,)
    torch.testing.assert_close(before, F.cross_entropy(learner(x).logits, y, reduction="none"), rtol=0, atol=1e-5)


def _logits_with(learner, x, prompt):
    return learner(x, prompt_override={"text": prompt.unsqueeze(0).expand(x.shape[0], *prompt.shape)}).logits


def test_group_targets_share_one_offset_per_group_and_are_cached(bb, train_data, tmp_path, monkeypatch):
    from prompt_robust.addons.refiner.diagnostics import label_decodability

    _, model = build(bb, "coop", targets="group", num_groups=3, inner_steps=3)
    refiner = model.addons["refiner"]
    targets = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False, seed=0)
    groups = targets.groups
    assert groups.shape == (N_TRAIN,) and set(groups.tolist()) <= {0, 1, 2}
    delta = targets.deltas["text"]
    for j in set(groups.tolist()):
        members = delta[groups == j]
        assert torch.equal(members, members[:1].expand_as(members))  # one offset per group
    assert float(delta.abs().sum()) > 0
    # the group prompts lower their groups' summed loss
    assert targets.loss_after.sum() < targets.loss_before.sum()
    # offsets shared across classes carry less of the label than per-sample ones
    overfit = build(bb, "coop", inner_steps=3)[1].addons["refiner"].build_targets(train_data, progress=False)
    labels = torch.tensor([y for _, y in train_data])
    assert label_decodability(delta, labels) < label_decodability(overfit.deltas["text"], labels)
    # cached: a rerun reads the file, another seed or group count gets its own folder
    monkeypatch.setattr(targets_module, "descend_prompts", _refuse)
    again = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False, seed=0)
    assert torch.equal(again.deltas["text"], delta) and torch.equal(again.groups, groups)
    monkeypatch.undo()
    refiner.build_targets(train_data, cache_dir=tmp_path, progress=False, seed=1)
    assert len(_folders(tmp_path)) == 2
    with pytest.raises(ValueError, match="Did you mean 'group'"):
        pr.RefinerConfig(targets="groups")


def _refuse(*args, **kwargs):
    raise AssertionError("the cached group targets were recomputed")


# ---------------------------------------------------------------------------------------------------------------
# label-free targets: test-time prompt tuning's marginal entropy over augmented views


def test_marginal_entropy_is_the_entropy_of_each_images_mean_prediction():
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0], [0.0, 0.0, 0.0], [5.0, 1.0, -2.0]])
    owner = torch.tensor([0, 0, 1, 2])
    got = targets_module.marginal_entropy(logits, owner)
    torch.testing.assert_close(got[:2], torch.tensor([math.log(2), math.log(3)]), rtol=0, atol=1e-5)
    p = logits[3].softmax(-1)
    torch.testing.assert_close(got[2], -(p * p.log()).sum(), rtol=0, atol=1e-6)


def test_augmented_views_start_with_the_image_and_are_seeded():
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    views = targets_module.augmented_views(images, 5, torch.Generator().manual_seed(1))
    assert views.shape == (15, 3, 16, 16)
    assert torch.equal(views[::5], images)  # view 0 of every image is the image
    again = targets_module.augmented_views(images, 5, torch.Generator().manual_seed(1))
    assert torch.equal(views, again)
    other = targets_module.augmented_views(images, 5, torch.Generator().manual_seed(2))
    assert not torch.equal(views, other)
    # crops of a constant image are that constant: views only move and rescale content
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(targets_module.augmented_views(flat, 4, torch.Generator()), flat.expand(4, -1, -1, -1))


def test_entropy_prompts_step_on_the_confident_views_marginal_entropy(bb, train_data):
    """Ground truth by hand: pick the views with the lowest entropy under the learned prompt, then one normalised
    gradient step of their marginal entropy, image by image; labels are never read."""
    learner, _ = build(bb, "coop")
    x = collate([{"pixel_values": x, "labels": y} for x, y in train_data[:3]])["pixel_values"]
    lr, views, keep = 0.1, 8, 0.25
    prompts, before, after = targets_module.entropy_prompts(
        learner, x, steps=1, lr=lr, views=views, keep=keep, generator=torch.Generator().manual_seed(3)
    )
    all_views = targets_module.augmented_views(x, views, torch.Generator().manual_seed(3))
    base = learner.prompt_tokens()["text"].detach()
    for i in range(3):
        v = all_views[i * views : (i + 1) * views]
        with torch.no_grad():
            logits = learner(v).logits
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        chosen = v[entropy.argsort()[:2]]  # keep 25% of 8 views
        p = base.clone().requires_grad_(True)
        mean = _logits_with(learner, chosen, p).softmax(-1).mean(0)
        h = -(mean * mean.log()).sum()
        (grad,) = torch.autograd.grad(h, p)
        expected = base - lr * base.pow(2).mean().sqrt() * grad / grad.pow(2).mean().sqrt()
        torch.testing.assert_close(prompts["text"][i], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(before[i], h.detach(), rtol=0, atol=1e-5)
    assert (after < before).all(), (before, after)  # a small step lowers every image's marginal entropy


def test_entropy_targets_ignore_the_labels_and_are_cached_per_setting(bb, train_data, tmp_path):
    _, model = build(bb, "coop", targets="entropy", inner_steps=2, entropy_views=6, entropy_keep=0.5)
    refiner = model.addons["refiner"]
    targets = refiner.build_targets(train_data, cache_dir=tmp_path, progress=False, seed=0)
    delta = targets.deltas["text"]
    assert delta.shape[0] == N_TRAIN and float(delta.abs().sum()) > 0
    assert (targets.loss_after < targets.loss_before).float().mean() > 0.9  # entropies, lowered
    relabelled = [(x, (y + 1) % len(CLASSNAMES)) for x, y in train_data]
    torch.testing.assert_close(refiner.build_targets(relabelled, progress=False, seed=0).deltas["text"], delta)
    # another seed draws other views; both are cached side by side
    refiner.build_targets(train_data, cache_dir=tmp_path, progress=False, seed=1)
    assert len(_folders(tmp_path)) == 2
    for bad in ({"entropy_views": 1}, {"entropy_keep": 0.0}, {"entropy_keep": 1.5}):
        with pytest.raises(ValueError, match="entropy_"):
            pr.RefinerConfig(**bad)


@pytest.mark.parametrize("name", ["coop", "cocoop", "maple"])
def test_shared_prompt_rows_encode_each_copy_once_with_the_same_values_and_gradients(bb, test_images, name):
    from prompt_robust.learners.base import shared_prompt_rows

    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS[name])
    base = learner.prompt_tokens()
    owner = torch.tensor([0, 0, 1, 1, 1])  # two copies, five inputs (e.g. views)
    shifts = torch.randn(2, *base["text"].shape, generator=torch.Generator().manual_seed(0)) * 0.01

    def run(shared):
        copies = (base["text"].detach().unsqueeze(0) + shifts).requires_grad_(True)
        override = {site: p.detach().expand(2, *p.shape).clone() for site, p in base.items()}
        override["text"] = copies
        sizes = []
        encode = bb.encode_text

        def counting(ids, **kwargs):
            sizes.append(ids.shape[0])
            return encode(ids, **kwargs)

        bb.encode_text = counting
        try:
            with shared_prompt_rows(owner) if shared else torch.enable_grad():
                logits = learner(test_images, prompt_override={s: v[owner] for s, v in override.items()}).logits
        finally:
            del bb.encode_text
        (grad,) = torch.autograd.grad(logits.square().sum(), copies)
        return logits.detach(), grad, sum(sizes)

    logits, grad, texts = run(shared=True)
    logits0, grad0, texts0 = run(shared=False)
    torch.testing.assert_close(logits, logits0, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, grad0, rtol=1e-3, atol=1e-4)  # float summation order (a wrong merge is O(1))
    assert texts0 == 5 * len(CLASSNAMES)
    # CoCoOp shifts every row by its own image: nothing to merge; the others encode one row per copy
    assert texts == (texts0 if name == "cocoop" else 2 * len(CLASSNAMES))


def test_refiner_stages_resume_bit_identical_from_their_checkpoints(bb, train_data, tmp_path):
    """A run killed after the stage's last checkpoint but one continues from it and ends where an uninterrupted
    run ends (the stages' fits write checkpoints into ``checkpoint_dir/<stage>/``)."""
    _, whole = build(bb, "coop", train_steps=10)
    whole.fit_addons(train_data, seed=3, checkpoint_dir=tmp_path / "whole", progress=False)
    stage_dir = tmp_path / "whole" / "refiner"
    saved = sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*"))
    assert saved[-1] == 10 and len(saved) >= 2
    shutil.copytree(stage_dir, tmp_path / "killed" / "refiner")
    shutil.rmtree(tmp_path / "killed" / "refiner" / f"checkpoint-{saved[-1]}")  # as if killed before the end
    _, resumed = build(bb, "coop", train_steps=10)
    resumed.fit_addons(train_data, seed=3, checkpoint_dir=tmp_path / "killed", progress=False)
    expected = whole.addons["refiner"].state_dict()
    for name, value in resumed.addons["refiner"].state_dict().items():
        assert torch.equal(value, expected[name]), name
