"""Every example runs as is (in a reduced setting) and leaves a loadable adapter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import prompt_robust as pr

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_coop_example(tmp_path, capsys):
    example = _load("train_coop")
    example.main(["--steps", "30", "--out", str(tmp_path / "run")])
    assert "after" in capsys.readouterr().out
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    loaded = pr.RobustPromptModel.from_pretrained(
        adapter,
        learner=pr.build_learner(
            "coop", example.tiny_clip_backbone(initializer_factor=3.0), example.CLASSNAMES, n_ctx=4
        ),
    )
    assert loaded.learner.classnames == example.CLASSNAMES
