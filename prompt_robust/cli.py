"""The ``prompt-robust`` command line: ``demo``, ``bench``, ``pretrain-backbone``, ``train``, ``eval``, ``reproduce``.

Options of the training, benchmark and pretraining commands are generated from their config dataclasses
(:class:`~prompt_robust.training.FitConfig`, :class:`~prompt_robust.bench.runner.BenchConfig`,
:class:`~prompt_robust.bench.pretrain.PretrainConfig`), so the CLI and the Python API never disagree. The CLI prints
its results; the library itself never prints. ``bench --suite`` offers the suites registered in
:data:`prompt_robust.bench.suites.SUITES`; the CLI knows none of them by name.

A user's mistake (a missing or wrong option, a refused overwrite, a checkpoint of other settings) is answered with
one line, ``prompt-robust: error: ...``, naming the option to fix, and exit status 2; an unexpected error exits
with status 1 and one line; ``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__, _io

if TYPE_CHECKING:
    from .bench.suites import Suite, SuiteRequest

__all__ = ["UsageError", "main"]


# ---------------------------------------------------------------------------------------------------------------
# dataclass -> argparse
# ---------------------------------------------------------------------------------------------------------------
def _arg_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation such as ``int``, ``float | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arg_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    *,
    prefix: str = "",
    unprefixed: tuple[str, ...] = (),
) -> None:
    """Add ``--<prefix>field-name`` options for every field of config dataclass ``cls`` (defaults left to the
    class); the fields in ``unprefixed`` also keep their plain ``--field-name`` spelling."""
    from .config import field_help_text

    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, is_list = _arg_type(hints[f.name])
        kind = _parse_bool if kind is bool else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f.name.replace("_", "-")
        names = [f"--{prefix}{flag}", *([f"--{flag}"] if prefix and f.name in unprefixed else [])]
        group.add_argument(
            *names,
            dest=f"{cls.__name__}.{f.name}",
            type=kind,
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            help=f"{field_help_text(cls, f)} (default: {default})".replace("%", "%%"),  # argparse formats %
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_args` added (unset ones keep their defaults)."""
    return cls(**{**overrides, **_set_fields(cls, args)})


def _refiner_args(parser: argparse.ArgumentParser) -> None:
    """The refiner's fields as ``--refiner-<field>``. The plain spellings (``--train-steps``) stay where they are
    unambiguous; ``--method`` and ``--targets`` do not, as they read like ``bench --methods`` and the calibration
    suite's targets (``bench --method coop`` once set the refiner's ODE solver to 'coop')."""
    from .addons.refiner.config import RefinerConfig

    fields = tuple(f.name for f in dataclasses.fields(RefinerConfig) if f.name not in ("method", "targets"))
    add_dataclass_args(parser, RefinerConfig, prefix="refiner-", unprefixed=fields)


# ---------------------------------------------------------------------------------------------------------------
# errors a user can fix: one line naming the option
# ---------------------------------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A command line the program refuses (a missing or wrong option, a run it would replace); its message names
    the option to fix. ``main`` prints it as one line and returns 2 (``--debug``: raised, with its traceback).

    Example:
        >>> main(["train", "--dataset", "waterbirds", "--out", "run", "--debug"])
        Traceback (most recent call last):
        ...
        prompt_robust.cli.UsageError: --dataset waterbirds needs --root (the Waterbirds folder holding metadata.csv).
    """


#: exceptions that mean "the input is wrong" (a config value, a path, a refused overwrite, a checkpoint of other
#: settings, a missing optional extra); anything else is a bug, reported as such
_USER_ERRORS = (ValueError, OSError, TypeError, KeyError, ImportError, FloatingPointError)

#: library wording (Python arguments) -> the command line's options: (pattern, replacement, commands it applies
#: to, or None: every command); more specific phrases first
_CLI_WORDS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str], tuple[str, ...] | None], ...] = (
    (
        re.compile(r"move the old run's checkpoints away and pass resume=False to start over here"),
        "pass --overwrite to start over here (it moves the old run aside)",
        ("train",),
    ),
    (re.compile(r"\bresume=False\b"), "--overwrite", ("train",)),
    (re.compile(r"\banother checkpoint_dir\b"), "another --out", ("train",)),
    (re.compile(r"\bcheckpoint_dir\b"), "--checkpoint-dir", ("pretrain-backbone",)),
    (re.compile(r"\bFitConfig\.(\w+)"), lambda m: "--" + m.group(1).replace("_", "-"), ("train",)),
    (re.compile(r"\bresume=(['\"])new-settings\1"), "--resume-new-settings", ("train",)),
    (re.compile(r"\boverwrite=True\b"), "--overwrite", None),
    (re.compile(r"\banother output folder\b"), "another --out", ("reproduce",)),
    (re.compile(r"\bstrict_backbone=False\b"), "--no-strict-backbone", None),
    (
        re.compile(r"\bdelete it or choose another --out\b"),
        "pass --overwrite (it moves them aside) or choose another --out",
        None,
    ),
)


def _cli_words(message: str, command: str | None = None) -> str:
    """A library message as one line in the command line's terms (``overwrite=True`` -> ``--overwrite``)."""
    for pattern, replacement, commands in _CLI_WORDS:
        if commands is None or command in commands:
            message = pattern.sub(replacement, message)
    return " ".join(message.split())


