"""Adapter files under faults: interrupted and concurrent saves, non-finite weights, hostile or damaged configs,
orphaned temporary files (issue 14). Each case names what ``docs/adapters.md`` ("Guarantees") promises."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import prompt_robust as pr
from prompt_robust import _io
from prompt_robust.addons.refiner.config import RefinerConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
OLD = (("cat", "dog"), 1.0)  # (class names, value of every context entry)
NEW = (("ant", "bee"), 2.0)


class _Killed(BaseException):
    """Stands for an abrupt end of the process (not an Exception, so no ``except Exception`` swallows it)."""


def _model(bb, pair: tuple[tuple[str, ...], float]) -> pr.RobustPromptModel:
    classnames, value = pair
    model = pr.wrap(pr.build_learner("coop", bb, list(classnames), n_ctx=2))
    with torch.no_grad():
        model.learner.ctx.fill_(value)
    return model


def _loaded_pair(directory: Path, bb) -> tuple[tuple[str, ...], float]:
    """The (class names, context value) an adapter folder loads as; a mixture of two saves fails the check."""
    model = pr.RobustPromptModel.from_pretrained(directory, backbone=bb)
    ctx = model.learner.ctx.detach()
    value = float(ctx.flatten()[0])
    assert torch.equal(ctx, torch.full_like(ctx, value)), "the weights are not one save's"
    return tuple(model.learner.classnames), value


def _edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


@pytest.fixture
def saved(bb, tmp_path) -> Path:
    """A folder holding the OLD adapter."""
    _model(bb, OLD).save_pretrained(tmp_path / "a")
    return tmp_path / "a"


# -- 1. the pair is one unit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("crash_at", [1, 2])
def test_crash_between_the_file_renames_never_loads_a_mixture(bb, saved, monkeypatch, crash_at):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == crash_at:
            raise _Killed(f"killed before renaming into {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(_Killed):
        _model(bb, NEW).save_pretrained(saved, overwrite=True)
    monkeypatch.setattr(_io.os, "replace", real_replace)
    try:
        loaded = _loaded_pair(saved, bb)
    except ValueError as err:  # the only other allowed outcome: a clear error
        assert "interrupted" in str(err) and "save" in str(err)
    else:
        assert loaded in (OLD, NEW), f"loaded a mixture of two saves: {loaded}"


_KILL_CHILD = """
import os, signal, sys
import torch
import prompt_robust as pr
from prompt_robust import _io
from prompt_robust.backbones.tiny import tiny_clip_backbone

real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
_io.os.replace = replace
bb = tiny_clip_backbone(seed=0, context_length=32, initializer_factor=3.0)
model = pr.wrap(pr.build_learner("coop", bb, ["ant", "bee"], n_ctx=2))
with torch.no_grad():
    model.learner.ctx.fill_(2.0)
model.save_pretrained(sys.argv[1], overwrite=True)
"""


def test_sigkill_between_the_file_renames_loads_one_save_and_the_next_save_cleans_up(bb, saved):
    """A real SIGKILL (no cleanup code runs) after the first of the two renames of a save."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(saved), "2"], env=env, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    orphans = _temps(saved)
    assert orphans, "the killed save left no temporary file (was it killed at all?)"
    assert _loaded_pair(saved, bb) in (OLD, NEW)
    # the next save into the folder removes what the dead writer left
    _model(bb, OLD).save_pretrained(saved, overwrite=True)
    assert _temps(saved) == []
    assert _loaded_pair(saved, bb) == OLD


def test_concurrent_reader_sees_one_save_or_a_clear_error(bb, saved):
    models = [_model(bb, OLD), _model(bb, NEW)]
    done = threading.Event()
    writer_errors: list[BaseException] = []

    def write() -> None:
        i = 0
        try:
            while not done.is_set() and i < 2000:
                models[i % 2].save_pretrained(saved, overwrite=True)
                i += 1
        except BaseException as err:  # reported by the test below
            writer_errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    loaded, refused = [], []
    try:
        for _ in range(25):
            try:
                loaded.append(_loaded_pair(saved, bb))
            except ValueError as err:
                refused.append(str(err))
    finally:
        done.set()
        thread.join()
    assert not writer_errors, writer_errors
    assert all(pair in (OLD, NEW) for pair in loaded), f"mixtures loaded: {set(loaded) - {OLD, NEW}}"
    assert all("concurrent" in message or "interrupted" in message for message in refused), refused
    assert len(loaded) >= 5, f"too few loads succeeded while saving: {refused[:3]}"


