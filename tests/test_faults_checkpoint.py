"""Fault tolerance of fit's checkpoints (issue 14): mismatched resumes, divergence, concurrent runs, damaged
checkpoints, SIGKILL mid-save, and evaluate on non-finite logits. Tiny in-process models, CPU, seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from prompt_robust.training import (
    DIVERGED_NAME,
    LOCK_NAME,
    CheckpointDamagedError,
    CheckpointLockedError,
    CheckpointMismatchError,
    FitConfig,
    _epoch_batches,
    _lr_at,
    _process_start_ticks,
    evaluate,
    fit,
)

torch.set_num_threads(1)

DIM = 8
TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class _Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class Labeled(Dataset):
    """x ~ N(0, I) in 8-D, label = [x . w > 0]; exposes ``labels`` (what fit fingerprints), never reads images."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(DIM, generator=torch.Generator().manual_seed(7))
        self.x = torch.randn(n, DIM, generator=gen)  # (n, DIM)
        self.labels = (self.x @ w > 0).long()  # (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.labels[i]}


class Head(nn.Module):
    """Frozen random projection + dropout (exercises the RNG) + trainable linear head."""

    def __init__(self, classnames: list[str] | None = None, crash_at: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(DIM, DIM, generator=gen) / DIM**0.5)  # (DIM, DIM)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(DIM, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, DIM, generator=gen) * 0.1)
            self.head.bias.zero_()
        if classnames is not None:
            self.classnames = classnames
        self.crash_at, self.calls = crash_at, 0

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **extra) -> _Output:
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated interruption")
        logits = self.head(self.dropout(pixel_values @ self.proj))  # (batch, 2)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return _Output(loss=loss, logits=logits)


def config(**kwargs) -> FitConfig:
    base = {"steps": 6, "batch_size": 8, "lr": 0.1, "checkpoint_every": 3, "progress": False, "log_every": 0}
    return FitConfig(**{**base, **kwargs})


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------------------ 1. mismatched resumes


def test_resume_refuses_another_dataset_lr_or_class_list_naming_the_difference(tmp_path):
    fit(Head(["cat", "dog"]), Labeled(seed=0), config(), checkpoint_dir=tmp_path)
    cases = [
        (Labeled(seed=1), config(), ["cat", "dog"], r"dataset labels: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"),
        (Labeled(n=32, seed=0), config(), ["cat", "dog"], r"dataset length: 24 -> 32"),
        (Labeled(seed=0), config(lr=0.05), ["cat", "dog"], r"FitConfig\.lr: 0\.1 -> 0\.05"),
        (Labeled(seed=0), config(seed=3), ["cat", "dog"], r"FitConfig\.seed: 0 -> 3"),
        (Labeled(seed=0), config(), ["cat", "wolf"], r"model class names: .*\(differing: dog, wolf\)"),
    ]
    for data, cfg, names, message in cases:
        with pytest.raises(CheckpointMismatchError, match=message) as info:
            fit(Head(names), data, cfg, checkpoint_dir=tmp_path)
        text = str(info.value)
        assert "checkpoint-6" in text and "another checkpoint_dir" in text and "resume=False" in text
        assert "resume='new-settings'" in text
        assert isinstance(info.value, ValueError)
    # settings that do not change the trajectory may change; the finished run is then a no-op
    model = Head(["cat", "dog"])
    again = fit(model, Labeled(seed=0), config(checkpoint_every=2, keep_checkpoints=5), checkpoint_dir=tmp_path)
    assert again.resumed_from == 6 and model.calls == 0


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path):
    fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)
    for checkpoint in tmp_path.glob("checkpoint-*"):  # as written before fingerprints existed
        state = state_of(checkpoint)
        del state["fingerprint"], state["files"]
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="carries no fingerprint"):
        result = fit(Head(), Labeled(seed=5), config(), checkpoint_dir=tmp_path)
    assert result.resumed_from == 6


@pytest.mark.parametrize(
    ("value", "message"),
    [("new_settings", r"got 'new_settings'\. Did you mean 'new-settings'\?"), (1, "got 1"), (None, "got None")],
)
def test_resume_value_is_validated(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path, resume=value)


# -------------------------------------------------------------------------------------- 2. resume="new-settings"