def _error_line(error: BaseException, command: str | None = None) -> str:
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, (TypeError, KeyError)):  # bad input, or a bug: the traceback tells which
        text += " (rerun with --debug for the traceback)"
    return _cli_words(text, command)


class _Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (``--meth`` is not ``--methods``), whose errors are one line, and
    whose unknown options are answered with the closest valid ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see '{self.prog} -h'\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices
            parser = commands.get(getattr(parsed, "command", None), self)
            parser.error(_unrecognized(extras, parser))
        return parsed


def _unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """``unrecognized argument --method; did you mean --methods? (the refiner's option is --refiner-method)``"""
    option = next((e.split("=", 1)[0] for e in extras if e.startswith("-")), None)
    if option is None:
        return f"unrecognized argument(s): {' '.join(extras)}"
    valid = [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
    message = f"unrecognized argument {option}" + (f"; did you mean {close[0]}?" if close else "")
    prefixed = f"--refiner-{option.lstrip('-')}"  # a refiner option whose plain spelling was dropped as ambiguous
    if prefixed in valid and prefixed not in close:
        message += f" (the refiner's option is {prefixed})"
    return message


def _global_args(parser: argparse.ArgumentParser, *, command: bool) -> None:
    """-v, -q and --debug, accepted before the command and after it (where their default is SUPPRESS, so a flag
    given before the command is not reset by the command's parser)."""
    group = parser.add_argument_group("global options") if command else parser
    default = argparse.SUPPRESS if command else False
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="Log progress details.")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="No progress bars.")
    group.add_argument(
        "--debug", action="store_true", default=default, help="Show the traceback of an error (not one line)."
    )
    group.add_argument(
        "--threads",
        default=argparse.SUPPRESS if command else None,
        metavar="N|auto",
        help=(
            "Intra-op CPU threads of torch. auto (default; also PROMPT_ROBUST_THREADS): 1 for small models (the "
            "embedded mini CLIP; demo, bench, pretrain-backbone), else the cores this process may use, at most 8; an "
            "OMP_NUM_THREADS set in the environment is kept. Extra threads of a small model only wait on each "
            "other, and on a busy machine they make a run many times slower."
        ),
    )


def _move_aside(out: Path, names: list[str], what: str) -> Path | None:
    """Move ``names`` (files or folders under ``out``) into a new ``replaced-<time>/`` folder, deleting nothing;
    prints where they went."""
    names = [name for name in names if (out / name).exists()]
    target = _io.move_aside(out, names)
    if target is not None:
        print(f"moved {what} ({', '.join(names)}) to {target}")
    return target


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------
def _command_line() -> str:
    """The command as typed, recorded in reports for reproducibility."""
    return "prompt-robust " + " ".join(shlex.quote(a) for a in sys.argv[1:])


#: models with fewer parameters run on one thread under --threads auto (the embedded mini CLIP has ~2M)
_SMALL_MODEL_PARAMS = 20_000_000
#: commands whose models are small by construction (the embedded world, its benchmarks, its pretraining)
_SMALL_MODEL_COMMANDS = ("demo", "bench", "pretrain-backbone")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_count(
    setting: str | int | None, *, small_model: bool, environ: Mapping[str, str] | None = None
) -> int | None:
    """Torch's intra-op thread count for ``--threads setting`` (None: keep torch's choice).

    ``auto`` (or None) is 1 for a small model, else the cores this process may use (at most 8), unless
    ``OMP_NUM_THREADS`` is set (the user's choice is kept: None). A number is used as given.

    Example:
        >>> thread_count("auto", small_model=True, environ={}), thread_count("3", small_model=True, environ={})
        (1, 3)
        >>> thread_count(None, small_model=False, environ={"OMP_NUM_THREADS": "4"}) is None
        True
    """
    environ = os.environ if environ is None else environ
    setting = setting if setting is not None else environ.get("PROMPT_ROBUST_THREADS", "auto")
    if str(setting).strip().lower() != "auto":
        try:
            count = int(setting)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"--threads must be 'auto' or a whole number >= 1; got {setting!r}.")
        return count
    if environ.get("OMP_NUM_THREADS"):
        return None
    return 1 if small_model else min(_available_cores(), 8)


