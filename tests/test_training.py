"""fit/evaluate against ground truth: a frozen random backbone + trainable linear head on a separable task."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from prompt_robust.eval import accuracy, accuracy_gap, harmonic_mean, per_group_accuracy, worst_group_accuracy
from prompt_robust.training import CheckpointMismatchError, FitConfig, FitResult, _lr_at, evaluate, fit

torch.set_num_threads(1)

DIM = 16


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyClassifier(nn.Module):
    """Frozen random orthogonal 'backbone' + dropout + trainable linear head (zero-initialised: predicts class 0)."""

    def __init__(self, n_classes: int = 2, seed: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.backbone = nn.Linear(DIM, DIM)
        with torch.no_grad():
            # a random rotation: keeps the task linearly separable and well conditioned
            self.backbone.weight.copy_(torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))[0])
            self.backbone.bias.zero_()
        self.backbone.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(DIM, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.seen_extra: list[str] = []
        self.calls = 0

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **extra) -> _Output:
        self.calls += 1
        self.seen_extra = sorted(extra)
        feats = self.dropout(self.backbone(pixel_values))  # (batch, DIM)
        logits = self.head(feats)  # (batch, n_classes)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return _Output(loss=loss, logits=logits)


class CrashingClassifier(TinyClassifier):
    """Simulates an interrupted run: raises inside forward on call number ``crash_at``."""

    def __init__(self, crash_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def forward(self, *args, **kwargs) -> _Output:
        if self.calls + 1 == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().forward(*args, **kwargs)


class NaNClassifier(TinyClassifier):
    def forward(self, *args, **kwargs) -> _Output:
        out = super().forward(*args, **kwargs)
        if self.calls == 3:
            out.loss = out.loss * float("nan")
        return out


class Separable(Dataset):
    """x ~ N(0, I) in 16-D, label = [x . w > 0]; group = label * 2 + [x_0 > 0] (4 groups)."""

    def __init__(self, n: int, seed: int, as_tuple: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(DIM, generator=torch.Generator().manual_seed(123))
        self.x = torch.randn(n, DIM, generator=gen)  # (n, DIM)
        self.y = (self.x @ w > 0).long()  # (n,)
        self.g = self.y * 2 + (self.x[:, 0] > 0).long()  # (n,)
        self.as_tuple = as_tuple

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.as_tuple:
            return self.x[i], int(self.y[i])
        return {"pixel_values": self.x[i], "labels": self.y[i], "groups": self.g[i]}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ---------------------------------------------------------------------------------------------------------------- fit


def test_fit_learns_separable_task_from_chance():
    train, test = Separable(256, seed=1), Separable(512, seed=2)
    model = TinyClassifier()
    before = evaluate(model, test)
    assert before["n"] == 512
    assert before["accuracy"] == pytest.approx((test.y == 0).float().mean().item())  # zero head: always class 0
    assert 0.35 < before["accuracy"] < 0.65

    config = FitConfig(steps=120, batch_size=32, lr=0.1, optimizer="sgd", warmup_steps=5, progress=False)
    result = fit(model, train, config)
    assert isinstance(result, FitResult)
    assert result.steps == 120 and len(result.losses) == 120 and result.resumed_from is None
    assert result.final_loss == result.losses[-1]
    assert sum(result.losses[-10:]) / 10 < 0.5 * sum(result.losses[:10]) / 10
    after = evaluate(model, test)
    assert after["accuracy"] > 0.9
    assert not any(p.grad is not None for p in model.backbone.parameters())  # frozen stays frozen


def test_fit_adamw_tuple_items_and_epochs():
    train = Separable(128, seed=3, as_tuple=True)
    model = TinyClassifier(dropout=0.0)
    result = fit(
        model, train, FitConfig(epochs=6, batch_size=16, lr=0.05, optimizer="adamw", grad_clip=1.0, progress=False)
    )
    assert result.steps == 6 * 8
    assert evaluate(model, Separable(256, seed=4))["accuracy"] > 0.85


def test_extra_keys_reach_forward_and_mode_is_restored():
    model = TinyClassifier()
    model.eval()
    fit(model, Separable(8, seed=0), FitConfig(steps=1, batch_size=4, progress=False))
    assert model.seen_extra == ["groups"]
    assert not model.training  # fit restores eval mode
    model.train()
    evaluate(model, Separable(8, seed=0))
    assert model.training  # evaluate restores train mode


def test_lr_schedule_linear_warmup_then_cosine_to_zero():
    config = FitConfig(steps=10, lr=1.0, warmup_steps=2)
    lrs = [_lr_at(s, 10, config) for s in range(10)]
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[6] == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert _lr_at(10, 10, config) == pytest.approx(0.0)
    constant = FitConfig(steps=10, lr=1.0, warmup_steps=3, warmup="constant", warmup_lr=1e-5)
    assert [_lr_at(s, 10, constant) for s in range(3)] == [1e-5] * 3


# ------------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("crash_at", [7, 11])  # latest checkpoint: step 4 (mid epoch 0) / step 8 (mid epoch 1)
def test_resumed_run_is_identical_to_uninterrupted(tmp_path, optimizer, crash_at):
    # 40 examples / batch 8 = 5 steps per epoch: 12 steps cross two epoch boundaries; dropout exercises the RNG
    data = Separable(40, seed=5)
    config = FitConfig(
        steps=12, batch_size=8, lr=0.1, optimizer=optimizer, warmup_steps=2, checkpoint_every=4, progress=False
    )

    straight = TinyClassifier()
    reference = fit(straight, data, config, checkpoint_dir=tmp_path / "straight")

    crashing = CrashingClassifier(crash_at=crash_at)
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, data, config, checkpoint_dir=tmp_path / "resumed")
    expected_start = 4 * ((crash_at - 1) // 4)
    torch.manual_seed(999)  # the resume must not depend on the global RNG state at call time
    resumed_model = TinyClassifier()
    resumed = fit(resumed_model, data, config, checkpoint_dir=tmp_path / "resumed")

    assert resumed.resumed_from == expected_start
    assert resumed.steps == 12
    assert resumed.losses == reference.losses  # per-step losses, including the restored history
    for name, value in _params(straight).items():
        assert torch.equal(value, _params(resumed_model)[name]), name

    # only the last two checkpoints remain (12 is the final step), no temp dirs, files as documented
    for run in ("straight", "resumed"):
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["checkpoint-12", "checkpoint-8"]
    ckpt = tmp_path / "resumed" / "checkpoint-12"
    assert sorted(load_file(str(ckpt / "trainable.safetensors"))) == ["head.bias", "head.weight"]
    opt_keys = load_file(str(ckpt / "optimizer.safetensors"))
    assert "state.0.momentum_buffer" in opt_keys if optimizer == "sgd" else "state.0.exp_avg" in opt_keys
    assert load_file(str(ckpt / "rng_state.safetensors"))["torch_cpu"].dtype == torch.uint8
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["scheduler"]["step"] == 12 and state["epoch"] == 2


def test_resume_when_already_finished_is_a_no_op(tmp_path):
    data = Separable(16, seed=0)
    config = FitConfig(steps=4, batch_size=8, checkpoint_every=2, progress=False)
    first = fit(TinyClassifier(), data, config, checkpoint_dir=tmp_path)
    model = TinyClassifier()
    again = fit(model, data, config, checkpoint_dir=tmp_path)
    assert model.calls == 0 and again.steps == 4 and again.losses == first.losses


def test_resume_skips_incomplete_checkpoints_and_refuses_changed_config(tmp_path, caplog):
    data = Separable(16, seed=0)
    config = FitConfig(steps=4, batch_size=8, checkpoint_every=2, progress=False)
    fit(TinyClassifier(), data, config, checkpoint_dir=tmp_path)
    (tmp_path / "checkpoint-99").mkdir()  # a half-written checkpoint: no files
    (tmp_path / "checkpoint-99" / "trainable.safetensors").write_bytes(b"")
    (tmp_path / ".tmp-checkpoint-abc").mkdir()  # left by a run killed while saving
    longer = FitConfig(steps=6, batch_size=8, progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"FitConfig\.steps: 4 -> 6"):
        fit(TinyClassifier(), data, longer, checkpoint_dir=tmp_path)
    result = fit(TinyClassifier(), data, longer, checkpoint_dir=tmp_path, resume="new-settings")
    assert result.resumed_from == 4 and result.steps == 6
    assert "ignoring incomplete checkpoint" in caplog.text
    assert not (tmp_path / ".tmp-checkpoint-abc").exists()


def test_checkpoint_of_another_model_raises(tmp_path):
    data = Separable(16, seed=0)
    config = FitConfig(steps=2, batch_size=8, checkpoint_every=2, progress=False)
    fit(TinyClassifier(n_classes=2), data, config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(2, 16\) vs model \(3, 16\)"):
        fit(TinyClassifier(n_classes=3), data, config, checkpoint_dir=tmp_path)

    other = TinyClassifier()
    other.backbone.requires_grad_(True)  # more trainable tensors than were saved
    with pytest.raises(ValueError, match=r"not in the checkpoint: backbone\.weight, backbone\.bias"):
        fit(other, data, config, checkpoint_dir=tmp_path)


def test_resume_false_refuses_a_directory_with_checkpoints(tmp_path):
    data = Separable(16, seed=0)
    config = FitConfig(steps=2, batch_size=8, checkpoint_every=1, progress=False)
    fit(TinyClassifier(), data, config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        fit(TinyClassifier(), data, config, checkpoint_dir=tmp_path, resume=False)


def test_nan_loss_raises_naming_the_step():
    with pytest.raises(FloatingPointError, match=r"step 3 .*Lower lr"):
        fit(NaNClassifier(), Separable(32, seed=0), FitConfig(steps=5, batch_size=8, progress=False))


def test_no_trainable_parameters_raises():
    model = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, Separable(8, seed=0), FitConfig(steps=1, progress=False))


def test_checkpoint_every_without_directory_raises():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(TinyClassifier(), Separable(8, seed=0), FitConfig(steps=2, checkpoint_every=1, progress=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adam"}, r"unknown optimizer 'adam'.*Did you mean 'adamw'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 5, "warmup_steps": 5}, "warmup_steps"),
        ({"warmup": "cosine"}, "unknown warm-up kind"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_fit_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(**kwargs)


def test_fit_config_round_trip():
    config = FitConfig(steps=10, optimizer="adamw", grad_clip=1.0, checkpoint_every=5)
    assert FitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ----------------------------------------------------------------------------------------------------------- evaluate


class _FixedPredictor(nn.Module):
    """Predicts the class stored in pixel_values[:, 0] (logits one-hot over 2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values: torch.Tensor, labels=None, **extra) -> dict:
        logits = nn.functional.one_hot(pixel_values[:, 0].long(), 2).float()  # (batch, 2)
        return {"loss": None, "logits": logits}