def test_new_settings_continue_from_the_checkpoint_and_a_rerun_is_bit_identical(tmp_path):
    data = Labeled()
    first = fit(Head(), data, config(checkpoint_every=2), checkpoint_dir=tmp_path / "base")
    new = config(steps=10, lr=0.05, checkpoint_every=2)

    shutil.copytree(tmp_path / "base", tmp_path / "straight")
    straight = Head()
    reference = fit(straight, data, new, checkpoint_dir=tmp_path / "straight", resume="new-settings")
    assert reference.resumed_from == 6 and reference.steps == 10
    assert reference.losses[:6] == first.losses
    # the schedule restarts at step 6 over the 4 remaining steps; the new settings are recorded
    state = state_of(tmp_path / "straight" / "checkpoint-8")
    assert state["schedule_start"] == 6
    assert state["scheduler"]["last_lr"] == [pytest.approx(_lr_at(1, 4, new))]
    assert state["fingerprint"]["config"]["lr"] == 0.05
    # now the old settings are the mismatch
    with pytest.raises(CheckpointMismatchError, match=r"FitConfig\.lr: 0\.05 -> 0\.1"):
        fit(Head(), data, config(checkpoint_every=2), checkpoint_dir=tmp_path / "straight")

    # interrupted after the checkpoint at step 8, then the same call again: an exact resume of the new run
    shutil.copytree(tmp_path / "base", tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        fit(Head(crash_at=3), data, new, checkpoint_dir=tmp_path / "crashed", resume="new-settings")
    torch.manual_seed(123)
    resumed_model = Head()
    resumed = fit(resumed_model, data, new, checkpoint_dir=tmp_path / "crashed", resume="new-settings")
    assert resumed.resumed_from == 8
    assert resumed.losses == reference.losses
    assert_same_weights(resumed_model, straight)


def test_new_settings_still_need_the_same_trainable_tensors(tmp_path):
    fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)
    other = Head()
    other.head = nn.Linear(DIM, 3)
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: checkpoint \(2, 8\) vs model \(3, 8\)"):
        fit(other, Labeled(), config(), checkpoint_dir=tmp_path, resume="new-settings")


# ---------------------------------------------------------------------------------------------------- 3. divergence


class Spiky(nn.Module):
    """loss = sum(w) (finite) whose gradient is each item's ``boost``: one boosted item blows ``w`` up at a
    known step. With ``overflow``, weights above 1e35 make the loss NaN (a model overflowing on huge weights)."""

    def __init__(self, overflow: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))
        self.overflow = overflow

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, boost=None) -> _Output:
        root = boost.double().mean().sqrt().float()  # the gradient root * root may overflow: inf for boost 1e70
        zero = self.w - self.w.detach()  # (4,) value 0, gradient 1
        loss = self.w.sum() + (zero * root * root - zero).sum()  # value sum(w), gradient boost
        if self.overflow and float(self.w.detach().abs().max()) > 1e35:
            loss = loss * float("nan")
        return _Output(loss=loss, logits=torch.zeros(len(pixel_values), 2))


class Boosted(Dataset):
    """8 items; the one fit visits at step ``at`` (batch 1, seed 0) has gradient ``boost``, the others 1."""

    def __init__(self, at: int, boost: float) -> None:
        self.boosted = _epoch_batches(8, 1, 0, 0)[at - 1][0]
        self.boost = boost

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        boost = self.boost if i == self.boosted else 1.0
        return {
            "pixel_values": torch.zeros(1),
            "labels": torch.tensor(0),
            "boost": torch.tensor(boost, dtype=torch.float64),
        }


