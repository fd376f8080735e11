"""The CLI's thread policy (``--threads``): small models on one thread, the user's settings kept."""

from __future__ import annotations

import pytest
import torch

from prompt_robust import cli


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("setting", "small", "environ", "expected"),
    [
        ("auto", True, {}, 1),
        (None, True, {}, 1),
        ("auto", False, {}, min(cli._available_cores(), 8)),
        ("auto", False, {"OMP_NUM_THREADS": "3"}, None),  # the user's environment is kept
        ("auto", True, {"OMP_NUM_THREADS": "3"}, None),
        (None, True, {"PROMPT_ROBUST_THREADS": "5"}, 5),
        ("2", True, {"OMP_NUM_THREADS": "3"}, 2),  # an explicit --threads wins
        (" AUTO ", True, {}, 1),
    ],
)
def test_thread_count_policy(setting, small, environ, expected):
    assert cli.thread_count(setting, small_model=small, environ=environ) == expected


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_thread_count_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match=r"--threads must be 'auto' or a whole number >= 1"):
        cli.thread_count(bad, small_model=True, environ={})


@pytest.mark.parametrize(
    ("argv", "expected"), [(["demo"], 1), (["--threads", "3", "demo"], 3), (["demo", "--threads", "2"], 2)]
)
def test_demo_runs_with_the_policys_threads(monkeypatch, restore_threads, argv, expected):
    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PROMPT_ROBUST_THREADS", raising=False)
    monkeypatch.setattr(cli, "_demo", lambda args: seen.append(torch.get_num_threads()) or 0)
    torch.set_num_threads(2 if expected != 2 else 1)
    assert cli.main(argv) == 0 and seen == [expected]


def test_a_bad_thread_option_is_one_line_exit_2(monkeypatch, capsys, restore_threads):
    monkeypatch.setattr(cli, "_demo", lambda args: 0)
    assert cli.main(["demo", "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prompt-robust: error: --threads must be 'auto' or a whole number >= 1; got '0'."]