def _set_threads(args: argparse.Namespace, *, small_model: bool) -> None:
    import torch

    count = thread_count(getattr(args, "threads", None), small_model=small_model)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    logging.getLogger(__name__).info("torch intra-op threads: %d", torch.get_num_threads())


def _embedded_or_given(spec: str | None, args: argparse.Namespace | None = None):
    from .backbones import load_backbone

    backbone = load_backbone(spec or "embedded")
    if args is not None:
        _set_threads(args, small_model=sum(p.numel() for p in backbone.parameters()) < _SMALL_MODEL_PARAMS)
    return backbone


_BENCH_OVERWRITE_HELP = (
    "Replace results of other settings already in --out: they are moved (not deleted), with the saved runs/ and "
    "splits/, into <out>/replaced-<UTC YYYYmmdd-HHMMSS>/, and the benchmark starts afresh. Without it a rerun with "
    "the same settings resumes (reusing the saved runs) and other settings are refused."
)


def _claim_bench_out(
    args: argparse.Namespace, suite: Suite, settings: dict[str, Any] | None = None, label: str = ""
) -> None:
    """Refuse to replace the results of an earlier run of ``suite`` (a registered
    :class:`~prompt_robust.bench.suites.Suite`; ``label``: the name to call it by) in ``--out``, unless they were
    made with the same ``settings`` (a rerun then reuses its saved runs and writes the same results) or
    ``--overwrite`` is given, which moves them (and the saved runs) into ``<out>/replaced-<time>/``. Suites that
    record no settings (``settings=None``) refuse any earlier output of theirs."""
    from .bench.report import recorded_settings

    label = label or suite.name
    out = Path(args.out)
    present = [name for name in suite.outputs if (out / name).exists()]
    if args.overwrite:
        saved = ["runs", "splits"] if suite.saves_runs else []
        _move_aside(out, [*present, *saved], f"the previous {label} results")
        return
    if not present:
        return  # nothing finished there: a rerun resumes an interrupted run (saved runs of other settings rerun)
    detail = ""
    if settings is not None:
        recorded = recorded_settings(out)
        if recorded == settings:
            return
        if recorded is not None:
            differs = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k))
            shown = [f"{k} {_short(recorded.get(k))} -> {_short(settings.get(k))}" for k in differs[:4]]
            detail = f" made with other settings ({'; '.join(shown)}{'; ...' if len(differs) > 4 else ''})"
    raise UsageError(
        f"{out} already holds {label} results ({', '.join(present)}){detail}; pass --overwrite to move them into "
        f"{out}/replaced-<UTC time>/ and start afresh, or choose another --out."
    )


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _set_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of config ``cls`` given on the command line (for configs stored as override dicts)."""
    prefix = f"{cls.__name__}."
    return {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}


#: add-ons whose bench settings are given as JSON (their field names overlap the refiner's options)
_JSON_ADDONS = ("counterfactual", "invariance", "debias")


def _json_option(args: argparse.Namespace, addon: str) -> dict[str, Any]:
    """The settings of ``addon`` given as ``--<addon>-config`` JSON, their field names checked."""
    from .config import RobustConfig, unknown_name_error

    option, text = f"--{addon}-config", getattr(args, f"{addon}_config")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{option} must be a JSON object such as '{{\"weight\": 0.5}}'; got {text!r} ({error})."
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"{option} must be a JSON object of config fields; got {text!r}.")
    cls = RobustConfig.addon_configs()[addon]
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            raise UsageError(f"{option}: {unknown_name_error(f'{cls.__name__} field', key, names)}")
    return value


def _suite_request(args: argparse.Namespace, suite: Suite, label: str = "", **fields: Any) -> SuiteRequest:
    """The :class:`~prompt_robust.bench.suites.SuiteRequest` of the command line (``fields``: the bench command's
    settings); the suite's output directory is claimed through :func:`_claim_bench_out`."""
    from .bench.suites import SuiteRequest

    return SuiteRequest(
        out=args.out,
        backbone=args.backbone,
        progress=not args.quiet,
        command=_command_line(),
        claim=lambda settings: _claim_bench_out(args, suite, settings, label),
        **fields,
    )