@pytest.mark.parametrize(
    ("lr", "overflow", "failing_step", "message"),
    [
        (
            1e10,
            False,
            5,
            r"the update made w non-finite \(loss .*\) at step 5 .*now hold these non-finite",
        ),  # finite loss, infinite parameters
        (1e4, True, 6, r"the loss is nan at step 6 .*checkpoint-5, now marked diverged"),  # huge, then NaN
    ],
)
def test_divergence_keeps_the_last_good_checkpoint_and_a_lower_lr_resumes(
    tmp_path, lr, overflow, failing_step, message
):
    data = Boosted(at=5, boost=1e32)
    sgd = {"steps": 8, "batch_size": 1, "momentum": 0.0, "weight_decay": 0.0, "progress": False, "log_every": 0}
    diverging = FitConfig(lr=lr, checkpoint_every=1, keep_checkpoints=1, **sgd)
    with pytest.raises(FloatingPointError, match=message) as info:
        fit(Spiky(overflow), data, diverging, checkpoint_dir=tmp_path)
    assert "resume='new-settings'" in str(info.value) and "checkpoint-4" in str(info.value)
    assert not (tmp_path / LOCK_NAME).exists()  # released on the exception
    # no checkpoint holds non-finite weights, and the last good one (step 4) survived keep_checkpoints=1
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint-4" in on_disk and f"checkpoint-{failing_step}" not in on_disk
    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "trainable.safetensors")).values())
    assert (tmp_path / "checkpoint-5" / DIVERGED_NAME).is_file() == overflow

    lower = FitConfig(lr=1e-6, checkpoint_every=1, keep_checkpoints=1, **sgd)

    def skips_the_diverged_one():
        return pytest.warns(UserWarning, match=r"checkpoint-5: marked as diverged") if overflow else nullcontext()

    with skips_the_diverged_one(), pytest.raises(CheckpointMismatchError, match=r"FitConfig\.lr"):
        fit(Spiky(overflow), data, lower, checkpoint_dir=tmp_path)  # resume=True refuses the changed lr
    model = Spiky(overflow)
    with skips_the_diverged_one():
        result = fit(model, data, lower, checkpoint_dir=tmp_path, resume="new-settings")
    assert result.resumed_from == 4 and result.steps == 8
    assert torch.isfinite(model.w).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7", "checkpoint-8"]


def test_non_finite_gradients_stop_before_the_update():
    model = Spiky()
    data = Boosted(at=2, boost=1e70)  # finite loss, infinite gradient
    with pytest.raises(FloatingPointError, match=r"gradients of w are non-finite \(loss .*\) at step 2"):
        fit(model, data, FitConfig(steps=4, batch_size=1, lr=0.1, momentum=0.0, weight_decay=0.0, progress=False))
    assert torch.isfinite(model.w).all()  # the update was never applied


# ------------------------------------------------------------------------------------------------------ 4. the lock


