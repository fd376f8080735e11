"""The ``speed`` bench suite and the per-sample prompt assembly it measures.

* the suite runs end to end on tiny backbones and writes its report (rows, checks, skipped measurements);
* its baseline, the reference repositories' per-sample loop over full-length sequences, gives the library's
  logits (CoCoOp, CoOp+refiner) on both tiny backbones;
* per-sample prompts are assembled only up to the positions the trimmed text passes read, and the shared tail
  rebuilds the full sequences exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import make_backbone

from prompt_robust.bench.suites import SUITES, SuiteRequest, speed
from prompt_robust.learners import build_learner
from prompt_robust.learners.base import ClassPrompts

torch.set_num_threads(1)

TOL = 1e-5
UNEVEN = ["cat", "dog", "a large boat", "one small house tree"]


def tiny_config(**overrides) -> speed.SpeedConfig:
    settings = {
        "backbones": ["hf-random:tiny"],
        "classes": [2, 3],
        "reference_classes": [2],
        "train_classes": [2],
        "batch_size": 2,
        "batches": 1,
    }
    return speed.SpeedConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# the suite end to end
# ---------------------------------------------------------------------------------------------------------------
def test_suite_runs_end_to_end_and_writes_its_report(tmp_path):
    result = speed.speed_profile(tiny_config(), tmp_path, progress=False, command="test")
    saved = json.loads((tmp_path / "speed.json").read_text())
    report = (tmp_path / "speed.md").read_text()
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    measured = {(r["method"], r["reference"], r["classes"], r["mode"]) for r in result["rows"]}
    methods = ["zeroshot", "coop", "cocoop", "coop+refiner", "maple"]
    assert {(m, False, c, "infer") for m in methods for c in (2, 3)} <= measured
    assert {("cocoop", True, 2, "infer"), ("coop+refiner", True, 2, "infer")} <= measured
    assert {(m, False, 2, "train") for m in methods if m != "zeroshot"} <= measured
    assert not result["skipped"]
    for row in result["rows"]:
        assert row["batches"] == 1 and len(row["seconds"]) == 1
        assert row["peak_mib"] >= 0 and math.isfinite(row["peak_mib"])
        if row["mode"] == "infer":
            assert row["images_per_s"] == pytest.approx(2 / row["seconds"][0])
        if row["reference"]:
            assert row["logit_max_abs_diff"] <= TOL  # the baseline computes the library's logits
    refiner = next(
        r for r in result["rows"] if (r["method"], r["reference"], r["mode"]) == ("coop+refiner", False, "infer")
    )
    assert 0 < refiner["sampler_share"] < 1
    trimmed = next(r for r in result["rows"] if r["method"] == "cocoop" and not r["reference"])
    assert trimmed["text_positions"] < trimmed["context_length"]
    assert "| hf-random:tiny | cocoop (reference loop) | 2 |" in report
    assert "full-length per-sample loop" in report and "sampler takes" in report


def test_without_fork_each_measurement_builds_its_backbone(tmp_path, monkeypatch):
    """Where fork is unavailable (or on CUDA) the measurement process is spawned and builds the backbone itself."""
    monkeypatch.setattr(speed.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    config = tiny_config(methods=["cocoop"], classes=[2], references=[], train_classes=[])
    [row] = speed.speed_profile(config, tmp_path, progress=False)["rows"]
    assert (row["method"], row["classes"], row["mode"]) == ("cocoop", 2, "infer") and row["images_per_s"] > 0


def test_budget_runs_one_batch_or_skips():
    config = tiny_config(batches=3, budget_s=35)
    job = {"backbone": "b", "method": "coop", "reference": False, "mode": "infer", "classes": 100, "batch_size": 8}
    done = {("b", "coop", False, "infer"): [(10, 0.5)]}  # one point: 0.05 s per class and batch
    assert speed._plan(job, {}, config) == (3, "")  # nothing to extrapolate from
    assert speed._plan(job, done, config) == (3, "")  # warm-up + 3 batches: 4 x 5 s
    assert speed._plan({**job, "classes": 300}, done, config) == (1, "")  # 4 x 15 s > 35 s >= 2 x 15 s
    batches, reason = speed._plan({**job, "classes": 400}, done, config)  # 2 x 20 s > 35 s
    assert batches == 0 and "budget_s 35" in reason and "0.5 s at 10 classes" in reason
    # the reference loop warms up on one image of the batch: 20 / 8 + 20 s fits
    reference = {**job, "reference": True, "classes": 400}
    assert speed._plan(reference, {("b", "coop", True, "infer"): [(10, 0.5)]}, config) == (1, "")


def test_prediction_follows_the_measured_costs():
    job = {"backbone": "b", "method": "maple", "reference": False, "mode": "infer", "classes": 1000}
    # two points: the line through them (a fixed image cost plus a small cost per class)
    done = {("b", "maple", False, "infer"): [(10, 5.0), (100, 6.0)]}
    assert speed._predict(job, done)[0] == pytest.approx(6.0 + 900 / 90)
    # a training step scales as the method's prediction did between the two class counts
    done[("b", "maple", False, "train")] = [(10, 10.0)]
    train = {**job, "mode": "train", "classes": 100}
    per_batch, source = speed._predict(train, done)
    assert per_batch == pytest.approx(12.0) and "scaled as its prediction" in source
    assert speed._predict({**train, "classes": 1000}, done)[0] == pytest.approx(1000.0)  # no prediction there yet


def test_a_backbone_that_cannot_be_imported_is_skipped_with_one_line(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else find_spec(name, *a)
    )
    result = speed.speed_profile(tiny_config(backbones=["open_clip:ViT-B-16"]), tmp_path, progress=False)
    assert result["rows"] == []
    [skipped] = result["skipped"]
    assert "open_clip is not importable" in skipped["reason"]
    assert "open_clip is not importable" in (tmp_path / "speed.md").read_text()


def test_cli_options_reach_the_config(tmp_path, monkeypatch):
    seen = {}

    def fake_profile(config, out, **kwargs):
        seen["config"], seen["refiner"] = config, kwargs["refiner"]
        return {"config": config.to_dict(), "rows": [], "skipped": []}

    monkeypatch.setattr(speed, "speed_profile", fake_profile)
    request = SuiteRequest(
        out=str(tmp_path),
        seeds=[1],
        backbone="hf-random:tiny",
        bench_options={"steps": 1, "batch_size": 4},
        refiner={"num_steps": 3},
    )
    text = SUITES["speed"].run(request)
    config = seen["config"]
    assert (config.backbones, config.batches, config.batch_size) == (["hf-random:tiny"], 1, 4)
    assert seen["refiner"] == {"num_steps": 3}
    assert "Checks:" in text


def test_config_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="not measurable"):
        speed.SpeedConfig(methods=["coop+debias"])
    with pytest.raises(ValueError, match="reference loop exists"):
        speed.SpeedConfig(references=["maple"])


# ---------------------------------------------------------------------------------------------------------------
# the baseline equals the library
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["hf", "open_clip"])
def backbone(request):
    return make_backbone(request.param)


@pytest.mark.parametrize("method", ["cocoop", "coop+refiner"])
def test_reference_loop_gives_the_library_logits(method, backbone):
    torch.manual_seed(0)
    model = speed.build_model(backbone, method, UNEVEN, text_chunk_size=3)
    with torch.no_grad():  # a trained-looking context and meta-net, so that the per-sample shifts matter
        for param in model.parameters():
            if param.requires_grad:  # the prompt's tensors, not the frozen backbone
                param.add_(0.05 * torch.randn_like(param))
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        library = model(images).logits
        reference = speed.reference_logits(model, images)
    assert reference.shape == library.shape == (3, len(UNEVEN))
    assert float((reference - library).abs().max()) <= TOL
    assert float(library.std(dim=0).max()) > 1e-3  # per-image logits really differ


def test_reference_loop_refuses_other_learners(backbone):
    model = speed.build_model(backbone, "coop", UNEVEN)
    with pytest.raises(ValueError, match="reference loop covers"):
        speed.reference_logits(model, torch.zeros(1, 3, backbone.image_size, backbone.image_size))


# ---------------------------------------------------------------------------------------------------------------
# per-sample prompts are assembled only where the trimmed passes read
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ClassPrompts.POSITIONS)
def test_assembly_of_the_kept_positions_plus_the_tail_is_the_full_sequence(position, backbone):
    prompts = ClassPrompts(backbone, UNEVEN, n_ctx=3, position=position)
    ctx = torch.randn(2, 1, 3, backbone.text_width)  # per sample
    full = prompts.assemble(ctx)  # (2, n_cls, L, w)
    eot = backbone.eot_positions(prompts.input_ids)
    assert prompts.min_length == int(eot.max()) + 1 < backbone.context_length
    for length in (prompts.min_length, prompts.min_length + 2, backbone.context_length):
        kept = prompts.assemble(ctx, length)
        assert kept.shape == (2, len(UNEVEN), length, backbone.text_width)
        assert torch.equal(kept, full[..., :length, :])
        tail = prompts.tail(length).expand(2, len(UNEVEN), -1, -1)
        assert torch.equal(torch.cat([kept, tail], dim=-2), full)
    with pytest.raises(ValueError, match="must keep every class's EOT"):
        prompts.assemble(ctx, prompts.min_length - 1)


@pytest.mark.parametrize("chunk", [2, None])
def test_per_sample_prompts_are_built_at_the_trimmed_length(chunk, backbone, monkeypatch):
    torch.manual_seed(0)
    learner = build_learner("cocoop", backbone, UNEVEN, text_chunk_size=chunk).eval()
    lengths = []
    assemble = ClassPrompts.assemble

    def spy(self, ctx, length=None):
        out = assemble(self, ctx, length)
        lengths.append(out.shape[-2])
        return out

    monkeypatch.setattr(ClassPrompts, "assemble", spy)
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        trimmed = learner(images)
        backbone.trim_text = False
        try:
            full = learner(images)
        finally:
            backbone.trim_text = True
    expected = backbone.text_length(learner.prompts.input_ids)
    assert lengths == [expected, backbone.context_length] and expected < backbone.context_length
    assert float((trimmed.text_features - full.text_features).abs().max()) <= TOL
    assert float((trimmed.logits - full.logits).abs().max()) <= 100 * TOL


def test_deep_prompts_widen_the_assembled_length(backbone, monkeypatch):
    """Deep prompts longer than the texts need their slots: the assembly covers 1 + n_tokens positions."""
    learner = build_learner("coop", backbone, ["cat", "dog"], n_ctx=2).eval()
    n_tokens = learner.prompts.min_length + 2  # reaches past every EOT
    deep = {1: torch.randn(n_tokens, backbone.text_width, generator=torch.Generator().manual_seed(0))}
    lengths = []
    assemble = ClassPrompts.assemble

    def spy(self, ctx, length=None):
        lengths.append(length)
        return assemble(self, ctx, length)

    monkeypatch.setattr(ClassPrompts, "assemble", spy)
    ctx = learner.ctx.unsqueeze(0)  # (1, n_ctx, w)
    with torch.no_grad():
        trimmed = learner.encode_prompts(learner.prompts, ctx, deep)
        backbone.trim_text = False
        try:
            full = learner.encode_prompts(learner.prompts, ctx, deep)
        finally:
            backbone.trim_text = True
        plain = learner.encode_prompts(learner.prompts, ctx)
    assert lengths == [1 + n_tokens, backbone.context_length, learner.prompts.min_length]
    assert float((trimmed - full).abs().max()) <= TOL
    assert float((trimmed - plain).abs().max()) > 1e-3  # the deep prompts really act
