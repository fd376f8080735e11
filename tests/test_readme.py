"""The README's quickstart code block runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README.md lost its Quickstart python block"
    monkeypatch.chdir(tmp_path)  # it saves an adapter into the working directory
    exec(compile(block.group(1), "README.md:quickstart", "exec"), {})
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()
