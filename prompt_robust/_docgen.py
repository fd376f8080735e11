"""Generate ``docs/config.md`` and ``docs/cli.md`` from the config dataclasses and the CLI parser.

The reference pages are generated, never written by hand, so they cannot drift from the code: the field names,
types, defaults and help texts come from the dataclasses (``help_field(..., help)``), the options from
:func:`prompt_robust.cli.build_parser`. ``tests/test_docs.py`` checks that the committed files equal what this
module generates.

Usage::

    python -m prompt_robust._docgen            # rewrite docs/config.md and docs/cli.md
    python -m prompt_robust._docgen --check    # exit 1 when a committed file is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_SECTIONS", "cli_markdown", "config_classes", "config_markdown", "main"]

#: (section title, what it configures, [(module, class name)]) in the order of docs/config.md
CONFIG_SECTIONS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Add-ons",
        "`prompt_robust.wrap(learner, RobustConfig(...))` attaches one add-on per non-None keyword of `RobustConfig` "
        "(one per registered add-on); "
        "[concepts.md](concepts.md) explains the methods and how they compose.",
        (
            ("prompt_robust.config", "RobustConfig"),
            ("prompt_robust.addons.refiner.config", "RefinerConfig"),
            ("prompt_robust.addons.counterfactual.config", "CounterfactualConfig"),
            ("prompt_robust.addons.invariance.config", "InvarianceConfig"),
            ("prompt_robust.addons.debias.config", "DebiasConfig"),
        ),
    ),
    (
        "Learners",
        "`prompt_robust.build_learner(name, backbone, classnames, **fields)` takes these fields as keyword "
        "arguments (or `config=` an instance); [learner_contract.md](learner_contract.md) describes the learners' "
        "prompt sites.",
        (
            ("prompt_robust.learners.zeroshot", "ZeroShotConfig"),
            ("prompt_robust.learners.coop", "CoOpConfig"),
            ("prompt_robust.learners.cocoop", "CoCoOpConfig"),
            ("prompt_robust.learners.vpt", "VPTConfig"),
            ("prompt_robust.learners.maple", "MaPLeConfig"),
            ("prompt_robust.learners.kgcoop", "KgCoOpConfig"),
            ("prompt_robust.learners.promptsrc", "PromptSRCConfig"),
        ),
    ),
    (
        "Training",
        "`prompt_robust.training.fit(model, dataset, FitConfig(...))`; see [quickstart.md](quickstart.md).",
        (("prompt_robust.training", "FitConfig"),),
    ),
    (
        "Benchmark and embedded world",
        "The embedded benchmark, the mini-CLIP's pretraining and the procedural world; see "
        "[benchmark.md](benchmark.md).",
        (
            ("prompt_robust.bench.runner", "BenchConfig"),
            ("prompt_robust.bench.pretrain", "PretrainConfig"),
            ("prompt_robust.bench.world", "WorldConfig"),
            ("prompt_robust.bench.suites.speed", "SpeedConfig"),
        ),
    ),
)

_SECTION_HEADERS = ("Args:", "Arguments:", "Attributes:", "Example:", "Examples:", "Returns:", "Raises:")


# ---------------------------------------------------------------------------------------------------------------
# text helpers
# ---------------------------------------------------------------------------------------------------------------
def _rst_to_markdown(text: str) -> str:
    """Docstring markup to Markdown: ````x```` -> ```x```, ``:class:`~a.B``` -> ```B```."""
    text = re.sub(
        r":(?:class|func|meth|attr|mod|data|obj):`~?([^`]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text
    )
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, one line, ``<`` escaped so it starts no HTML tag)."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "\\<")


def _code(text: str) -> str:
    """Inline code safe inside a table cell."""
    text = str(text)
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _description(cls: type) -> str:
    """The class docstring's prose (up to its first Args/Example section), as Markdown."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    kept = []
    for line in doc.splitlines():
        if line.strip() in _SECTION_HEADERS:
            break
        kept.append(line)
    return _rst_to_markdown("\n".join(kept).strip())


def _docstring_args(cls: type) -> dict[str, str]:
    """``name: text`` entries of the docstring's ``Args:``/``Attributes:`` sections (continuation lines joined)."""
    entries: dict[str, str] = {}
    current = None
    inside = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Attributes:"):
            inside, current = True, None
            continue
        if stripped in _SECTION_HEADERS or (inside and line and not line.startswith(" ")):
            inside, current = False, None
            continue
        if not inside:
            continue
        match = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None and stripped:
            entries[current] += " " + stripped
    return entries


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


# ---------------------------------------------------------------------------------------------------------------
# docs/config.md
# ---------------------------------------------------------------------------------------------------------------
def config_classes() -> list[type]:
    """The documented config dataclasses, in page order."""
    return [
        getattr(importlib.import_module(module), name) for _, _, entries in CONFIG_SECTIONS for module, name in entries
    ]