def _write_lock(directory: Path, pid: int, start_ticks: int | None = None) -> None:
    """A lock file as fit writes it (start_ticks: the process's start in /proc, None where unknown)."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {"pid": pid, "hostname": socket.gethostname(), "started": time.time(), "start_ticks": start_ticks}
    (directory / LOCK_NAME).write_text(json.dumps(info))


def test_a_live_lock_refuses_a_second_run_naming_its_pid(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, other.pid, _process_start_ticks(other.pid))
        with pytest.raises(CheckpointLockedError, match=rf"PID {other.pid} on host .*still running") as info:
            fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)
        assert "another checkpoint_dir" in str(info.value)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == other.pid  # untouched
        assert not list(tmp_path.glob("checkpoint-*"))
    finally:
        other.kill()
        other.wait()


def test_a_fit_of_this_process_on_the_same_directory_is_refused_but_subfolders_nest(tmp_path):
    class Nesting(Head):
        def __init__(self, inner_dir: Path) -> None:
            super().__init__()
            self.inner_dir, self.inner = inner_dir, None

        def forward(self, *args, **kwargs) -> _Output:
            if self.inner is None:
                self.inner = fit(Head(), Labeled(), config(steps=2, checkpoint_every=1), checkpoint_dir=self.inner_dir)
            return super().forward(*args, **kwargs)

    with pytest.raises(CheckpointLockedError, match=rf"PID {os.getpid()} .*this very process"):
        fit(Nesting(tmp_path), Labeled(), config(), checkpoint_dir=tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()

    model = Nesting(tmp_path / "stage")  # as the refiner's stages: a subfolder per nested fit
    assert fit(model, Labeled(), config(), checkpoint_dir=tmp_path).steps == 6
    assert model.inner.steps == 2 and (tmp_path / "stage" / "checkpoint-2").is_dir()
    assert not list(tmp_path.rglob(LOCK_NAME))


@pytest.mark.parametrize("owner", ["dead", "pid reused"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, owner):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)" if owner != "dead" else "pass"])
    try:
        if owner == "dead":
            process.wait()
            _write_lock(tmp_path, process.pid)
        else:  # a live process whose start differs from the lock's: it only reuses the dead owner's PID
            ticks = _process_start_ticks(process.pid)
            if ticks is None:
                pytest.skip("no /proc here to tell a reused PID")
            _write_lock(tmp_path, process.pid, ticks - 1)
        with pytest.warns(UserWarning, match=rf"stale lock .*process {process.pid} is no longer running"):
            result = fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)
        assert result.steps == 6 and not (tmp_path / LOCK_NAME).exists()
    finally:
        process.kill()
        process.wait()


# ------------------------------------------------------------------------------------------ 5. damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _alter(path: Path) -> None:  # same size, other bytes: only the recorded SHA-256 can tell
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "reason"),
    [
        (_truncate, "trainable.safetensors", "trainable.safetensors .*SHA-256"),
        (_alter, "optimizer.safetensors", "optimizer.safetensors .*SHA-256"),
        (lambda p: p.write_text('{"step": 9, '), "trainer_state.json", "trainer_state.json is unreadable"),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, file, reason):
    data = Labeled()
    straight = Head()
    fit(straight, data, config(steps=9), checkpoint_dir=tmp_path / "straight")
    fit(Head(), data, config(steps=9), checkpoint_dir=tmp_path / "run")  # checkpoints 6 and 9 kept
    damage(tmp_path / "run" / "checkpoint-9" / file)
    model = Head()
    with pytest.warns(UserWarning, match=rf"cannot resume from checkpoint .*checkpoint-9: {reason}.*previous"):
        result = fit(model, data, config(steps=9), checkpoint_dir=tmp_path / "run")
    assert result.resumed_from == 6 and result.steps == 9
    assert_same_weights(model, straight)  # the fallback replays the same trajectory
    assert state_of(tmp_path / "run" / "checkpoint-9")["step"] == 9  # rewritten intact


def test_no_usable_checkpoint_raises_naming_every_one(tmp_path):
    fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)
    _truncate(tmp_path / "checkpoint-3" / "rng_state.safetensors")
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("not json")
    with pytest.warns(UserWarning), pytest.raises(CheckpointDamagedError, match=r"checkpoint-6: .*checkpoint-3: "):
        fit(Head(), Labeled(), config(), checkpoint_dir=tmp_path)


# ------------------------------------------------------------------------------------------ SIGKILL in a save


_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from prompt_robust import training
from test_faults_checkpoint import Head, Labeled, config

calls, real = 0, training._write_bytes


def dying(path, data):  # the 2nd file of the 3rd checkpoint: half written, then SIGKILL
    global calls
    calls += 1
    if calls == 10:
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)


training._write_bytes = dying
training.fit(Head(), Labeled(), config(steps=8, checkpoint_every=2), checkpoint_dir=sys.argv[1])
"""


def test_sigkill_in_the_middle_of_a_save_then_resume_is_bit_identical(tmp_path):
    data, cfg = Labeled(), config(steps=8, checkpoint_every=2)
    straight = Head()
    reference = fit(straight, data, cfg, checkpoint_dir=tmp_path / "straight")

    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(TESTS_DIR)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, str(script), str(run)], env=env, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # complete ones
    assert list(run.glob(".tmp-checkpoint-*")) and (run / LOCK_NAME).is_file()  # the kill's leftovers

    model = Head()
    with pytest.warns(UserWarning, match="stale lock"):
        resumed = fit(model, data, cfg, checkpoint_dir=run)
    assert resumed.resumed_from == 4 and resumed.losses == reference.losses
    assert_same_weights(model, straight)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-6", "checkpoint-8"]


# ------------------------------------------------------------------------------------------ 6. evaluate


class NaNLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values: torch.Tensor, labels=None, **extra) -> dict:
        logits = torch.zeros(len(pixel_values), 2)  # (batch, 2)
        logits[0, 1] = float("nan")
        logits[-1, 0] = float("inf")
        return {"loss": None, "logits": logits}


def test_evaluate_raises_on_non_finite_logits():
    with pytest.raises(FloatingPointError, match=r"2 of the 16 logits .* are non-finite.*lower lr"):
        evaluate(NaNLogits(), Labeled(n=20), batch_size=8)