def _demo(args: argparse.Namespace) -> int:
    from .bench.suites import SUITES
    from .bench.suites.standard import demo

    # the quick suite's protocol on reduced settings, its outputs called the demo's
    print(demo(_suite_request(args, SUITES["quick"], "demo", seeds=[1])))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .addons.refiner.config import RefinerConfig
    from .bench.runner import BenchConfig
    from .bench.suites import SUITES

    suite = SUITES[args.suite]
    refiner = _set_fields(RefinerConfig, args)
    seeds = list(range(1, args.seeds + 1))
    others = {name: _json_option(args, name) for name in _JSON_ADDONS}
    request = _suite_request(
        args,
        suite,
        seeds=seeds,
        bench_options=_set_fields(BenchConfig, args),
        learner=args.learner,
        mechanisms=args.mechanisms,
        refiner=refiner,
        addons=others,
    )
    if not suite.resumes:  # the others compare settings once they know them
        request.claim(None)
    print(suite.run(request))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .backbones.embedded import EMBEDDED_DIR
    from .bench.pretrain import PretrainConfig, pretrain_backbone

    config = dataclass_from_args(PretrainConfig, args)
    out = Path(args.out) if args.out else EMBEDDED_DIR
    record = pretrain_backbone(
        out,
        config,
        checkpoint_dir=args.checkpoint_dir,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command=_command_line(),
    )
    print(f"saved the mini-CLIP to {out}")
    print("zero-shot accuracy ('a photo of a {}.'), per class group and style:")
    for group, values in record["zero_shot"].items():
        print(f"  {group:6s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in values.items()))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .methods import parse_method
    from .reproduce import ReproduceConfig, parse_overrides, run_reproduce
    from .reproduce.runner import dataset_status

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder for the results, trainings and tables.")
    if not Path(args.data_root).is_dir():
        raise UsageError(
            f"--data-root {args.data_root!r} is not a folder; give the folder holding the datasets in CoOp's layout "
            "(see docs/datasets.md)."
        )
    for method in args.methods:
        parse_method(method)  # the benchmark's grammar: learner[+add-on[:mode]]...
    config = ReproduceConfig(
        protocol=args.protocol,
        data_root=args.data_root,
        methods=args.methods,
        seeds=args.seeds,
        shots=args.shots,
        preset=args.preset,
        overrides=parse_overrides(args.overrides or []),
        addons={name: _json_option(args, name) for name in _addon_names() if getattr(args, f"{name}_config")},
        datasets=args.datasets,
        device=args.device,
        precision=args.precision,
        augment=args.augment,
        num_workers=args.workers,
        eval_batch_size=args.eval_batch_size,
    )
    for line in dataset_status(config)[2]:
        print(f"missing {line}")
    backbone = _embedded_or_given(args.backbone, args)
    report = run_reproduce(config, backbone, out, overwrite=args.overwrite, progress=not args.quiet)
    if report.moved_to is not None:
        print(f"moved the results and trainings of other settings to {report.moved_to}")
    print(report.table_markdown)
    print(
        f"{len(report.ran)} unit(s) run, {len(report.reused)} reused ({report.device}, {report.precision}); tables: "
        f"{report.paths['markdown']}, {report.paths['json']}"
    )
    return 0


def _addon_names() -> list[str]:
    from .config import RobustConfig

    return list(RobustConfig.addon_configs())


#: what each dataset layout needs: option -> (what it is, "dir" or "file")
_DATA_NEEDS: dict[str, dict[str, tuple[str, str]]] = {
    "coop": {"split_file": ("split_zhou_<Dataset>.json", "file"), "image_dir": ("the split file's image root", "dir")},
    "waterbirds": {"root": ("the Waterbirds folder holding metadata.csv", "dir")},
    "celeba": {"root": ("the CelebA folder", "dir")},
    "imagenet": {"root": ("the data folder holding imagenet/ (CoOp's $DATA; see docs/datasets.md)", "dir")},
    "domainbed": {"root": ("the DomainBed dataset folder, one subfolder per domain", "dir"), "test_domains": ("", "")},
}


def _check_data_args(args: argparse.Namespace) -> None:
    """Refuse missing or wrong data options before anything loads, naming the option."""
    needs = _DATA_NEEDS[args.dataset]
    missing = [name for name in needs if not getattr(args, name)]
    if missing:
        flags = " and ".join(f"--{name.replace('_', '-')}" for name in missing)
        what = "; ".join(f"{needs[n][0]}" for n in missing if needs[n][0])
        example = " (the held-out domains, e.g. --test-domains sketch)" if "test_domains" in missing else ""
        raise UsageError(f"--dataset {args.dataset} needs {flags}{f' ({what})' if what else ''}{example}.")
    for name, (what, kind) in needs.items():
        path = Path(getattr(args, name)) if kind else None
        if path is not None and not (path.is_dir() if kind == "dir" else path.is_file()):
            flag = f"--{name.replace('_', '-')}"
            found = "is not a folder" if kind == "dir" and path.exists() else "does not exist"
            raise UsageError(f"{flag} {str(path)!r} {found}; it should be {what}.")


def _dataset(args: argparse.Namespace, split: str, transform):
    from .data import loaders

    kind = args.dataset
    if kind == "coop":
        return loaders.load_coop_split(args.split_file, args.image_dir, split, transform=transform)
    if kind == "waterbirds":
        return loaders.load_waterbirds(args.root, split, transform=transform)
    if kind == "celeba":
        return loaders.load_celeba(args.root, args.target, args.spurious, split, transform=transform)
    if kind == "imagenet":
        return _imagenet_sets(args, split, transform)
    dataset = loaders.load_domainbed(args.root, transform=transform)
    train, tests = loaders.split_by_domain(dataset, args.test_domains)
    return train if split == "train" else tests


def _imagenet_sets(args: argparse.Namespace, split: str, transform):
    """ImageNet's training split, or its test sets for eval: those named by --targets, else every one whose folder
    is under --root (ImageNet-A and -R over their own 200 classes, as the papers test them)."""
    from .data.imagenet import IMAGENET_TARGETS, load_imagenet, load_imagenet_targets
    from .reproduce.datasets import DATASETS

    if split == "train":
        return load_imagenet(args.root, "train", transform=transform)
    targets = args.targets
    if not targets:
        root = Path(args.root)

        def present(name: str) -> bool:
            if name == "imagenet":
                return (root / "imagenet" / "images" / "val").is_dir()
            return DATASETS[name].missing(root) is None

        targets = [name for name in IMAGENET_TARGETS if present(name)] or ["imagenet"]  # the loader names what lacks
    return load_imagenet_targets(args.root, targets, transform=transform)


#: a train run's artifacts under --out: what --overwrite moves aside before training afresh
_RUN_ARTIFACTS = ["checkpoints", "cache", "split.json", "adapter"]


def _check_train_out(args: argparse.Namespace) -> None:
    """Refuse what would mix two runs in one --out, before anything loads."""
    out = Path(args.out)
    if args.overwrite and args.resume_new_settings:
        raise UsageError(
            "--overwrite starts a fresh run and --resume-new-settings continues the one in --out; pass one of them."
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder for the run (checkpoints, split, adapter).")
    if (out / "adapter" / "adapter_config.json").exists() and not (args.overwrite or args.resume_new_settings):
        raise UsageError(
            f"{out / 'adapter'} already holds an adapter (the run in --out is finished); pass --overwrite to train "
            f"afresh (the old run is moved to {out}/replaced-<UTC time>/), --resume-new-settings to train it further "
            "with the settings given now, or choose another --out."
        )


def _split_conflict(path: Path, meta: dict[str, Any] | None, indices: list[int] | None) -> str | None:
    """Why the split saved at ``path`` is not the one this run uses (None: it is, or there is none)."""
    if not path.is_file():
        return None

    saved = _io.read_json(path, "few-shot split")
    if meta is not None and saved.get("indices") == indices and all(saved.get(k) == v for k, v in meta.items()):
        return None
    now = f"--k {meta['k']} --seed {meta['seed']}" if meta else "the whole training split (no --k)"
    return f"k={saved.get('k')}, seed={saved.get('seed')} there; {now} now"


def _train(args: argparse.Namespace) -> int:
    from . import build_learner, wrap
    from .data.fewshot import sample_few_shot, save_split
    from .data.loaders import transform_for
    from .training import FitConfig, fit

    _check_data_args(args)
    _check_train_out(args)
    out = Path(args.out)
    backbone = _embedded_or_given(args.backbone, args)
    data = _dataset(args, "train", transform_for(backbone))
    indices, meta = None, None
    if args.k:
        indices = [int(i) for i in sample_few_shot(data.labels, args.k, args.seed)]
        meta = {"k": args.k, "seed": args.seed, "n_total": len(data)}
    conflict = None if args.overwrite else _split_conflict(out / "split.json", meta, indices)
    if conflict and not args.resume_new_settings:
        raise UsageError(
            f"{out / 'split.json'} holds the few-shot split of an earlier run ({conflict}); pass --overwrite to train "
            f"afresh (the old run is moved to {out}/replaced-<UTC time>/), --resume-new-settings to continue it on "
            "this split, or choose another --out."
        )
    from .addons.refiner.config import RefinerConfig
    from .config import RobustConfig

    settings = {name: _json_option(args, name) for name in _JSON_ADDONS}
    settings["refiner"] = _set_fields(RefinerConfig, args)
    robust = RobustConfig(**{name: RobustConfig.addon_configs()[name](**settings[name]) for name in args.addons or []})
    learner = build_learner(args.learner, backbone, data.classnames)
    model = wrap(learner, robust)
    config = dataclass_from_args(FitConfig, args, seed=args.seed, progress=not args.quiet)
    # every input is checked: now the previous run's files may move (nothing is deleted)
    if args.overwrite:
        _move_aside(out, _RUN_ARTIFACTS, "the previous run's files")
    elif args.resume_new_settings:
        _move_aside(out, ["adapter", *(["split.json"] if conflict else [])], "the previous run's files")
    if indices is not None and not (out / "split.json").is_file():
        save_split(out / "split.json", indices, meta=meta)
    if indices is not None:
        data = data.subset(indices)
    adapter_dir = out / "adapter"
    model.fit_addons(data, phase="before_prompt", seed=args.seed, cache_dir=out / "cache", progress=not args.quiet)
    # resume="new-settings": continue the checkpoint in --out with this run's data and settings
    resume = "new-settings" if args.resume_new_settings else True
    result = fit(model, data, config, checkpoint_dir=out / "checkpoints", resume=resume)
    logs = model.fit_addons(  # stages trained on the tuned prompt (the refiner's generator); none: nothing runs
        data,
        phase="after_prompt",
        seed=args.seed,
        cache_dir=out / "cache",
        checkpoint_dir=out / "checkpoints",
        progress=not args.quiet,
        resume=resume,
    )
    model.save_pretrained(adapter_dir)
    print(
        f"trained {'+'.join([args.learner, *(args.addons or [])])} for {result.steps} steps (final loss "
        f"{result.final_loss:.4f}); adapter in {adapter_dir}"
    )
    for key, value in logs.items():
        print(f"  {key}: {value:.4g}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .data.loaders import transform_for
    from .model import RobustPromptModel
    from .training import evaluate

    _check_data_args(args)
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {args.adapter!r} holds no adapter_config.json; give the adapter/ folder of a run.")
    backbone = _embedded_or_given(args.backbone, args)
    model = RobustPromptModel.from_pretrained(args.adapter, backbone=backbone, strict_backbone=args.strict_backbone)
    sets = _dataset(args, "test", transform_for(backbone))
    sets = sets if isinstance(sets, dict) else {"test": sets}
    report = {}
    for name, data in sets.items():
        if list(getattr(model.learner, "classnames", data.classnames)) != list(data.classnames):
            model.learner.set_classnames(data.classnames)  # e.g. ImageNet-A/-R: their own 200 classes
        groups = "groups" if getattr(data, "groups", None) is not None else None
        metrics = evaluate(model, data, groups_key=groups)
        report[name] = {k: v for k, v in metrics.items() if k != "per_group"}
    print(json.dumps(report, indent=2))
    return 0


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        choices=["coop", "waterbirds", "celeba", "domainbed", "imagenet"],
        help="Layout of the dataset under --root (see docs/datasets.md).",
    )
    parser.add_argument(
        "--root", help="Dataset root (waterbirds, celeba, domainbed; imagenet: the folder holding imagenet/)."
    )
    parser.add_argument("--split-file", help="split_zhou_<Dataset>.json (coop layout).")
    parser.add_argument("--image-dir", help="Image root of the split file (coop layout).")
    parser.add_argument("--target", default="Blond_Hair", help="CelebA target attribute.")
    parser.add_argument("--spurious", default="Male", help="CelebA spurious attribute.")
    parser.add_argument("--test-domains", nargs="+", help="DomainBed held-out domains.")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=["imagenet", "imagenetv2", "imagenet-sketch", "imagenet-a", "imagenet-r"],
        help="imagenet: the test sets eval reads (default: every one present under --root).",
    )
    parser.add_argument("--backbone", help="hf:<dir>, <dir> or open_clip:<model>:<weights>; default: embedded.")


def _reproduce_args(parser: argparse.ArgumentParser) -> None:
    from .reproduce import PRESETS, PROTOCOLS
    from .reproduce.runner import DEVICES, PRECISIONS

    parser.add_argument(
        "--protocol",
        required=True,
        choices=list(PROTOCOLS),
        help="; ".join(f"{p.name}: {p.title}" for p in PROTOCOLS.values()) + " (see docs/reproduce.md).",
    )
    parser.add_argument(
        "--data-root",
        required=True,
        help="Folder holding the datasets in CoOp's layout (docs/datasets.md); those present decide what runs, and "
        "each missing one is named.",
    )
    parser.add_argument(
        "--backbone", required=True, help="hf:<dir> (e.g. a saved CLIP ViT-B/16), <dir> or open_clip:<model>:<weights>."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["zeroshot", "coop"],
        help="Learners, optionally +add-ons (coop coop+refiner maple+debias:oracle), as bench --methods.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="Seeds (mean ± std over them).")
    parser.add_argument("--shots", type=int, default=16, help="Training images per class (0: the whole split).")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="paper",
        help="Learner recipes: paper (the reference configs, docs/reproduce.md) or quick (one epoch of each).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="Override recipe or learner fields: lr=0.01, epochs=5, batch_size=8, steps=100 (instead of epochs), "
        "maple.depth=3 (one learner only); see docs/reproduce.md.",
    )
    parser.add_argument("--datasets", nargs="+", help="Run only these datasets of the protocol (default: all present).")
    parser.add_argument(
        "--device", default="auto", help=f"{' | '.join(DEVICES)} | cuda:N (auto: a GPU when torch sees one)."
    )
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="auto",
        help="torch.autocast precision (auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU).",
    )
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="Train on CLIP's centre crop instead of the references' random resized crop and flip.",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="Data-loading processes, training and testing (default: 8 or the available cores on a GPU, 0 on the CPU).",
    )
    parser.add_argument("--eval-batch-size", type=int, default=100, help="Test images per forward pass.")
    for name in _addon_names():
        parser.add_argument(f"--{name}-config", help=f"Settings of the +{name} methods as a JSON object of fields.")
    parser.add_argument(
        "--out",
        required=True,
        help="Output folder: results/ (one JSON per dataset, method and seed), train/ (adapters), splits/, tables/. "
        "A rerun skips finished units and resumes an interrupted training.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Move results and trainings of other settings into <out>/replaced-<UTC YYYYmmdd-HHMMSS>/ and run them "
        "again (without it they are refused).",
    )