def field_help(cls: type) -> dict[str, str]:
    """Per-field description: the field's ``help`` metadata, else its entry in the class docstring's ``Args:``.

    Raises:
        ValueError: a field has neither (every documented field must say what it does).
    """
    from_doc = _docstring_args(cls)
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") or from_doc.get(f.name, "")
        if not text.strip():
            raise ValueError(
                f"{cls.__name__}.{f.name} has no description: give it one with help_field(default, 'help text') or "
                "an 'Args:' entry in the class docstring."
            )
        out[f.name] = text.strip()
    return out


def _cli_usage(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Config class name -> how the CLI exposes it (per subcommand)."""
    from .config import RobustConfig

    json_options = {f"--{name}-config": cls.__name__ for name, cls in RobustConfig.addon_configs().items()}
    usage: dict[str, list[str]] = {}
    for command, sub in _subcommands(parser):
        per_class: dict[str, list[str]] = {}
        prefixes: dict[str, str] = {}
        for action in sub._actions:
            if "." in action.dest:
                name, field_name = action.dest.split(".", 1)
                per_class.setdefault(name, []).append(field_name)
                option = action.option_strings[0] if action.option_strings else ""
                prefixes[name] = option.removesuffix(field_name.replace("_", "-"))[2:]  # "--refiner-x" -> "refiner-"
            for option in action.option_strings:
                if option in json_options:
                    usage.setdefault(json_options[option], []).append(
                        f"`prompt-robust {command}`: a JSON object of its fields in `{option}`"
                    )
        for name, exposed in per_class.items():
            cls = next((c for c in config_classes() if c.__name__ == name), None)
            skipped = [] if cls is None else [f.name for f in dataclasses.fields(cls) if f.name not in exposed]
            note = f" (all but {', '.join(f'`{s}`' for s in skipped)})" if skipped else ""
            option = f"--{prefixes.get(name, '')}field-name"
            usage.setdefault(name, []).append(f"`prompt-robust {command}`: one `{option}` option per field{note}")
    return usage


def _field_rows(cls: type) -> list[tuple[str, str, str, str, str]]:
    """``(field, type, default, allowed, description)`` of a config dataclass (``allowed``: the constraints its
    ``help_field`` declares, in words); for ``RobustConfig``, whose keywords are the registered add-ons, one row per
    add-on (its config class and description)."""
    from .config import RobustConfig, field_allowed

    if cls is RobustConfig:
        from .addons import ADDONS

        return [(n, f"{a.config_class.__name__} | None", "None", "", a.description) for n, a in ADDONS.items()]
    helps = field_help(cls)
    return [
        (f.name, _type_name(f.type), _default(f), field_allowed(cls, f), helps[f.name]) for f in dataclasses.fields(cls)
    ]


def config_markdown() -> str:
    """The text of ``docs/config.md``."""
    from .cli import build_parser

    usage = _cli_usage(build_parser())
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m prompt_robust._docgen` from the config dataclasses; do not edit by hand. -->",
        "",
        "Every option of the library is a field of a config dataclass: its help text, default and allowed values",
        "(column *allowed*) are declared on the field and checked when the config is built (an error names the",
        "field, what it got and what is allowed; a config's `__post_init__` adds only the rules between fields), and",
        "`to_dict()` / `from_dict()` round-trip through JSON (adapter files store the configs this way; unknown",
        "keys are refused by name). The command line is generated from the same dataclasses ([cli.md](cli.md)).",
        "",
    ]
    for title, _, entries in CONFIG_SECTIONS:
        lines += [f"- [{title}](#{_slug(title)}): " + ", ".join(f"[`{n}`](#{_slug(n)})" for _, n in entries)]
    lines.append("")
    for title, intro, entries in CONFIG_SECTIONS:
        lines += [f"## {title}", "", intro, ""]
        for module, name in entries:
            cls = getattr(importlib.import_module(module), name)
            lines += [f"### {name}", "", f"`{module}.{name}`", ""]
            description = _description(cls)
            if description:
                lines += [description, ""]
            for note in usage.get(name, []):
                lines.append(f"- Command line, {note}.")
            if name in usage:
                lines.append("")
            lines += ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
            for field_name, type_name, default, allowed, text in _field_rows(cls):
                lines.append(
                    f"| `{field_name}` | {_code(type_name)} | {_code(default)} | {_cell(allowed)} | "
                    f"{_cell(_rst_to_markdown(text))} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# docs/cli.md
# ---------------------------------------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices.items())


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help or "" for choice in action._choices_actions}


def _value(action: argparse.Action) -> str:
    """What an option takes: nothing (a flag), one of its choices, or a typed value (several with nargs)."""
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        one = "{" + ", ".join(str(c) for c in action.choices) + "}"
    else:
        kind = action.type
        names = {int: "INT", float: "FLOAT", str: "TEXT", None: "TEXT"}
        one = names.get(kind, "true/false" if getattr(kind, "__name__", "") == "_parse_bool" else "VALUE")
    if action.nargs == "+":
        return f"{one} [{one} ...]"
    if action.nargs == "*":
        return f"[{one} ...]"
    return one


def _option_row(action: argparse.Action, top_level: bool = False) -> str | None:
    if action.help == argparse.SUPPRESS or not action.option_strings:
        return None
    if isinstance(action, argparse._HelpAction) and not top_level:
        return None  # every command has -h; listed once, with the global options
    text = action.help or ""
    # argparse's own wording of these differs between Python versions; the page must not
    if isinstance(action, argparse._HelpAction):
        text = "Show the help and exit."
    elif isinstance(action, argparse._VersionAction):
        text = "Show the version and exit."
    default = ""
    match = re.search(r"\s*\(default: (.*)\)$", text)
    if action.default is argparse.SUPPRESS and match:
        text, default = text[: match.start()], match.group(1)
    elif action.required:
        default = "required"
    elif action.nargs != 0 and action.default is not None and action.default is not argparse.SUPPRESS:
        default = str(action.default)
    names = ", ".join(f"`{option}`" for option in action.option_strings)
    value = _code(_value(action)) if _value(action) else ""
    default = "required" if default == "required" else _code(default) if default else ""
    return f"| {names} | {value} | {default} | {_cell(text)} |"


def _option_table(actions: Sequence[argparse.Action], top_level: bool = False) -> list[str]:
    rows = [row for row in (_option_row(a, top_level) for a in actions) if row is not None]
    if not rows:
        return []
    return ["| option | value | default | description |", "|---|---|---|---|", *rows, ""]


def cli_markdown() -> str:
    """The text of ``docs/cli.md``."""
    from .cli import build_parser

    parser = build_parser()
    documented = {cls.__name__ for cls in config_classes()}
    helps = _subcommand_help(parser)
    commands = _subcommands(parser)
    lines = [
        "# Command line reference",
        "",
        "<!-- Generated by `python -m prompt_robust._docgen` from prompt_robust.cli.build_parser(); do not edit by "
        "hand. -->",
        "",
        f"`{parser.prog}`: {parser.description} The command is installed with the package (`python -m "
        "prompt_robust.cli` runs the same program); every command also takes `-h` for its help. Usage:",
        "",
        "```",
        f"{parser.prog} [--version] [-v] [-q] [--debug] <command> [options]",
        "```",
        "",
        "Options grouped under a config class name are generated from that dataclass: `--field-name` sets "
        "`field_name` (the refiner's fields are `--refiner-field-name`), lists take several values (`--seeds 1 2 3`), booleans take `true`/`false`, and an option "
        "left out keeps the dataclass default. The fields are described in [config.md](config.md). The CLI prints "
        "its results; the library itself never prints. `-v`, `-q` and `--debug` may also follow the command. A "
        "user's mistake prints one line, `prompt-robust: error: ...`, and exits with status 2; an unexpected error "
        "exits with 1 (`--debug` shows its traceback).",
        "",
        "## Global options",
        "",
        *_option_table([a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)], top_level=True),
        "## Commands",
        "",
        "| command | what it does |",
        "|---|---|",
        *(f"| [`{name}`](#{_slug('prompt-robust ' + name)}) | {_cell(helps.get(name, ''))} |" for name, _ in commands),
        "",
    ]
    for name, sub in commands:
        lines += [f"## prompt-robust {name}", "", _cell(helps.get(name, "")), ""]
        for group in sub._action_groups:
            table = _option_table(group._group_actions)
            if not table:
                continue
            if group.title in documented:
                lines += [f"### {group.title}", "", f"Fields of [`{group.title}`](config.md#{_slug(group.title)}).", ""]
            elif group.title not in ("options", "optional arguments"):
                lines += [f"### {group.title}", ""]
            lines += table
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
#: file name in docs/ -> generator
PAGES = {"config.md": config_markdown, "cli.md": cli_markdown}


def default_docs_dir() -> Path:
    """``docs/`` of the source checkout this module lives in."""
    return Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prompt_robust._docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 when a committed page differs; write nothing.")
    parser.add_argument("--docs-dir", type=Path, default=None, help="Where the pages live (default: the repo's docs/).")
    args = parser.parse_args(argv)
    docs = args.docs_dir or default_docs_dir()
    if not docs.is_dir():
        raise SystemExit(f"docs directory {str(docs)!r} does not exist; pass --docs-dir (run from a source checkout).")
    stale = []
    for name, generate in PAGES.items():
        path = docs / name
        text = generate()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"stale generated docs: {', '.join(stale)}. Regenerate them with `python -m prompt_robust._docgen`.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
