"""CLIP-ICM: interventions, the closed-form invariant projection, the λ/k rule and the "invariance" add-on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES

import prompt_robust as pr
import prompt_robust.addons.invariance as inv  # registers the "invariance" add-on
from prompt_robust.addons.invariance import interventions as iv
from prompt_robust.bench.tasks import TaskData
from prompt_robust.eval.probe import LinearProbe

# ---------------------------------------------------------------------------------------------------------------
# synthetic features with a known invariant subspace
# ---------------------------------------------------------------------------------------------------------------
D, N_CLS = 16, 4
INVARIANT = slice(0, 4)  # e1..e4: class signal, untouched by interventions
NUISANCE = slice(4, 8)  # e5..e8: large variance in the images, moved by every intervention


def _synthetic(n: int = 400, seed: int = 0) -> inv.InterventionalFeatures:
    """Clean features and one intervened copy per image whose nuisance coordinates are redrawn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLS
    means = 3.0 * torch.eye(N_CLS)  # class c sits at 3 e_c
    z = torch.randn(n, D, generator=g) * 0.3  # small isotropic noise, e9..e16 keep only this
    z[:, INVARIANT] += means[labels] + 0.5 * torch.randn(n, 4, generator=g)
    z[:, NUISANCE] = 4.0 * torch.randn(n, 4, generator=g)  # more variance than the class signal
    changed = z.clone()
    changed[:, NUISANCE] = 4.0 * torch.randn(n, 4, generator=g)
    return inv.InterventionalFeatures(z, changed.unsqueeze(1), labels, ["do"])