class _ListDataset(Dataset):
    def __init__(self, preds, labels, groups) -> None:
        self.items = [
            {"pixel_values": torch.tensor([float(p)]), "labels": y, "groups": g}
            for p, y, g in zip(preds, labels, groups, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_evaluate_group_metrics_match_hand_computed():
    preds = [0, 1, 1, 0, 1, 0, 0, 1]
    labels = [0, 1, 0, 0, 1, 1, 0, 1]
    groups = [0, 0, 1, 1, 2, 2, 2, 2]
    # correct: 1 1 0 1 1 0 1 1 -> 6/8; group 0: 2/2, group 1: 1/2, group 2: 3/4
    out = evaluate(_FixedPredictor(), _ListDataset(preds, labels, groups), batch_size=3, groups_key="groups")
    assert out["accuracy"] == 0.75 and out["n"] == 8
    assert out["per_group"] == {0: 1.0, 1: 0.5, 2: 0.75}
    assert out["worst_group"] == 0.5
    assert out["gap"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="groups_key='domain'"):
        evaluate(_FixedPredictor(), _ListDataset(preds, labels, groups), groups_key="domain")


# ------------------------------------------------------------------------------------------------------------ metrics


def test_metrics_match_hand_computed_values():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy(torch.tensor([2, 2, 2]), torch.tensor([2, 1, 0])) == pytest.approx(1 / 3)
    per_group = per_group_accuracy([0, 1, 1, 0, 1], [0, 1, 0, 0, 0], groups=[1, 1, 0, 0, 0])
    assert per_group == {0: pytest.approx(1 / 3), 1: 1.0}
    assert worst_group_accuracy(per_group) == pytest.approx(1 / 3)
    assert accuracy_gap(0.6, 1 / 3) == pytest.approx(0.6 - 1 / 3)
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 0.0) == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="differ in length: 2 vs 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="1-D"):
        accuracy(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least one group"):
        worst_group_accuracy({})
