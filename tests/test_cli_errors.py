"""The command line answers a user's mistake with one line that names the flag to fix, and never loses a run.

Each case runs the real program (``python -m prompt_robust.cli``) in a subprocess and checks the exit status and
that stderr is exactly one line naming the problem and the flag (no traceback); the few cases that need a fault
injected (an internal error, the arguments passed on to ``fit``) call :func:`prompt_robust.cli.main` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_backbone

from prompt_robust import cli
from prompt_robust.addons.refiner.config import RefinerConfig


def _run(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "prompt_robust.cli", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=cwd,
    )


def _one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The single stderr line of a refused command, checked to name every needle."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prompt-robust"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_clip")
    backbone = make_backbone("hf")
    backbone.clip.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("wb")
    (root / "images").mkdir()
    rows = ["img_id,img_filename,y,split,place"]
    for i in range(8):
        y, place, split = i % 2, (i // 2) % 2, 0 if i < 4 else 2
        Image.new("RGB", (40, 30), (200, 40, 40) if y else (40, 40, 200)).save(root / "images" / f"{i}.png")
        rows.append(f"{i},images/{i}.png,{y},{split},{place}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1. user errors: one line, exit 2; a traceback only with --debug; internal errors exit 1 and point at --debug
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--dataset", "waterbirds", "--out", "run"], ["--dataset waterbirds", "--root"]),
        (["train", "--dataset", "coop", "--split-file", "s.json", "--out", "run"], ["--dataset coop", "--image-dir"]),
        (["eval", "--dataset", "domainbed", "--root", ".", "--adapter", "a"], ["--test-domains"]),
        (["train", "--dataset", "waterbirds", "--root", "no/such/dir", "--out", "run"], ["--root", "no/such/dir"]),
    ],
)
def test_missing_or_wrong_data_options_name_the_flag(tmp_path, argv, needles):
    _one_line_error(_run(*argv, cwd=tmp_path), *needles)


def test_debug_shows_the_traceback(tmp_path):
    result = _run("train", "--dataset", "waterbirds", "--out", "run", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "--root" in result.stderr


def test_an_internal_error_points_at_debug(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(cli, "_demo", broken)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "an invariant broke" in err[0] and "--debug" in err[0]
    with pytest.raises(RuntimeError, match="an invariant broke"):
        cli.main(["demo", "--debug"])


def test_a_bad_json_setting_is_one_line(tmp_path):
    argv = ["bench", "--out", "b", "--debias-config", '{"attribute_value": ["land", "water"]}']
    _one_line_error(
        _run(*argv, cwd=tmp_path), "--debias-config", "'attribute_value'", "Did you mean 'attribute_values'"
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. global flags before or after the command; -q silences every progress bar
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["-q", "demo"], ["demo", "-q"], ["demo", "--quiet", "--debug", "-v"]])
def test_global_flags_go_before_or_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.quiet is True and args.command == "demo"
    assert args.debug is ("--debug" in argv) and args.verbose is ("-v" in argv)


def test_global_flags_default_off():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.quiet, args.verbose, args.debug) == (False, False, False)


def test_quiet_after_the_command_is_accepted(tmp_path):
    # refused for the missing --root, not for --quiet or -v after the command
    _one_line_error(_run("train", "--dataset", "waterbirds", "--out", "o", "--quiet", "-v", cwd=tmp_path), "--root")


# ---------------------------------------------------------------------------------------------------------------
# 3. no prefix abbreviations; the refiner's options are --refiner-<field>; typos get the closest flags
# ---------------------------------------------------------------------------------------------------------------
def test_method_is_not_taken_for_the_refiner_solver(tmp_path):
    line = _one_line_error(_run("bench", "--method", "coop", cwd=tmp_path), "--method", "--methods")
    assert "ODE" not in line and "--refiner-method" in line


def test_abbreviations_are_refused(tmp_path):
    _one_line_error(_run("bench", "--meth", "coop", cwd=tmp_path), "--meth", "--methods")


def test_the_refiner_solver_is_refiner_method(tmp_path):
    _one_line_error(_run("bench", "--refiner-method", "coop", cwd=tmp_path), "unknown ODE method 'coop'", "rk4")


def test_refiner_options_keep_their_unambiguous_spellings():
    parser = cli.build_parser()
    for command in ("bench", "train"):
        common = ["--dataset", "waterbirds", "--out", "o"] if command == "train" else []
        args = parser.parse_args([command, *common, "--train-steps", "3", "--refiner-num-steps", "2"])
        assert cli._set_fields(RefinerConfig, args) == {"train_steps": 3, "num_steps": 2}
        with pytest.raises(SystemExit):
            parser.parse_args([command, *common, "--targets", "group"])  # reads like the benchmark's targets


# ---------------------------------------------------------------------------------------------------------------
# 4-5. train (-q after the command, on every run): --overwrite starts afresh (the old run moved aside), flags named in CLI words, eval --no-strict-backbone
# ---------------------------------------------------------------------------------------------------------------
def _train_argv(waterbirds, backbone_dir, out, *extra):
    return [
        "train", "--dataset", "waterbirds", "--root", str(waterbirds), "--backbone", str(backbone_dir),
        "--out", str(out), "--steps", "2", "--batch-size", "2", "-q", *extra,
    ]  # fmt: skip


def test_train_overwrite_moves_the_old_run_aside(tmp_path, waterbirds, backbone_dir):
    out = tmp_path / "run"
    refiner = ["--addons", "refiner", "--train-steps", "2", "--inner-steps", "1", "--hidden-dim", "16", "--heads", "2"]
    first = _run(*_train_argv(waterbirds, backbone_dir, out, "--k", "1", *refiner))
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""  # -q after the command: no progress bar from fit, the refiner's targets or stages
    old_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # a finished run is not silently resumed or replaced
    again = _run(*_train_argv(waterbirds, backbone_dir, out, "--k", "1"))
    _one_line_error(again, "already holds", "--overwrite", "--resume-new-settings")

    # --overwrite with other settings trains from scratch; the previous run is moved, never deleted
    second = _run(*_train_argv(waterbirds, backbone_dir, out, "--k", "2", "--lr", "0.01", "--overwrite"))
    assert second.returncode == 0, second.stderr
    replaced = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(replaced) == 1 and replaced[0].name[len("replaced-") :].count("-") == 1
    assert {p.name for p in replaced[0].iterdir()} >= {"adapter", "cache", "split.json"}
    assert (replaced[0] / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter
    assert json.loads((replaced[0] / "split.json").read_text())["k"] == 1
    assert json.loads((out / "split.json").read_text())["k"] == 2
    assert str(replaced[0]) in second.stdout and "trained coop for 2 steps" in second.stdout
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["robust_config"]["refiner"] is None  # the new run's settings, not the old run's weights


def test_train_refuses_another_split_of_an_unfinished_run(tmp_path, waterbirds, backbone_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.json").write_text(json.dumps({"indices": [0, 1], "k": 1, "seed": 1, "n_total": 4}))
    result = _run(*_train_argv(waterbirds, backbone_dir, out, "--k", "2"))
    _one_line_error(result, "split.json", "--overwrite", "--resume-new-settings")
    assert json.loads((out / "split.json").read_text())["k"] == 1


def test_overwrite_and_resume_new_settings_exclude_each_other(tmp_path):
    argv = ["train", "--dataset", "waterbirds", "--root", ".", "--out", "o", "--overwrite", "--resume-new-settings"]
    _one_line_error(_run(*argv, cwd=tmp_path), "--overwrite", "--resume-new-settings")


@pytest.mark.parametrize("flag, resume", [([], True), (["--resume-new-settings"], "new-settings")])
def test_resume_new_settings_reaches_fit(monkeypatch, capsys, tmp_path, waterbirds, flag, resume):
    import prompt_robust.training as training

    seen = {}

    def fake_fit(model, data, config, **kwargs):
        seen.update(kwargs, progress=config.progress)
        raise ValueError("the checkpoint was made with other settings\n(lr 0.002, now 0.01)")

    monkeypatch.setattr(training, "fit", fake_fit)
    argv = ["train", "--dataset", "waterbirds", "--root", str(waterbirds), "--out", str(tmp_path / "o"), "-q"]
    assert cli.main([*argv, *flag]) == 2
    assert seen.get("resume") == resume and seen["progress"] is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prompt-robust: error: the checkpoint was made with other settings (lr 0.002, now 0.01)"]


def test_a_mismatched_resume_is_one_line(tmp_path, waterbirds, backbone_dir):
    import prompt_robust.training as training

    if not hasattr(training, "CheckpointMismatchError"):
        pytest.skip("fit does not check a resumed run's settings yet")
    out = tmp_path / "run"
    first = _run(*_train_argv(waterbirds, backbone_dir, out, "--checkpoint-every", "1"))
    assert first.returncode == 0, first.stderr
    (out / "adapter" / "adapter_config.json").unlink()  # as if interrupted before the adapter was saved
    result = _run(*_train_argv(waterbirds, backbone_dir, out, "--checkpoint-every", "1", "--lr", "0.5"))
    line = _one_line_error(result, "--overwrite")
    assert "resume=" not in line and "overwrite=" not in line


def test_eval_names_no_strict_backbone(tmp_path, waterbirds, backbone_dir):
    from prompt_robust import build_learner, wrap
    from prompt_robust.backbones import load_backbone

    out = tmp_path / "run"
    wrap(build_learner("coop", load_backbone(str(backbone_dir)), ["landbird", "waterbird"])).save_pretrained(
        out / "adapter"
    )
    other = tmp_path / "other_clip"
    backbone = make_backbone("hf", seed=1)
    backbone.clip.save_pretrained(other)
    backbone.tokenizer.save_pretrained(other)
    common = ["eval", "-q", "--dataset", "waterbirds", "--root", str(waterbirds), "--adapter", str(out / "adapter")]
    line = _one_line_error(_run(*common, "--backbone", str(other)), "--no-strict-backbone")
    assert "strict_backbone=" not in line
    result = _run(*common, "--backbone", str(other), "--no-strict-backbone")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test"]["n"] == 4


# ---------------------------------------------------------------------------------------------------------------
# 6. bench: results of other settings are not replaced without --overwrite, which moves them aside
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_benchmark(monkeypatch):
    """run_benchmark replaced by a stand-in that returns fixed results (the protocol itself is tested elsewhere)."""
    from prompt_robust.bench import runner

    calls = []

    def fake_run(backbone, config, out_dir, *, progress=True, on_result=None):
        calls.append(config)
        return {"coop": {1: {"base_to_new": {"base": 0.5, "new": 0.4, "hm": 0.44}}}}

    monkeypatch.setattr(runner, "run_benchmark", fake_run)
    return calls


def test_bench_keeps_results_of_other_settings(tmp_path, backbone_dir, fake_benchmark, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "-q", "--out", str(out), "--backbone", str(backbone_dir), "--methods", "coop", "--seeds", "1"]
    assert cli.main([*argv, "--steps", "2"]) == 0
    report = (out / "report.md").read_text()
    # the same settings again: fine (a rerun resumes and rewrites the same results)
    assert cli.main([*argv, "--steps", "2"]) == 0 and len(fake_benchmark) == 2
    capsys.readouterr()
    # other settings: refused before anything runs, naming what differs and the flag
    assert cli.main([*argv, "--steps", "3"]) == 2 and len(fake_benchmark) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps" in err[0] and "--overwrite" in err[0]
    (out / "runs").mkdir()
    (out / "runs" / "coop_seed1.json").write_text("{}")
    assert cli.main([*argv, "--steps", "3", "--overwrite"]) == 0
    replaced = next(p for p in out.iterdir() if p.name.startswith("replaced-"))
    assert (replaced / "report.md").read_text() == report and (replaced / "runs" / "coop_seed1.json").is_file()
    assert json.loads((out / "results_seeds.json").read_text())["settings"]["steps"] == 3
    assert str(replaced) in capsys.readouterr().out


def test_bench_refuses_over_a_finished_run_in_a_subprocess(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results_seeds.json").write_text(json.dumps({"settings": {"steps": 1}}))
    (out / "report.md").write_text("# an earlier run\n")
    result = _run("bench", "-q", "--out", str(out), "--steps", "2", "--seeds", "1")
    _one_line_error(result, str(out), "--overwrite")
    assert (out / "report.md").read_text() == "# an earlier run\n"


def test_a_suite_without_resume_refuses_its_earlier_output(tmp_path, capsys):
    out = tmp_path / "icm"
    out.mkdir()
    (out / "icm.json").write_text("{}")
    assert cli.main(["bench", "--suite", "icm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "icm.json" in err and "--overwrite" in err
