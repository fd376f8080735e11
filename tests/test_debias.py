"""The debiasing add-on (DPT, https://arxiv.org/abs/2503.08368) and its baselines: weight formulas, pseudo-labels
that never read the true attribute, errors, group DRO and JTT, and worst-group accuracy on a spurious problem."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, make_backbone
from torch import nn

import prompt_robust as pr
import prompt_robust.addons.debias as db  # registers the "debias" add-on
from prompt_robust import attributes
from prompt_robust.bench.tasks import TaskData
from prompt_robust.training import FitConfig, evaluate, fit

DIM = 8
VALUES = ["land background", "water background"]


class FeatureLearner(nn.Module):
    """A linear prompt learner on synthetic features (``pixel_values`` are ``(b, DIM)`` vectors).

    Feature 0 carries the class, feature 1 the spurious attribute (negative: land, positive: water). Its frozen
    "CLIP text tower" (``fixed_text_features``) maps a text naming water to +e_1 and any other text to -e_1, so
    zero-shot pseudo-labels of the attribute have a known answer.
    """

    def __init__(self, classnames=("landbird", "waterbird")) -> None:
        super().__init__()
        self.classnames = list(classnames)
        self.weight = nn.Parameter(torch.zeros(len(classnames), DIM))  # (n_cls, DIM)
        self.bias = nn.Parameter(torch.zeros(len(classnames)))

    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        return {"text": self.weight}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixel_values, dim=-1)

    def forward(self, pixel_values: torch.Tensor, prompt_override=None) -> torch.Tensor:
        return pixel_values @ self.weight.t() + self.bias  # (b, n_cls)

    def fixed_text_features(self, texts) -> torch.Tensor:
        out = torch.zeros(len(texts), DIM)
        for i, text in enumerate(texts):
            out[i, 1] = 1.0 if "water" in text else -1.0
        return out


def spurious_data(sizes: dict[tuple[int, int], int], seed: int) -> TaskData:
    """Groups (class y, attribute a) of the given sizes; the class is noisy in feature 0, the attribute clean in
    feature 1; group id = 2y + a (as Waterbirds)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([y for (y, _), n in sizes.items() for _ in range(n)])
    attributes = torch.tensor([a for (_, a), n in sizes.items() for _ in range(n)])
    x = 0.6 * torch.randn(len(labels), DIM, generator=generator)  # (n, DIM)
    x[:, 0] += 2.0 * labels - 1.0
    x[:, 1] = 2.0 * (2.0 * attributes - 1.0) + 0.1 * torch.randn(len(labels), generator=generator)
    names = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]
    return TaskData(x, labels, ["landbird", "waterbird"], labels * 2 + attributes, names)


TRAIN_SIZES = {(0, 0): 190, (0, 1): 10, (1, 0): 10, (1, 1): 190}  # 95% of each class on its "habitat"
TEST_SIZES = dict.fromkeys(TRAIN_SIZES, 100)


@pytest.fixture(scope="module")
def train():
    return spurious_data(TRAIN_SIZES, seed=0)


@pytest.fixture(scope="module")
def clip_backbone():
    """One tiny HF CLIP for the module (frozen by every learner; never modified)."""
    return make_backbone("hf")


@pytest.fixture(scope="module")
def test_set():
    return spurious_data(TEST_SIZES, seed=1)


def wrapped(config: pr.DebiasConfig | None):
    torch.manual_seed(0)
    return pr.wrap(FeatureLearner(), pr.RobustConfig(debias=config))


def prepared(config: pr.DebiasConfig, data: TaskData):
    model = wrapped(config)
    model.fit_addons(data, progress=False)
    return model, model.addons["debias"]