def build_parser() -> argparse.ArgumentParser:
    from .bench.pretrain import PretrainConfig
    from .bench.runner import BenchConfig
    from .bench.suites import SUITES
    from .bench.suites.mechanisms import MECHANISMS
    from .learners import LEARNERS
    from .training import FitConfig

    parser = _Parser(prog="prompt-robust", description="Make CLIP prompt learners robust to distribution shift.")
    parser.add_argument("--version", action="version", version=f"prompt_robust {__version__}")
    _global_args(parser, command=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, func) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text)
        sub.set_defaults(func=func)
        return sub

    demo = command("demo", "Compare zero-shot, CoOp and the add-ons on the embedded world.", _demo)
    demo.add_argument("--out", default="prompt_robust_demo", help="Output directory.")
    demo.add_argument("--overwrite", action="store_true", help=_BENCH_OVERWRITE_HELP)
    demo.add_argument("--backbone", help=argparse.SUPPRESS)

    bench = command("bench", "Every learner x add-on x task, mean ± std over seeds.", _bench)
    bench.add_argument(
        "--suite",
        choices=list(SUITES),
        default="quick",
        help="; ".join(f"{suite.name}: {suite.help}" for suite in SUITES.values()) + ".",
    )
    bench.add_argument("--learner", default="coop", help="Learner of the refiner sweep and the mechanism suites.")
    bench.add_argument(
        "--mechanisms",
        nargs="+",
        default=list(MECHANISMS),
        choices=list(MECHANISMS),
        help="Which mechanism suites --suite mechanisms runs (refiner-tpt: the refiner's label-free targets on "
        "domain generalisation, against test-time prompt tuning applied to every test image).",
    )
    for name in _JSON_ADDONS:
        bench.add_argument(
            f"--{name}-config", help=f"Settings of the +{name} methods as a JSON object of config fields."
        )
    bench.add_argument("--seeds", type=int, default=3, help="Number of seeds (1..N).")
    bench.add_argument("--out", default="prompt_robust_bench", help="Output directory.")
    bench.add_argument("--overwrite", action="store_true", help=_BENCH_OVERWRITE_HELP)
    bench.add_argument("--backbone", help="Backbone spec; default: the embedded mini-CLIP.")
    # the add-on settings dicts come as --<addon>-config JSON (and the refiner's fields as options), below
    add_dataclass_args(bench, BenchConfig, skip=("seeds", "refiner", "counterfactual", "invariance", "debias"))
    _refiner_args(bench)

    pretrain = command("pretrain-backbone", "Pretrain the mini-CLIP on the embedded world.", _pretrain)
    pretrain.add_argument("--out", help="Output directory (default: the package's embedded model directory).")
    pretrain.add_argument("--overwrite", action="store_true", help="Replace a model already saved there.")
    pretrain.add_argument("--checkpoint-dir", help="Resumable checkpoints (default: <out>.checkpoints).")
    add_dataclass_args(pretrain, PretrainConfig)

    train = command("train", "Tune a prompt learner on your dataset and save an adapter.", _train)
    _add_data_args(train)
    train.add_argument("--learner", default="coop", choices=sorted(LEARNERS), help="Prompt learner to train.")
    train.add_argument("--k", type=int, default=0, help="Shots per class (0: the whole training split).")
    train.add_argument(
        "--addons",
        nargs="+",
        choices=["counterfactual", "debias", "invariance", "refiner"],
        help="Robustness add-ons to train and save (refiner options below; the others take --<addon>-config JSON, "
        'e.g. --debias-config \'{"attribute_values": ["land background", "water background"]}\').',
    )
    for name in _JSON_ADDONS:
        train.add_argument(f"--{name}-config", help=f"Settings of the {name} add-on as a JSON object.")
    train.add_argument(
        "--out",
        required=True,
        help="Run directory (checkpoints, cache, split.json, adapter). An unfinished run there (checkpoints saved "
        "with --checkpoint-every) resumes from its last checkpoint, refused if its data or settings differ; a finished "
        "run is refused.",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="Train afresh: the previous run's checkpoints/, cache/, split.json and adapter/ are moved (not deleted) "
        "into <out>/replaced-<UTC YYYYmmdd-HHMMSS>/.",
    )
    train.add_argument(
        "--resume-new-settings",
        action="store_true",
        help="Continue the run in --out from its last checkpoint with the data and settings given now (fresh "
        "optimizer state); an adapter or split already there is moved into <out>/replaced-<time>/.",
    )
    add_dataclass_args(train, FitConfig, skip=("seed",))
    _refiner_args(train)
    train.add_argument("--seed", type=int, default=1, help="Seed of the few-shot split, initialisation and training.")

    evaluate = command("eval", "Evaluate a saved adapter on your dataset's test split.", _eval)
    _add_data_args(evaluate)
    evaluate.add_argument("--adapter", required=True, help="Adapter directory written by train.")
    evaluate.add_argument(
        "--no-strict-backbone",
        dest="strict_backbone",
        action="store_false",
        help="Attach the adapter to a backbone other than the one it was trained with (its fingerprint differs); "
        "the numbers then describe that combination.",
    )
    _reproduce_args(
        command("reproduce", "Run a seed paper's protocol on real datasets and write its table.", _reproduce)
    )
    for sub in commands.choices.values():
        _global_args(sub, command=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0; 2: a user's mistake; 1: an unexpected error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    with _library_progress_bars(not args.quiet):
        try:
            if args.command in _SMALL_MODEL_COMMANDS:
                _set_threads(args, small_model=True)
            return args.func(args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            return _fail("interrupted", 130)
        except Exception as error:
            if args.debug:
                raise
            if isinstance(error, _USER_ERRORS) or type(error).__module__.startswith(f"{__package__}."):
                return _fail(_error_line(error, args.command), 2)
            message = _cli_words(f"{type(error).__name__}: {error}", args.command)
            return _fail(f"unexpected error ({message}); rerun with --debug for the traceback", 1)


def _fail(message: str, status: int) -> int:
    print(f"prompt-robust: error: {message}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """With ``-q``, turn off the progress bars of libraries the library calls (transformers' weight loading) for
    the command's duration; the library's own bars follow the ``progress=`` arguments the commands pass."""
    if enabled or importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