def test_two_concurrent_writers_leave_one_complete_adapter(bb, saved, monkeypatch):
    """Writer B runs its whole save while writer A sits between its two renames (as long as B is allowed to)."""
    real_replace = os.replace
    between, b_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def replace(src, dst):
        real_replace(src, dst)
        if threading.current_thread().name == "A" and not between.is_set():
            between.set()
            b_done.wait(timeout=0.5)  # B finishes in the meantime unless saves take turns

    def write(model, done: threading.Event | None = None) -> None:
        try:
            model.save_pretrained(saved, overwrite=True)
        except BaseException as err:
            errors.append(err)
        finally:
            if done is not None:
                done.set()

    monkeypatch.setattr(_io.os, "replace", replace)
    a = threading.Thread(target=write, args=(_model(bb, OLD),), name="A")
    b = threading.Thread(target=write, args=(_model(bb, NEW), b_done), name="B")
    a.start()
    assert between.wait(timeout=30)
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    assert _loaded_pair(saved, bb) in (OLD, NEW)
    assert _temps(saved) == []


def test_weights_from_another_save_are_refused_with_the_fix(bb, saved, tmp_path):
    _model(bb, NEW).save_pretrained(tmp_path / "other")
    (saved / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*does not belong to.*save_pretrained"):
        pr.RobustPromptModel.from_pretrained(saved, backbone=bb)


def test_an_adapter_without_the_weights_record_still_loads(bb, saved):
    """Adapters saved before the record existed (format_version 1 without "weights") load as before."""
    _edit_config(saved, lambda config: config.pop("weights", None))
    assert _loaded_pair(saved, bb) == OLD


def test_the_weights_record_names_the_weights_bytes(saved):
    record = json.loads((saved / CONFIG).read_text())["weights"]
    data = (saved / WEIGHTS).read_bytes()
    assert record == {"file": WEIGHTS, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# -- 2. non-finite values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load(bb, saved, bad):
    tensors = load_file(str(saved / WEIGHTS))
    tensors["learner.ctx"][0, 3] = bad
    save_file(tensors, str(saved / WEIGHTS))
    _edit_config(saved, lambda config: config.pop("weights", None))  # as an older save would be
    with pytest.raises(ValueError, match=r"'learner\.ctx'.*adapter_model\.safetensors.*non-finite.*learning rate"):
        pr.RobustPromptModel.from_pretrained(saved, backbone=bb)
    model = _model(bb, OLD)
    with pytest.raises(ValueError, match=r"'learner\.ctx'.*non-finite"):
        model.load_adapter_weights(saved / WEIGHTS)
    assert torch.equal(model.learner.ctx, torch.full_like(model.learner.ctx, 1.0))  # left unchanged


def test_non_finite_weights_are_refused_on_save(bb, tmp_path):
    model = _model(bb, OLD)
    with torch.no_grad():
        model.learner.ctx[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'learner\.ctx'.*1 non-finite.*learning rate"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / WEIGHTS).exists() and not (tmp_path / "a" / CONFIG).exists()


# -- 3. sizes from an untrusted config are bounded before anything is allocated ------------------------------------
def _set(path: str, value):
    """An edit of the config setting the dotted ``path`` (missing or null parents become objects)."""

    def edit(config: dict) -> None:
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("learner.config.n_ctx", 10**7, r"n_ctx=10000000.*context length 32"),
        ("robust_config.refiner.layers", 10**6, r"refiner\.layers=1000000.*at most"),
        ("robust_config.refiner.hidden_dim", 10**7, r"refiner\.hidden_dim=10000000.*at most"),
        ("robust_config.counterfactual.hidden_dim", 10**8, r"counterfactual\.hidden_dim=100000000.*at most"),
        ("robust_config.counterfactual.depth", 10**6, r"counterfactual\.depth=1000000.*at most"),
        ("learner.classnames", [f"c{i}" for i in range(300_000)], r"300000 class names.*at most 100000"),
        ("learner.classnames", ["cat", "x" * 100_000], r"class name 1 has 100000 characters.*at most"),
    ],
)
def test_sizes_from_the_config_are_bounded_before_allocation(bb, saved, path, value, message):
    _edit_config(saved, _set(path, value))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as info:
        pr.RobustPromptModel.from_pretrained(saved, backbone=bb)
    assert time.perf_counter() - start < 1.0
    assert CONFIG in str(info.value)


def test_vpt_sizes_are_bounded(bb, tmp_path):
    pr.wrap(pr.build_learner("vpt", bb, ["cat", "dog"], n_tokens=2, deep=True)).save_pretrained(tmp_path / "v")
    for path, value, message in [
        ("learner.config.n_tokens", 10**8, r"n_tokens=100000000.*at most"),
        ("learner.config.depth", 10**6, r"depth=1000000.*2 vision layers"),
    ]:
        _edit_config(tmp_path / "v", _set(path, value))
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            pr.RobustPromptModel.from_pretrained(tmp_path / "v", backbone=bb)
        assert time.perf_counter() - start < 1.0
        _edit_config(tmp_path / "v", _set(path, 2 if path.endswith("n_tokens") else None))


def test_a_legitimate_refiner_adapter_still_loads(bb, tmp_path):
    learner = pr.build_learner("coop", bb, ["cat", "dog"], n_ctx=2)
    model = pr.wrap(learner, pr.RobustConfig(refiner=RefinerConfig(hidden_dim=64, layers=2, heads=4)))
    model.save_pretrained(tmp_path / "r")
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "r", backbone=bb)
    torch.testing.assert_close(loaded.trainable_state_dict(), model.trainable_state_dict())