class NoGroups(Mapping):
    """A batch that fails the test if the true group or attribute is read."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def __getitem__(self, key):
        if key in ("groups", "attribute", "attributes"):
            raise AssertionError(f"pseudo mode read the true {key!r}")
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class GuardedItems(torch.utils.data.Dataset):
    """Dataset items whose true group/attribute must never be read (while pseudo-labelling)."""

    def __init__(self, data: TaskData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        item = self.data[index]
        return NoGroups({**item, "attribute": item["groups"] % 2})


# -- weight formulas ---------------------------------------------------------------------------------------------
def test_dpt_group_weights_match_the_formula_exactly():
    # N = (3, 1), p̄ = (1, 0), η = 1: raw = (1/3, e), Σ N·raw = 1 + e, N_total = 4
    w = db.dpt_group_weights(torch.tensor([3, 1]), torch.tensor([1.0, 0.0]), eta=1.0)
    e = math.e
    assert w.tolist() == pytest.approx([4 / (3 * (1 + e)), 4 * e / (1 + e)], rel=1e-12)
    # a larger example against an independent computation; mean 1 over samples
    counts, p_bar, eta = [30, 10, 5, 0], [0.9, 0.5, 0.2, 0.7], 2.0
    raw = [math.exp(eta * (1 - p)) / max(n, 1) for n, p in zip(counts, p_bar, strict=True)]
    scale = sum(counts) / sum(n * r for n, r in zip(counts, raw, strict=True))
    w = db.dpt_group_weights(torch.tensor(counts), torch.tensor(p_bar, dtype=torch.float64), eta)
    assert w.tolist() == pytest.approx([r * scale for r in raw], rel=1e-12)
    assert float((w * torch.tensor(counts)).sum()) / sum(counts) == pytest.approx(1.0, rel=1e-12)
    # η = 0: balanced groups, w_g ∝ 1/N_g
    assert db.dpt_group_weights(torch.tensor([6, 2]), torch.tensor([0.3, 0.9]), 0.0).tolist() == pytest.approx(
        db.balanced_group_weights(torch.tensor([6, 2])).tolist()
    )
    assert db.balanced_group_weights(torch.tensor([6, 2])).tolist() == pytest.approx([2 / 3, 2.0])


def test_ema_update_is_exact_and_skips_absent_groups():
    running = torch.tensor([0.5, 0.8, 0.1], dtype=torch.float64)
    observed = torch.tensor([0.9, 0.0, 0.3], dtype=torch.float64)
    out = db.ema_update(running, observed, torch.tensor([True, False, True]), ema=0.75)
    assert out.tolist() == pytest.approx([0.75 * 0.5 + 0.25 * 0.9, 0.8, 0.75 * 0.1 + 0.25 * 0.3], rel=1e-12)


def test_addon_tracks_true_class_probability_and_weights_by_formula(train):
    config = pr.DebiasConfig(attribute_values=VALUES, eta=2.0, ema=0.5)
    model, addon = prepared(config, train)
    # the untrained learner predicts uniformly: p̄ = 0.5 in every group; pseudo groups = true groups here
    assert addon.group_counts.tolist() == [190, 10, 10, 190]
    assert addon.mean_true_prob.tolist() == pytest.approx([0.5] * 4)
    x = torch.zeros(3, DIM)
    x[:, 1] = torch.tensor([-1.0, 1.0, -1.0])  # attributes land, water, land -> groups (with labels) 0, 1, 2
    labels = torch.tensor([0, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # true-class probabilities p0, p1, p2
    p = logits.softmax(-1)[torch.arange(3), labels].double()
    model.train()
    weights = addon.batch_weights({"pixel_values": x, "labels": labels}, logits)[0]
    expected_p = torch.tensor([0.5 * 0.5 + 0.5 * p[0], 0.5 * 0.5 + 0.5 * p[1], 0.5 * 0.5 + 0.5 * p[2], 0.5])
    assert addon.mean_true_prob.tolist() == pytest.approx(expected_p.tolist(), rel=1e-6)
    group_w = db.dpt_group_weights(torch.tensor([190, 10, 10, 190]), expected_p, eta=2.0)
    assert weights.tolist() == pytest.approx(group_w[[0, 1, 2]].tolist(), rel=1e-6)
    assert not weights.requires_grad
    # not a training step (e.g. a validation loss): weights but no update
    model.eval()
    addon.batch_weights({"pixel_values": x, "labels": labels}, logits * 5, train=False)
    assert addon.mean_true_prob.tolist() == pytest.approx(expected_p.tolist(), rel=1e-6)
    # the group weights are logged through the wrapped model's output
    model.train()
    out = model(x, labels=labels)
    assert out.logs["debias/w/waterbird | water background"] == pytest.approx(
        addon.group_weights()["waterbird | water background"]
    )


# -- pseudo-labels from images and words only ------------------------------------------------------------------------
def test_pseudo_labelling_takes_no_attribute_and_never_reads_one(train):
    params = set(inspect.signature(attributes.pseudo_attribute_labels).parameters)
    assert params == {"learner", "dataset", "attribute_values", "templates", "batch_size", "progress"}
    assert not params & {"groups", "attributes", "true_attributes", "group_names"}
    # items whose true group/attribute raise when read: pseudo-labelling (and prepare) never touch them
    pseudo = attributes.pseudo_attribute_labels(FeatureLearner(), GuardedItems(train), VALUES, progress=False)
    assert torch.equal(pseudo, train.groups % 2)
    model = wrapped(pr.DebiasConfig(attribute_values=VALUES))
    model.fit_addons(GuardedItems(train), progress=False)
    assert torch.equal(model.addons["debias"].pseudo_labels, train.groups % 2)


@pytest.mark.parametrize("with_index", [False, True])
def test_pseudo_weights_ignore_true_groups_in_the_batch(train, with_index):
    model, addon = prepared(pr.DebiasConfig(attribute_values=VALUES), train)
    model.eval()  # no EMA update: identical inputs must give identical weights
    batch = {"pixel_values": train.pixel_values[:40:3], "labels": train.labels[:40:3]}
    if with_index:
        batch["index"] = torch.arange(0, 40, 3)
    logits = torch.randn(len(batch["labels"]), 2, generator=torch.Generator().manual_seed(0))
    reference = addon.batch_weights(NoGroups(batch), logits, train=False)[0]  # reading "groups" would fail
    garbage = addon.batch_weights({**batch, "groups": torch.full_like(batch["labels"], 987)}, logits, train=False)[0]
    assert torch.equal(reference, garbage)


def test_pseudo_labels_equal_the_true_attribute_on_a_known_problem(train):
    pseudo = attributes.pseudo_attribute_labels(FeatureLearner(), train, VALUES, batch_size=64, progress=False)
    assert attributes.pseudo_label_accuracy(pseudo, train.groups % 2) == 1.0
    # the values' order decides the ids: reversed words give the complementary labels
    flipped = attributes.pseudo_attribute_labels(FeatureLearner(), train, VALUES[::-1], progress=False)
    assert torch.equal(flipped, 1 - pseudo)
    # templates are averaged: per-value features are unit vectors
    text = attributes.attribute_text_features(FeatureLearner(), VALUES, ["a photo with a {}.", "on a {}."])
    assert text.shape == (2, DIM) and torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_pseudo_labels_with_a_real_clip_backbone_and_its_learner(clip_backbone):
    """The CLIP path (tokenizer, text tower, prompt-free image features) on the tiny backbone: the zero-shot
    classifier is the template-averaged text features and an image takes the value of highest cosine."""
    backbone = clip_backbone
    learner = pr.build_learner("coop", backbone, CLASSNAMES, n_ctx=4)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    templates = ["a photo with a {}.", "a photo of something on a {}."]
    values = ["grass", "water"]
    text = attributes.attribute_text_features(learner, values, templates)
    with torch.no_grad():
        per_template = F.normalize(
            backbone.encode_text(backbone.tokenize(["a photo with a grass.", "a photo of something on a grass."])),
            dim=-1,
        )
        image = F.normalize(backbone.encode_image(images), dim=-1)
    assert torch.allclose(text[0], F.normalize(per_template.mean(0), dim=-1), atol=1e-5)
    pseudo = attributes.pseudo_attribute_labels(
        learner, [(x, 0) for x in images], values, templates=templates, progress=False
    )
    assert torch.equal(pseudo, (image @ text.t()).argmax(-1))


# -- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], r"at least two values .*mode='oracle'"),
        (["water background"], r"at least two values .*got \['water background'\]"),
        (["land", "  "], r"at least two non-empty values .*entry 1 is blank"),
        (["water", "Water "], r"distinct .*repeated: \['water'\]"),
    ],
)
def test_bad_attribute_names_are_refused_clearly(values, match):
    with pytest.raises(ValueError, match=match):
        pr.DebiasConfig(attribute_values=values)
    with pytest.raises(ValueError, match=match):  # the same rules for direct calls
        attributes.attribute_text_features(FeatureLearner(), values)


def test_config_modes_and_fields_are_validated():
    with pytest.raises(ValueError, match=r"unknown debias mode 'pseudo_labels'; valid: groupdro, jtt, oracle, pseudo"):
        pr.DebiasConfig(mode="pseudo_labels", attribute_values=VALUES)
    for mode in ("oracle", "groupdro", "jtt"):
        assert pr.DebiasConfig(mode=mode).attribute_values == []  # no words needed without pseudo-labels
    with pytest.raises(ValueError, match="must be a list of strings"):
        pr.DebiasConfig(attribute_values="land,water")
    with pytest.raises(ValueError, match=r"exactly one '\{\}' placeholder"):
        pr.DebiasConfig(attribute_values=VALUES, templates=["a photo of water."])
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        pr.DebiasConfig(attribute_values=VALUES, ema=1.0)
    with pytest.raises(ValueError, match="jtt_upweight must be >= 1"):
        pr.DebiasConfig(mode="jtt", jtt_upweight=0.5)
    with pytest.raises(ValueError, match="groupdro_step must be > 0"):
        pr.DebiasConfig(mode="groupdro", groupdro_step=0.0)
    config = pr.RobustConfig(debias=pr.DebiasConfig(attribute_values=VALUES, eta=0.5, mode="pseudo"))
    assert pr.RobustConfig.from_dict(config.to_dict()) == config


def test_oracle_and_groupdro_without_groups_fail_clearly(train):
    no_groups = [(train.pixel_values[i], int(train.labels[i])) for i in range(8)]
    for mode in ("oracle", "groupdro"):
        model = wrapped(pr.DebiasConfig(mode=mode))
        with pytest.raises(ValueError, match=r"item key 'groups'.*load_waterbirds.*load_celeba.*spurious_train"):
            model.fit_addons(no_groups, progress=False)
        model.fit_addons(train, progress=False)
        with pytest.raises(ValueError, match=r"batch key 'groups'.*load_waterbirds.*mode='pseudo'"):
            model(train.pixel_values[:4], labels=train.labels[:4])


def test_training_before_prepare_and_jtt_misuse_fail_clearly(train):
    model = wrapped(pr.DebiasConfig(attribute_values=VALUES))
    with pytest.raises(RuntimeError, match=r"call model.fit_addons\(train\)"):
        model(train.pixel_values[:4], labels=train.labels[:4])
    jtt = wrapped(pr.DebiasConfig(mode="jtt"))
    with pytest.raises(ValueError, match=r"jtt_error_set\(erm_model, train\).*set_error_set"):
        jtt.fit_addons(train, progress=False)
    jtt.addons["debias"].set_error_set([1, 2])
    jtt.fit_addons(train, progress=False)
    with pytest.raises(ValueError, match=r"needs the batch key 'index'.*with_index"):
        jtt(train.pixel_values[:4], labels=train.labels[:4])


# -- baselines -------------------------------------------------------------------------------------------------------
def test_groupdro_moves_weight_to_the_group_with_the_highest_loss(train):
    model, addon = prepared(pr.DebiasConfig(mode="groupdro", groupdro_step=0.5), train)
    assert addon.group_q.tolist() == pytest.approx([0.25] * 4)
    labels = torch.tensor([0, 0, 1, 1])
    groups = torch.tensor([0, 1, 2, 3])
    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.0, 3.0]])  # group 1 is misclassified worst
    losses = F.cross_entropy(logits, labels, reduction="none").double()
    model.train()
    batch = {"pixel_values": torch.zeros(4, DIM), "labels": labels, "groups": groups}
    for step in range(1, 4):
        weights = addon.batch_weights(batch, logits)[0]
        expected = torch.softmax(0.5 * step * losses, dim=0)  # q ∝ exp(η Σ_t L_g) from uniform
        assert addon.group_q.tolist() == pytest.approx(expected.tolist(), rel=1e-9)
    assert int(addon.group_q.argmax()) == 1 and int(weights.argmax()) == 1
    assert float(weights.mean()) == pytest.approx(1.0)


def test_jtt_error_set_and_upweighting(train):
    erm = wrapped(None)
    with torch.no_grad():  # an "ERM model" that follows the spurious feature: wrong on the minority groups
        erm.learner.weight[:, 1] = torch.tensor([-1.0, 1.0])
    errors = db.jtt_error_set(erm, train, batch_size=64, progress=False)
    minority = torch.nonzero(train.groups % 3 != 0).flatten()  # groups 1 and 2: class != attribute
    assert torch.equal(errors, minority)
    model = wrapped(pr.DebiasConfig(mode="jtt", jtt_upweight=7.0))
    model.addons["debias"].set_error_set(errors)
    model.fit_addons(train, progress=False)
    data = db.with_index(train)
    index = torch.arange(180, 220)  # majority and minority examples
    batch = {key: torch.stack([torch.as_tensor(data[int(i)][key]) for i in index]) for key in data[0]}
    weights = model.addons["debias"].batch_weights(batch, torch.zeros(len(index), 2))[0]
    expected = torch.where(torch.isin(index, errors), 7.0, 1.0)
    assert torch.equal(weights, expected)


# -- end to end ------------------------------------------------------------------------------------------------------
def _train_and_evaluate(config, train, test_set, *, indexed=False):
    model = wrapped(config)
    model.fit_addons(train, progress=False)
    data = db.with_index(train) if indexed else train
    fit(model, data, FitConfig(steps=150, batch_size=50, lr=0.05, warmup_steps=0, seed=0, progress=False))
    return evaluate(model, test_set, groups_key="groups")


@pytest.mark.parametrize("config", [pr.DebiasConfig(attribute_values=VALUES), pr.DebiasConfig(mode="groupdro")])
def test_fit_checkpoints_carry_the_running_group_statistics(train, tmp_path, config):
    import shutil

    fit_config = FitConfig(steps=6, batch_size=50, lr=0.05, warmup_steps=0, seed=0, checkpoint_every=3, progress=False)

    def prepared():
        model = wrapped(config)
        model.fit_addons(train, progress=False)
        return model

    straight = prepared()
    fit(straight, train, fit_config, checkpoint_dir=tmp_path / "straight")
    assert all(p.grad is None for p in straight.parameters())  # fit leaves no stale gradients behind
    state = straight.training_state()
    assert int(state["debias.updates"]) == 6
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert (tmp_path / "resumed" / "checkpoint-3" / "addon_training_state.safetensors").is_file()
    resumed = prepared()
    result = fit(resumed, train, fit_config, checkpoint_dir=tmp_path / "resumed")
    assert result.resumed_from == 3
    for name, value in straight.learner.state_dict().items():
        assert torch.equal(resumed.learner.state_dict()[name], value), name
    for key, value in state.items():
        assert torch.equal(resumed.training_state()[key], value), key
    # a checkpoint's state that does not fit this training set is refused with the reason
    bad = {**state, "debias.mean_true_prob": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="another training set"):
        prepared().load_training_state(bad)
    with pytest.raises(ValueError, match="add-on"):
        prepared().load_training_state({"refiner.x": torch.zeros(1)})


def test_reweighting_raises_worst_group_accuracy_over_erm(train, test_set):
    erm = _train_and_evaluate(None, train, test_set)
    assert erm["worst_group"] < 0.8 and erm["gap"] > 0.1  # ERM leans on the spurious feature
    for config, indexed in (
        (pr.DebiasConfig(mode="oracle"), False),
        (pr.DebiasConfig(attribute_values=VALUES), False),  # annotation-free, pseudo-labels on the fly
        (pr.DebiasConfig(attribute_values=VALUES), True),  # pseudo-labels looked up by index
        (pr.DebiasConfig(mode="groupdro", groupdro_step=0.1), False),
    ):
        result = _train_and_evaluate(config, train, test_set, indexed=indexed)
        assert result["worst_group"] >= erm["worst_group"] + 0.15, (config.mode, result, erm)
        assert result["gap"] < erm["gap"]
    metrics = db.group_robustness(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), [0, 0, 1, 1], ["a", "b"])
    assert metrics == {"avg": 0.75, "worst_group": 0.5, "gap": 0.25, "per_group": {"a": 1.0, "b": 0.5}}


def test_debias_addon_on_a_clip_learner_trains_and_saves_nothing(clip_backbone, tmp_path):
    """CoOp on the tiny CLIP: prepare, train with on-the-fly and indexed pseudo-labels, logs, adapter round trip."""
    backbone = clip_backbone
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.arange(12) % len(CLASSNAMES)
    data = TaskData(images, labels, CLASSNAMES)
    torch.manual_seed(0)
    learner = pr.build_learner("coop", backbone, CLASSNAMES, n_ctx=4)
    model = pr.wrap(learner, pr.RobustConfig(debias=pr.DebiasConfig(attribute_values=["grass", "water"])))
    logs = model.fit_addons(data, progress=False)
    addon = model.addons["debias"]
    assert addon.num_groups == len(CLASSNAMES) * 2 and int(addon.group_counts.sum()) == 12
    assert sum(v for k, v in logs.items() if k.startswith("debias/pseudo_fraction/")) == pytest.approx(1.0)
    model.eval()
    fly = addon.batch_weights({"pixel_values": images, "labels": labels}, model(images).logits, train=False)[0]
    looked_up = addon.batch_weights(
        {"pixel_values": images, "labels": labels, "index": torch.arange(12)}, model(images).logits, train=False
    )[0]
    assert torch.allclose(fly, looked_up)
    result = fit(model, db.with_index(data), FitConfig(steps=2, batch_size=6, warmup_steps=0, progress=False))
    assert math.isfinite(result.final_loss)
    assert addon.updates == 2
    assert addon.state_dict() == {}  # training bookkeeping is not part of the adapter
    model.save_pretrained(tmp_path / "adapter")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "adapter", backbone=backbone)
    assert loaded.config.debias == model.config.debias
    loaded.eval()
    assert torch.allclose(loaded(images).logits, model(images).logits, atol=1e-5)
