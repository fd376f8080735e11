"""The README's quickstart code block runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md lost its Quickstart python block"
    monkeypatch.chdir(tmp_path)  # it saves an adapter into the working directory
    namespace: dict = {}
    exec(compile(block.group(1), "README.md:quickstart", "exec"), namespace)
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()
    refiner = re.search(r"### With the refiner\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert refiner is not None, "README.md lost its refiner python block"
    exec(compile(refiner.group(1), "README.md:refiner", "exec"), namespace)
    prompts, learner = namespace["prompts"], namespace["learner"]
    assert prompts["text"].shape == (2, *learner.prompt_tokens()["text"].shape)
