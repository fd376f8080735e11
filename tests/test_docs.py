"""The generated reference pages match the code, and every relative link in the docs resolves."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import prompt_robust
from prompt_robust import _docgen
from prompt_robust.addons import ADDONS
from prompt_robust.config import ConfigMixin, RobustConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


@pytest.mark.parametrize("name", sorted(_docgen.PAGES))
def test_generated_page_is_up_to_date(name):
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == _docgen.PAGES[name](), (
        f"docs/{name} is stale: regenerate it with `python -m prompt_robust._docgen` and commit the result."
    )


def test_check_mode_reports_a_stale_page(tmp_path, capsys):
    for name, generate in _docgen.PAGES.items():
        (tmp_path / name).write_text(generate(), encoding="utf-8")
    assert _docgen.main(["--check", "--docs-dir", str(tmp_path)]) == 0
    (tmp_path / "cli.md").write_text("# edited by hand\n", encoding="utf-8")
    assert _docgen.main(["--check", "--docs-dir", str(tmp_path)]) == 1
    assert "cli.md" in capsys.readouterr().err
    assert (tmp_path / "cli.md").read_text(encoding="utf-8") == "# edited by hand\n"  # --check writes nothing
    assert _docgen.main(["--docs-dir", str(tmp_path)]) == 0
    assert (tmp_path / "cli.md").read_text(encoding="utf-8") == _docgen.cli_markdown()


def _public_config_classes() -> set[type]:
    """Every ConfigMixin dataclass defined in a public prompt_robust module (optional extras skipped)."""
    found = set()
    for info in pkgutil.walk_packages(prompt_robust.__path__, "prompt_robust."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # a module of an optional extra that is not installed
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, ConfigMixin)
                and dataclasses.is_dataclass(value)
                and value.__module__ == info.name
                and not value.__name__.startswith("_")
            ):
                found.add(value)
    return found


def test_every_config_dataclass_and_field_is_documented():
    documented = _docgen.config_classes()
    page = (DOCS / "config.md").read_text(encoding="utf-8")
    # base classes (LearnerConfig, ContextConfig) are covered by the concrete configs that inherit their fields
    missing = [
        cls.__name__
        for cls in _public_config_classes()
        if cls not in documented and not any(issubclass(doc, cls) for doc in documented)
    ]
    assert not missing, f"config dataclasses missing from prompt_robust._docgen.CONFIG_SECTIONS: {missing}"
    sections = re.split(r"^### ", page, flags=re.M)
    for cls in documented:
        section = next((s for s in sections if s.startswith(cls.__name__ + "\n")), None)
        assert section is not None, f"docs/config.md has no section for {cls.__name__}"
        if cls is RobustConfig:  # its keywords are the registered add-ons
            for name, addon in ADDONS.items():
                assert re.search(rf"^\| `{name}` \| `{addon.config_class.__name__} \\| None`", section, re.M), name
                assert addon.description, f"add-on {name!r} has no description"
            continue
        helps = _docgen.field_help(cls)
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\| `{f.name}` \|", section, re.M), f"{cls.__name__}.{f.name} is not in docs/config.md"
            assert helps[f.name], f"{cls.__name__}.{f.name} has no description"


def test_a_field_without_description_is_refused():
    @dataclasses.dataclass
    class Undocumented(ConfigMixin):
        """No Args section."""

        size: int = 3

    with pytest.raises(ValueError, match=r"Undocumented\.size has no description"):
        _docgen.field_help(Undocumented)

    @dataclasses.dataclass
    class FromDocstring(ConfigMixin):
        """Sizes.

        Args:
            size: how many, a long description
                continued on the next line.
        """

        size: int = 3

    assert _docgen.field_help(FromDocstring) == {"size": "how many, a long description continued on the next line."}


def test_every_cli_command_and_option_is_documented():
    from prompt_robust.cli import build_parser

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    for command, sub in _docgen._subcommands(build_parser()):
        assert f"## prompt-robust {command}\n" in page
        section = page.split(f"## prompt-robust {command}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert f"`{option}`" in section, f"{option} of {command} is not in docs/cli.md"


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {_docgen._slug(h) for h in headings}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_slug_follows_github_anchors():
    assert _docgen._slug("prompt-robust pretrain-backbone") == "prompt-robust-pretrain-backbone"
    assert _docgen._slug("Choosing λ and k when none is given (the held-out rule)") == (
        "choosing-λ-and-k-when-none-is-given-the-held-out-rule"
    )
    assert _docgen._slug("Benchmark and embedded world") == "benchmark-and-embedded-world"