# -- 4. malformed configs: ValueError naming the file, the problem and the fix -------------------------------------
def _deep(depth: int) -> str:
    return '{"library": "prompt_robust", "x": ' + "[" * depth + "]" * depth + "}"


MALFORMED = {
    "top-level list": ("[1, 2, 3]", r"must be a JSON object.*got a list"),
    "version is a number": (_set("prompt_robust_version", 123), r"prompt_robust_version.*must be a string.*123"),
    "format is a string": (_set("format_version", "1"), r"format_version.*must be an integer"),
    "learner missing": (lambda c: c.pop("learner"), r"has no 'learner' entry.*save_pretrained"),
    "learner is a string": (_set("learner", "coop"), r"'learner' must be a JSON object"),
    "learner type missing": (lambda c: c["learner"].pop("type"), r"learner\.type"),
    "classnames not a list": (_set("learner.classnames", "cat"), r"learner\.classnames must be a list of strings"),
    "n_ctx is a string": (_set("learner.config.n_ctx", "abc"), r"n_ctx must be an int.*'abc'"),
    "layers is a float": (_set("robust_config.refiner.layers", 1e6), r"layers must be an int.*1000000\.0"),
    "robust_config a list": (_set("robust_config", []), r"robust_config must be a JSON object"),
    "refiner a number": (_set("robust_config.refiner", 5), r"refiner must be a JSON object.*or null"),
    "backbone a string": (_set("backbone", "clip"), r"'backbone' must be a JSON object or null"),
    "weights record damaged": (_set("weights", {"sha256": 5}), r"'weights' record"),
    "deeply nested": (_deep(100_000), r"nested"),
    "nested below the recursion limit": (_deep(200), r"nested deeper than"),
    "not UTF-8": (b'{"library": "prompt_robust\xff\xfe"}', r"not UTF-8"),
    "oversized": (b'{"pad": "' + b" " * (17 << 20) + b'"}', r"MiB.*at most"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_configs_raise_a_value_error_naming_the_file(bb, saved, case):
    content, message = MALFORMED[case]
    path = saved / CONFIG
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        _edit_config(saved, content)
    with pytest.raises(ValueError, match=message) as info:
        pr.RobustPromptModel.from_pretrained(saved, backbone=bb)
    assert str(path) in str(info.value)


# -- 5. orphaned temporary files ------------------------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_later_saves_remove_stale_temps_and_keep_live_ones(bb, saved):
    host = _io.HOST_TAG
    dead = saved / f".{WEIGHTS}.{_dead_pid()}-{host}.abcd1234.tmp"
    live = saved / f".{WEIGHTS}.{os.getpid()}-{host}.efgh5678.tmp"  # a concurrent writer of this process
    legacy_old = saved / f".{CONFIG}.k2j4h5g6.tmp"  # an older version's name, without a pid: removed when old
    legacy_new = saved / f".{CONFIG}.q1w2e3r4.tmp"
    not_ours = saved / f".{WEIGHTS}.my-notes.tmp"  # not the library's pattern: never touched
    for path in (dead, live, legacy_old, legacy_new, not_ours):
        path.write_bytes(b"x" * 1000)
    hour_ago = time.time() - 3600
    os.utime(legacy_old, (hour_ago, hour_ago))
    _model(bb, NEW).save_pretrained(saved, overwrite=True)
    assert not dead.exists() and not legacy_old.exists()
    assert live.exists() and legacy_new.exists() and not_ours.exists()
    assert _loaded_pair(saved, bb) == NEW