def _cosines(p_true: torch.Tensor, p_hat: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between two subspaces with orthonormal bases."""
    return torch.linalg.svdvals(p_true.t().double() @ p_hat.double())


def test_projection_recovers_the_invariant_subspace():
    feats = _synthetic()
    icm = inv.ICMProjection.fit(feats.clean, feats.deltas(), lam=2.0, dim=4)
    p_true = torch.eye(D)[:, INVARIANT]
    # kept = the largest eigenvalues: principal angles ~0 to span(e1..e4)
    assert _cosines(p_true, icm.projection).min() > 0.99
    # the eigenvectors of the SMALLEST eigenvalues (what the reference code keeps) span the nuisance directions
    smallest = icm.basis[:, -4:]
    assert _cosines(p_true, smallest).max() < 0.1
    assert _cosines(torch.eye(D)[:, NUISANCE], smallest).min() > 0.99
    # without the intervention term (plain PCA) the nuisance directions win: the Δ term is what does the work
    pca = inv.ICMProjection.fit(feats.clean, feats.deltas(), lam=0.0, dim=4)
    assert _cosines(p_true, pca.projection).max() < 0.1


def test_kept_eigenvalues_are_the_largest():
    feats = _synthetic()
    icm = inv.ICMProjection.fit(feats.clean, feats.deltas(), lam=2.0, dim=5)
    scale = inv.lam_scale(inv.second_moment(feats.clean), inv.intervention_covariance(feats.deltas()))
    assert icm.lam == pytest.approx(2.0 * scale)
    m = inv.second_moment(feats.clean) - icm.lam * inv.intervention_covariance(feats.deltas())
    ascending = torch.linalg.eigvalsh(m)
    assert torch.all(icm.eigenvalues[:-1] >= icm.eigenvalues[1:])  # stored in descending order
    torch.testing.assert_close(icm.eigenvalues[:5], ascending.flip(0)[:5])
    p = icm.projection.double()
    torch.testing.assert_close(p.t() @ p, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(m @ p, p * icm.eigenvalues[:5], atol=1e-4, rtol=1e-4)  # M P = P diag(top 5)


def test_projection_errors_are_clear():
    z = torch.randn(10, 6)
    with pytest.raises(ValueError, match="feature size 5; the features have 6"):
        inv.ICMProjection.fit(z, torch.randn(4, 5), lam=1.0)
    with pytest.raises(ValueError, match=r"dim must be an integer in 1\.\.6"):
        inv.ICMProjection.fit(z, torch.randn(4, 6), lam=1.0, dim=7)
    with pytest.raises(ValueError, match="lam must be"):
        inv.ICMProjection.fit(z, torch.randn(4, 6), lam=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# the λ/k rule
# ---------------------------------------------------------------------------------------------------------------
def _spurious_text() -> torch.Tensor:
    """Class texts that also align with nuisance directions, so unseen nuisance values mislead plain zero-shot."""
    g = torch.Generator().manual_seed(5)
    text = torch.zeros(N_CLS, D)
    text[:, INVARIANT] = torch.eye(N_CLS)
    text[:, NUISANCE] = torch.randn(N_CLS, 4, generator=g)
    return F.normalize(text, dim=-1)


def test_selection_rule_uses_the_grid_is_deterministic_and_helps():
    feats = _synthetic(n=200)
    text = _spurious_text()
    grid = [0.0, 0.5, 1.0, 2.0, 5.0]
    first = inv.choose_lam_dim(feats, lam_grid=grid, text_features=text, seed=3)
    second = inv.choose_lam_dim(feats, lam_grid=grid, text_features=text, seed=3)
    assert (first.lam, first.dim, first.scores) == (second.lam, second.dim, second.scores)
    dims = inv.dims_from_fractions(D, (0.125, 0.25, 0.5, 0.75, 1.0))
    assert first.lam in grid and first.dim in dims
    assert set(first.scores) == {(lam, k) for lam in grid for k in dims}
    # the full dimension is a rotation (plain zero-shot); the rule found a projection that beats it
    assert first.lam > 0 and first.dim < D
    assert first.score > first.scores[(0.0, D)] + 0.1
    # ties go to the larger dimension, then the smaller lam
    best = max(first.scores.values())
    tied = [key for key, value in first.scores.items() if value == best]
    assert (first.lam, first.dim) == max(tied, key=lambda key: (key[1], -key[0]))
    # a fixed lam leaves only dim to choose; the linear-probe scorer needs no text
    fixed = inv.choose_lam_dim(feats, lam=1.0, predictor="linear_probe", seed=3)
    assert fixed.lam == 1.0 and {lam for lam, _ in fixed.scores} == {1.0}


def test_split_is_stratified_and_seeded():
    labels = torch.arange(40) % 4
    fit, val = inv.split_fit_val(labels, 0.25, seed=1)
    assert torch.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    assert sorted(fit.tolist() + val.tolist()) == list(range(40))
    assert torch.equal(val, inv.split_fit_val(labels, 0.25, seed=1)[1])
    with pytest.raises(ValueError, match="no class has 2 or more"):
        inv.split_fit_val(torch.arange(4), 0.25, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# predictors
# ---------------------------------------------------------------------------------------------------------------
def test_zero_shot_and_probes_in_the_projected_space():
    feats = _synthetic(n=120)
    icm = inv.ICMProjection.fit(feats.clean, feats.deltas(), lam=2.0, dim=4)
    text = _spurious_text()
    image = feats.clean[:5]
    expected = 10.0 * F.normalize(image @ icm.projection, dim=-1) @ F.normalize(text @ icm.projection, dim=-1).t()
    torch.testing.assert_close(inv.zero_shot_logits(image, text, icm.projection, 10.0), expected)
    per_sample = text.expand(5, -1, -1)  # (b, n_cls, d) gives the same logits as the shared (n_cls, d)
    torch.testing.assert_close(inv.zero_shot_logits(image, per_sample, icm.projection, 10.0), expected)
    probe = LinearProbe(1e-3).fit(feats.clean, feats.labels)
    again = LinearProbe(1e-3).fit(feats.clean, feats.labels)
    assert torch.equal(probe.weight, again.weight)  # deterministic
    test_z, test_y = _synthetic(n=120, seed=1).intervened_flat()
    out = inv.compare_predictors(feats.clean, feats.labels, icm, text, {"shifted": (test_z, test_y)})
    # the class texts lean on nuisance directions: redrawn nuisance values mislead zero-shot, not ICM zero-shot
    assert out["zero_shot"]["shifted"] < 0.7 and out["icm_zero_shot"]["shifted"] >= 0.95
    assert out["icm_linear_probe"]["shifted"] >= 0.95


# ---------------------------------------------------------------------------------------------------------------
# interventions
# ---------------------------------------------------------------------------------------------------------------
def _images(dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_interventions_match_the_config_names():
    assert tuple(inv.IMAGE_INTERVENTIONS) == pr.InvarianceConfig.INTERVENTIONS
    assert {n for n, spec in inv.IMAGE_INTERVENTIONS.items() if spec.random} == {"color_jitter", "gaussian_blur"}


@pytest.mark.parametrize("name", pr.InvarianceConfig.INTERVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_intervention_shapes_dtypes_range_and_seeding(name, dtype):
    x = _images(dtype)
    fn = inv.get_intervention(name).fn
    out = fn(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert not torch.allclose(out, x)  # every default changes a random image
    assert torch.equal(out, fn(x, torch.Generator().manual_seed(0)))  # same seed, same result
    if inv.get_intervention(name).random:
        assert not torch.equal(out, fn(x, torch.Generator().manual_seed(1)))


def test_intervention_ground_truths():
    x = _images()
    torch.testing.assert_close(iv.invert(iv.invert(x)), x)
    gray = iv.grayscale(x)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    eight_bit = torch.randint(0, 256, x.shape, generator=torch.Generator().manual_seed(1)).float() / 255
    torch.testing.assert_close(iv.posterize(eight_bit, bits=8), eight_bit, atol=0, rtol=0)
    assert torch.equal(iv.solarize(x, threshold=1.0), x)
    torch.testing.assert_close(iv.solarize(x, threshold=0.0), 1 - x)
    flat = torch.full((2, 3, 16, 16), 0.37)
    torch.testing.assert_close(iv.gaussian_blur(flat, torch.Generator().manual_seed(0)), flat)
    jitter_off = iv.color_jitter(x, brightness=0, contrast=0, saturation=0, hue=0)
    assert torch.equal(jitter_off, x)
    # a pure hue rotation keeps the value channel (max over RGB)
    hue_only = iv.color_jitter(x, torch.Generator().manual_seed(0), brightness=0, contrast=0, saturation=0)
    torch.testing.assert_close(hue_only.amax(dim=1), x.amax(dim=1), atol=1e-5, rtol=0)


def test_equalize_flattens_the_histogram_of_a_skewed_ramp():
    ramp = torch.linspace(0, 1, 64 * 64) ** 2  # most pixels are dark
    image = ramp.view(1, 1, 64, 64).expand(1, 3, 64, 64).contiguous()
    out = iv.equalize(image)
    uniform = torch.linspace(0, 1, 64 * 64)
    assert (ramp - uniform).abs().max() > 0.2  # far from uniform before
    assert (out[0, 0].flatten().sort().values - uniform).abs().max() < 0.05  # close to uniform after
    torch.testing.assert_close(iv.equalize(torch.full((1, 3, 4, 4), 0.5)), torch.full((1, 3, 4, 4), 0.5))


def test_intervene_works_in_normalised_space():
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    x01 = _images()
    normalised = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    once = inv.intervene(normalised, "invert", mean=mean, std=std)
    torch.testing.assert_close(inv.intervene(once, "invert", mean=mean, std=std), normalised, atol=1e-5, rtol=0)
    gray = inv.intervene(normalised, "grayscale", mean=mean, std=std)
    gray01 = gray * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(gray01[:, 0], gray01[:, 2], atol=1e-5, rtol=0)
    posterized = inv.intervene(normalised, "posterize", mean=mean, std=std, bits=2)
    assert posterized.shape == normalised.shape


def test_intervention_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown intervention 'blur'; valid: color_jitter, .*gaussian_blur"):
        inv.get_intervention("blur")
    with pytest.raises(ValueError, match="Did you mean 'grayscale'"):
        inv.get_intervention("greyscale")
    with pytest.raises(ValueError, match="unknown intervention"):
        inv.intervene(torch.zeros(1, 3, 4, 4), "sharpen", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        iv.invert(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        iv.invert(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        iv.posterize(_images(), bits=0)
    with pytest.raises(TypeError, match="bad parameters"):
        inv.intervene(torch.zeros(1, 3, 4, 4), "invert", mean=(0.5,) * 3, std=(0.5,) * 3, strength=2)


def test_text_interventions():
    pairs = inv.text_pairs(["cat", "dog"], "a photo of a {}.", ["a sketch of a {}.", "a blurry photo of a {}."])
    assert pairs[0] == ("a photo of a cat.", "a sketch of a cat.") and len(pairs) == 4

    def encode(texts):  # a fake text encoder: the word count and a constant
        return torch.tensor([[float(len(t.split())), 1.0] for t in texts])

    deltas = inv.text_deltas(encode, pairs)
    assert deltas.shape == (4, 2)
    expected = F.normalize(torch.tensor([5.0, 1.0]), dim=0) - F.normalize(torch.tensor([6.0, 1.0]), dim=0)
    torch.testing.assert_close(deltas[1], expected)
    with pytest.raises(ValueError, match="exactly one"):
        inv.text_pairs(["cat"], "a photo", ["a {} {}"])


# ---------------------------------------------------------------------------------------------------------------
# the add-on
# ---------------------------------------------------------------------------------------------------------------
def _train_data(backbone, per_class: int = 4) -> TaskData:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(len(CLASSNAMES)).repeat_interleave(per_class)
    images = torch.rand(len(labels), 3, 32, 32, generator=g)
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    return TaskData((images - mean) / std, labels, list(CLASSNAMES))


def _hand_logits(addon, output) -> torch.Tensor:
    p = addon.basis[:, : int(addon.kept_dim)]  # (d, k)
    image = F.normalize(output.image_features @ p, dim=-1)
    text = F.normalize(output.text_features @ p, dim=-1)
    scale = addon.learner.backbone.logit_scale
    if text.dim() == 2:
        return scale * image @ text.t()
    return scale * torch.einsum("bk,bck->bc", image, text)


def test_addon_identity_before_prepare_then_projected_logits(hf_backbone, images, tmp_path):
    learner = pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=4)
    model = pr.wrap(learner, pr.RobustConfig(invariance=pr.InvarianceConfig()))
    addon = model.addons["invariance"]
    assert isinstance(addon, inv.InvariantProjection) and not addon.fitted
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images).logits, learner(images).logits)  # identity before prepare

    logs = model.fit_addons(_train_data(hf_backbone), seed=0, cache_dir=tmp_path, progress=False)
    assert addon.fitted
    assert logs["invariance/lam"] in pr.InvarianceConfig().lam_grid
    assert int(addon.kept_dim) in inv.dims_from_fractions(hf_backbone.embed_dim, pr.InvarianceConfig().dim_fractions)
    assert 0.0 <= logs["invariance/val_accuracy"] <= 1.0
    assert logs["invariance/pairs"] == 16 * len(pr.InvarianceConfig().interventions)
    with torch.no_grad():
        raw = learner(images)
        out = model(images)
    torch.testing.assert_close(out.logits, _hand_logits(addon, raw), atol=1e-5, rtol=1e-5)
    if int(addon.kept_dim) < hf_backbone.embed_dim:
        assert not torch.allclose(out.logits, raw.logits)

    # rerun from the cache: no image is encoded again, the projection is the same
    basis = addon.basis.clone()
    learner.image_features = _fail  # an instance attribute shadows the method
    try:
        model.fit_addons(_train_data(hf_backbone), seed=0, cache_dir=tmp_path, progress=False)
    finally:
        del learner.image_features
    assert torch.equal(addon.basis, basis)
    assert len(list(tmp_path.glob("invariance-features-*.safetensors"))) == 1


def _fail(*args, **kwargs):
    raise AssertionError("the cached interventional features should have been used")


def test_addon_round_trip_and_gradients(hf_backbone, images, tmp_path):
    config = pr.InvarianceConfig(lam=1.0, dim=8, interventions=["grayscale", "gaussian_blur"], text_interventions=True)
    learner = pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=4)
    model = pr.wrap(learner, pr.RobustConfig(invariance=config))
    logs = model.fit_addons(_train_data(hf_backbone), progress=False)
    assert logs["invariance/dim"] == 8 and "invariance/val_accuracy" not in logs  # nothing to choose
    addon = model.addons["invariance"]
    assert int(addon.kept_dim) == 8 and addon.projection.shape == (hf_backbone.embed_dim, 8)

    model.eval()
    with torch.no_grad():
        before = model(images).logits
        assert not torch.allclose(before, learner(images).logits)  # k = 8 < 32 changes the logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=hf_backbone).eval()
    assert loaded.addons["invariance"].fitted
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, before, atol=0, rtol=0)

    model.train()
    out = model(images, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in hf_backbone.parameters())


def test_addon_with_per_sample_text_features(hf_backbone, images):
    learner = pr.build_learner("cocoop", hf_backbone, CLASSNAMES)
    model = pr.wrap(learner, pr.RobustConfig(invariance=pr.InvarianceConfig(lam=0.5, dim=4)))
    addon = model.addons["invariance"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, hf_backbone.embed_dim, generator=g)
    addon.set_projection(inv.ICMProjection.fit(z, torch.randn(20, hf_backbone.embed_dim, generator=g), dim=4))
    model.eval()
    with torch.no_grad():
        raw = learner(images)
        assert raw.text_features.dim() == 3
        torch.testing.assert_close(model(images).logits, _hand_logits(addon, raw), atol=1e-5, rtol=1e-5)


def test_addon_errors(hf_backbone, images):
    learner = pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2)
    with pytest.raises(ValueError, match="exceeds the feature size 32"):
        pr.wrap(learner, pr.RobustConfig(invariance=pr.InvarianceConfig(dim=64)))

    class LogitsOnly(torch.nn.Module):  # a custom learner that returns bare logits
        def __init__(self):
            super().__init__()
            self.backbone = hf_backbone
            self.bias = torch.nn.Parameter(torch.zeros(1, hf_backbone.embed_dim))

        def prompt_tokens(self):
            return {"bias": self.bias}

        def image_features(self, pixel_values):
            return F.normalize(self.backbone.encode_image(pixel_values), dim=-1)

        def forward(self, pixel_values, prompt_override=None):
            return self.image_features(pixel_values) @ F.normalize(self.bias, dim=-1).t()

    model = pr.wrap(LogitsOnly(), pr.RobustConfig(invariance=pr.InvarianceConfig(lam=1.0, dim=4)))
    model(images)  # unfitted: the add-on is off, bare logits are fine
    addon = model.addons["invariance"]
    addon.set_projection(inv.ICMProjection.fit(torch.randn(40, 32), torch.randn(10, 32), dim=4))
    with pytest.raises(TypeError, match=r"without image_features and text_features.*LearnerOutput"):
        model(images)
    # zero-shot selection needs class names: the error names the way out
    selecting = pr.wrap(LogitsOnly(), pr.RobustConfig(invariance=pr.InvarianceConfig(interventions=["invert"])))
    with pytest.raises(ValueError, match="selection='linear_probe'"):
        selecting.fit_addons(_train_data(hf_backbone), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"dim": 0}, "dim must be an integer >= 1"),
        ({"interventions": ["posterise"]}, "Did you mean 'posterize'"),
        ({"interventions": []}, "at least one"),
        ({"interventions": ["invert", "invert"]}, "distinct"),
        ({"pairs_per_image": 0}, "pairs_per_image"),
        ({"text_templates": ["a sketch of a cat"]}, "placeholder"),
        ({"text_weight": 1.5}, r"text_weight must be in \[0, 1\]"),
        ({"lam_grid": []}, "lam_grid"),
        ({"dim_fractions": [0.0]}, r"dim_fractions must hold at least one value in \(0, 1\]"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\)"),
        ({"selection": "zeroshot"}, "Did you mean 'zero_shot'"),
        ({"probe_reg": -1.0}, "probe_reg"),
        ({"feature_batch_size": 0}, "feature_batch_size"),
        ({"intervention_params": {"posterize": 5}}, "map intervention names to dicts"),
        ({"interventions": ["invert"], "intervention_params": {"posterize": {"bits": 5}}}, "not in interventions"),
        ({"intervention_params": {"posterize": {"bit": 5}}}, r"unknown parameters \['bit'\]; posterize accepts"),
        ({"interventions": ["invert"], "intervention_params": {"invert": {"strength": 1}}}, "invert accepts no param"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pr.InvarianceConfig(**kwargs)


def test_intervention_params_set_the_strength_of_the_pairs(hf_backbone, tmp_path, monkeypatch):
    learner = pr.build_learner("zeroshot", hf_backbone, CLASSNAMES)
    data = _train_data(hf_backbone)
    kwargs = {"mean": hf_backbone.image_mean, "std": hf_backbone.image_std, "progress": False}
    default = inv.interventional_features(learner, data, ["posterize", "solarize"], **kwargs)
    # posterize with 8 bits keeps every 8-bit level and solarize at threshold 1 inverts nothing: exact identities
    identity = {"posterize": {"bits": 8}, "solarize": {"threshold": 1.0}}
    kept = inv.interventional_features(learner, data, ["posterize", "solarize"], params=identity, **kwargs)
    torch.testing.assert_close(kept.intervened[:, 1], kept.clean, atol=1e-5, rtol=0)
    assert not torch.allclose(default.intervened[:, 1], default.clean, atol=1e-3)
    # the parameters are part of the cache key: another strength is never served from the cache
    cached = inv.interventional_features(learner, data, ["posterize"], cache_dir=tmp_path, **kwargs)
    milder = inv.interventional_features(
        learner, data, ["posterize"], params={"posterize": {"bits": 7}}, cache_dir=tmp_path, **kwargs
    )
    assert len(list(tmp_path.glob("invariance-features-*.safetensors"))) == 2
    assert not torch.equal(cached.intervened, milder.intervened)
    # the add-on passes the config's parameters on
    seen = {}

    def spy(*args, **kw):
        seen.update(kw["params"])
        return inv.interventional_features(*args, **kw)

    monkeypatch.setattr(inv.addon, "interventional_features", spy)
    config = pr.InvarianceConfig(
        lam=1.0, dim=8, interventions=["posterize"], intervention_params={"posterize": {"bits": 7}}
    )
    pr.wrap(learner, pr.RobustConfig(invariance=config)).fit_addons(data, progress=False)
    assert seen == {"posterize": {"bits": 7}}


def test_config_round_trip():
    config = pr.InvarianceConfig(lam=2.0, dim=16, interventions=["invert"], text_interventions=True)
    assert pr.InvarianceConfig.from_dict(config.to_dict()) == config
    assert pr.RobustConfig.from_dict(pr.RobustConfig(invariance=config).to_dict()).invariance == config


def test_class_subspace_share_separates_nuisance_from_class_directions():
    from prompt_robust.addons.invariance.icm import class_subspace_share

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centers = torch.zeros(4, 12)
    centers[torch.arange(4), torch.arange(4)] = 3.0  # classes live in dims 0-3
    clean = centers[labels] + 0.1 * torch.randn(40, 12, generator=gen)
    nuisance = torch.zeros(40, 12)
    nuisance[:, 6:] = torch.randn(40, 6, generator=gen)  # a nuisance outside the class span
    assert class_subspace_share(clean, clean + nuisance, labels) < 0.05
    along = torch.zeros(40, 12)
    along[:, :4] = torch.randn(40, 4, generator=gen)
    along[:, :4] -= along[:, :4].mean(1, keepdim=True)  # inside span{e_i - e_j}: the centred class means
    assert class_subspace_share(clean, clean + along, labels) > 0.95
    with pytest.raises(ValueError, match="same n images"):
        class_subspace_share(clean, clean[:5], labels)
