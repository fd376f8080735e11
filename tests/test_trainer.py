"""transformers.Trainer end to end: the wrapped model's loss, the callback's stages, resume and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone

import prompt_robust as pr
from prompt_robust.bench.tasks import WorldTasks

transformers = pytest.importorskip("transformers")
from prompt_robust.integrations.trainer import (  # noqa: E402
    ADAPTER_SUBDIR,
    TRAINING_STATE_FILE,
    RobustCallback,
    robust_metrics,
)


@pytest.fixture(scope="module")
def world():
    backbone = make_backbone("hf")
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, pool_per_class=4)
    train = tasks.spurious_train(n_per_class=8, seed=1)
    return backbone, train


def _args(out, **kwargs):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=0.01,
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels", "groups"],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kwargs)
    return transformers.TrainingArguments(**base)


def _model(backbone, classnames, refiner=True):
    torch.manual_seed(0)
    learner = pr.build_learner("coop", backbone, classnames, n_ctx=2)
    config = pr.RefinerConfig(train_steps=3, inner_steps=1, hidden_dim=16, layers=1, heads=2) if refiner else None
    return pr.wrap(learner, pr.RobustConfig(refiner=config))


def test_trainer_trains_schedules_the_refiner_saves_and_evaluates(world, tmp_path):
    backbone, train = world
    model = _model(backbone, train.classnames)
    before = model.learner.ctx.detach().clone()
    callback = RobustCallback(train, addon_start_step=3)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=train,
        eval_dataset=train,
        compute_metrics=robust_metrics,
        callbacks=[callback],
    )
    trainer.train()
    assert not torch.equal(model.learner.ctx, before)  # the prompt was tuned through the model's own loss
    refiner = model.addons["refiner"]
    assert refiner.fitted and int(refiner.trained_steps) == 3  # fit_addons ran once, after the warm-up
    assert model.stage == "prompt"
    for step in (3, 6):
        assert (tmp_path / f"checkpoint-{step}" / ADAPTER_SUBDIR / "adapter_config.json").is_file()
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / ADAPTER_SUBDIR, backbone=backbone).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(train.pixel_values[:5]).logits, model(train.pixel_values[:5]).logits)
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_worst_group_accuracy", "eval_gap", "eval_loss"} <= set(metrics)
    assert metrics["eval_worst_group_accuracy"] <= metrics["eval_accuracy"]


def test_trainer_resumes_from_a_checkpoint(world, tmp_path):
    backbone, train = world

    def run(out, resume=None):
        model = _model(backbone, train.classnames, refiner=False)
        trainer = transformers.Trainer(
            model=model, args=_args(out), train_dataset=train, callbacks=[RobustCallback(train)]
        )
        trainer.train(resume_from_checkpoint=resume)
        return model.learner.ctx.detach().clone()

    straight = run(tmp_path / "a")
    # stop after the checkpoint at step 3, then resume from it
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    torch.testing.assert_close(resumed, straight)
    state = json.loads((tmp_path / "a" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_trainer_with_debias_evaluates_before_training_and_resumes_exactly(world, tmp_path):
    backbone, train = world

    def build():
        torch.manual_seed(0)
        learner = pr.build_learner("coop", backbone, train.classnames, n_ctx=2)
        config = pr.DebiasConfig(attribute_values=["grass", "water"], eta=2.0)
        return pr.wrap(learner, pr.RobustConfig(debias=config))

    def run(out, resume=None, evaluate_first=False):
        model = build()
        trainer = transformers.Trainer(
            model=model,
            args=_args(out),
            train_dataset=train,
            eval_dataset=train,
            compute_metrics=robust_metrics,
            callbacks=[RobustCallback(train)],
        )
        if evaluate_first:  # before fit_addons: the eval loss is the plain cross-entropy
            metrics = trainer.evaluate()
            assert metrics["eval_loss"] > 0 and 0 <= metrics["eval_worst_group_accuracy"] <= 1
        trainer.train(resume_from_checkpoint=resume)
        return model.learner.ctx.detach().clone(), model.training_state()

    straight, straight_state = run(tmp_path / "a", evaluate_first=True)
    assert set(straight_state) == {"debias.mean_true_prob", "debias.group_q", "debias.updates"}
    assert int(straight_state["debias.updates"]) == 6
    saved = tmp_path / "a" / "checkpoint-3" / TRAINING_STATE_FILE
    assert saved.is_file()  # the EMA of the group statistics at step 3, beside the Trainer's own files
    resumed, resumed_state = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    for key, value in straight_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=0, atol=0)
    # without the saved running state the resumed run restarts the EMA and no longer matches
    saved.unlink()
    _, drifted_state = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert int(drifted_state["debias.updates"]) == 3
    assert not torch.equal(drifted_state["debias.mean_true_prob"], straight_state["debias.mean_true_prob"])


def test_trainer_setup_errors_are_clear(world, tmp_path):
    backbone, train = world
    model = _model(backbone, train.classnames)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        transformers.Trainer(
            model=model,
            args=_args(tmp_path, remove_unused_columns=True),
            train_dataset=train,
            callbacks=[RobustCallback(train)],
        )
    with pytest.raises(ValueError, match="addon_start_step"):
        RobustCallback(train, addon_start_step=-1)
