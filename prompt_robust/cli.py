"""The ``prompt-robust`` command line: ``demo``, ``bench``, ``pretrain-backbone``, ``train``, ``eval``.

Options of the training, benchmark and pretraining commands are generated from their config dataclasses
(:class:`~prompt_robust.training.FitConfig`, :class:`~prompt_robust.benchmark.BenchConfig`,
:class:`~prompt_robust.pretrain.PretrainConfig`), so the CLI and the Python API never disagree. The CLI prints its
results; the library itself never prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import shlex
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from . import __version__

__all__ = ["main"]

DEMO_METHODS = ["zeroshot", "coop"]


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


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` options for every field of config dataclass ``cls`` (defaults left to the class)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, is_list = _arg_type(hints[f.name])
        kind = _parse_bool if kind is bool else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"{cls.__name__}.{f.name}",
            type=kind,
            nargs="+" if is_list else None,
            default=argparse.SUPPRESS,
            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),  # argparse formats %
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_args` added (unset ones keep their defaults)."""
    prefix = f"{cls.__name__}."
    values = {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}
    return cls(**{**overrides, **values})


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------
def _command_line() -> str:
    """The command as typed, recorded in reports for reproducibility."""
    return "prompt-robust " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _quick_methods() -> list[str]:
    """Zero-shot, CoOp and CoOp with each available add-on."""
    from .addons import ADDONS

    return DEMO_METHODS + [f"coop+{name}" for name in sorted(ADDONS)]


def _embedded_or_given(spec: str | None):
    from .backbones import load_backbone

    return load_backbone(spec or "embedded")


def _print_tables(means: dict, stds: dict) -> None:
    from .benchmark import TASKS
    from .report import format_table, sanity_checks

    for task in TASKS:
        if task in means:
            print(f"\n{task}\n" + format_table(task, means, stds))
    checks = sanity_checks(means)
    if checks:
        print("\nsanity checks\n" + "\n".join(f"- {c}" for c in checks))


def _run_bench(args: argparse.Namespace, config, title: str) -> int:
    from .benchmark import run_benchmark, summarize
    from .report import write_outputs

    started = time.time()
    backbone = _embedded_or_given(args.backbone)
    out = Path(args.out)
    raw = run_benchmark(backbone, config, out, progress=not args.quiet)
    means, stds = summarize(raw)
    header = (
        f"# {title}\n\nCommand: `{_command_line()}`  \nBackbone: `{backbone.name}`  \nSeeds: {config.seeds} "
        f"(mean ± std, %)  \nWall time: {time.time() - started:.0f} s"
    )
    files = write_outputs(out, raw, means, stds, header=header, settings=config.to_dict())
    _print_tables(means, stds)
    print(f"\nwrote {', '.join(str(out / f) for f in files)} ({time.time() - started:.0f} s)")
    return 0


def _set_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of config ``cls`` given on the command line (for configs stored as override dicts)."""
    prefix = f"{cls.__name__}."
    return {key[len(prefix) :]: value for key, value in vars(args).items() if key.startswith(prefix)}


#: add-ons whose bench settings are given as JSON (their field names overlap the refiner's options)
_JSON_ADDONS = ("counterfactual", "invariance", "debias")


def _json_option(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"{option} must be a JSON object such as '{{\"weight\": 0.5}}'; got {text!r} ({error})."
        ) from None
    if not isinstance(value, dict):
        raise SystemExit(f"{option} must be a JSON object of config fields; got {text!r}.")
    return value


def _demo(args: argparse.Namespace) -> int:
    from .benchmark import BenchConfig

    # the three shift tasks (base-to-new on `textures`, the dataset where zero-shot is weakest), 100 AdamW steps
    # instead of the papers' schedules and small test sets keep the demo within 3 minutes on 2 cores; `bench`
    # runs every task and dataset with the papers' schedules
    config = BenchConfig(
        methods=_quick_methods(),
        seeds=[1],
        datasets=["textures"],
        steps=100,
        optimizer="adamw",
        lr=0.002,
        batch_size=32,
        test_per_class=10,
        tasks=["base_to_new", "spurious", "domain_generalization"],
        refiner={"train_steps": 150, "inner_steps": 2},
        counterfactual={"train_steps": 100, "proximity_search": 0, "proximity_weight": 0.5},
    )
    return _run_bench(args, config, "prompt_robust demo on the embedded world")


def _bench(args: argparse.Namespace) -> int:
    from .addons import ADDONS
    from .benchmark import BenchConfig

    if args.suite == "full":
        learners = ["coop", "cocoop", "vpt", "maple"]
        methods = ["zeroshot"] + learners + [f"{lr}+{a}" for lr in learners for a in sorted(ADDONS)]
    else:
        methods = _quick_methods()
    from .config import RefinerConfig

    refiner = _set_fields(RefinerConfig, args)
    seeds = list(range(1, args.seeds + 1))
    if args.suite in ("refiner-sweep", "refiner-cost"):
        return _bench_refiner(args, refiner, seeds)
    if args.suite == "calibration":
        return _bench_calibration(args, seeds)
    others = {name: _json_option(getattr(args, f"{name}_config"), f"--{name}-config") for name in _JSON_ADDONS}
    if args.suite == "mechanisms":
        return _bench_mechanisms(args, refiner, others, seeds)
    if args.suite in _FEATURE_SUITES:
        return _bench_features(args, others, seeds)
    # --methods, when given, wins over the suite's list
    config = dataclass_from_args(BenchConfig, args, methods=methods, seeds=seeds, refiner=refiner, **others)
    return _run_bench(args, config, f"prompt_robust benchmark ({args.suite} suite)")


#: suites on frozen features: suite -> (module, runner, formatter, add-on whose JSON config they take, file stem)
_FEATURE_SUITES = {
    "counterfactual-quality": (
        "counterfactual.bench",
        "counterfactual_quality_benchmark",
        "format_quality",
        "counterfactual",
        "quality",
    ),
    "icm": ("invariance.bench", "icm_dg_benchmark", "format_icm", "invariance", "icm"),
    "icm-grid": ("invariance.bench", "icm_grid_diagnostic", "format_icm_grid", "invariance", "icm_grid"),
}


def _bench_features(args: argparse.Namespace, others: dict[str, dict[str, Any]], seeds: list[int]) -> int:
    """The counterfactual-quality, ICM and ICM-grid suites (frozen features of the embedded world)."""
    from .config import RobustConfig

    module_name, run_name, format_name, addon, stem = _FEATURE_SUITES[args.suite]
    module = importlib.import_module(f".{module_name}", __package__)
    started = time.time()
    result = getattr(module, run_name)(
        _embedded_or_given(args.backbone),
        args.out,
        seeds=seeds,
        config=RobustConfig.nested[addon](**others[addon]),
        progress=not args.quiet,
    )
    print(getattr(module, format_name)(result))
    print(f"\nwrote {stem}.json, {stem}.md to {args.out} ({time.time() - started:.0f} s); command: {_command_line()}")
    return 0


def _bench_calibration(args: argparse.Namespace, seeds: list[int]) -> int:
    """The world's calibration against real CLIP's baseline behaviour (baselines only, no add-on)."""
    from .benchmark import BenchConfig
    from .calibration import calibration_benchmark, format_calibration

    started = time.time()
    bench = dataclass_from_args(BenchConfig, args, seeds=seeds)
    result = calibration_benchmark(
        _embedded_or_given(args.backbone),
        args.out,
        seeds=seeds,
        bench=bench,
        progress=not args.quiet,
        command=_command_line(),
    )
    print(format_calibration(result))
    counted = [row for row in result["targets"] if row["passed"] is not None]
    failed = [row["key"] for row in counted if not row["passed"]]
    print(
        f"\n{len(counted) - len(failed)} of {len(counted)} targets met"
        + (f"; missed: {', '.join(failed)}" if failed else "")
    )
    print(
        f"wrote calibration.json, calibration.md to {args.out} ({time.time() - started:.0f} s); command: {_command_line()}"
    )
    return 0


def _bench_mechanisms(
    args: argparse.Namespace, refiner: dict[str, Any], others: dict[str, dict[str, Any]], seeds: list[int]
) -> int:
    """Each add-on on a task where its premise holds: oracle headroom, learner, learner + add-on."""
    from .benchmark import BenchConfig
    from .mechanisms import format_mechanisms, mechanisms_benchmark

    started = time.time()
    refiner.pop("targets", None)  # the suite compares every target rule
    result = mechanisms_benchmark(
        _embedded_or_given(args.backbone),
        args.out,
        seeds=seeds,
        suites=args.mechanisms,
        bench=dataclass_from_args(BenchConfig, args, seeds=seeds),
        learner=args.learner,
        refiner=refiner,
        counterfactual=others["counterfactual"],
        invariance=others["invariance"],
        progress=not args.quiet,
        command=_command_line(),
    )
    print(format_mechanisms(result))
    print(
        f"wrote mechanisms.json, mechanisms.md to {args.out} ({time.time() - started:.0f} s); command: {_command_line()}"
    )
    return 0


def _bench_refiner(args: argparse.Namespace, refiner: dict[str, Any], seeds: list[int]) -> int:
    """The refiner's sampler steps sweep (embedded world) or cost profile (default: open_clip ViT-B-16, random)."""
    from .benchmark import BenchConfig
    from .config import RefinerConfig
    from .refiner import bench

    started = time.time()
    out = Path(args.out)
    if args.suite == "refiner-sweep":
        config = dataclass_from_args(
            BenchConfig, args, methods=[f"{args.learner}+refiner"], seeds=seeds, refiner=refiner, tasks=["base_to_new"]
        )
        result = bench.steps_sweep(
            _embedded_or_given(args.backbone),
            out,
            learner=args.learner,
            seeds=seeds,
            bench_config=config,
            progress=not args.quiet,
        )
        print(bench.format_sweep(result))
        files = "sweep.json, sweep.md, sweep.png"
    else:
        from .backbones import load_backbone

        backbone = load_backbone(args.backbone or "open_clip:ViT-B-16")
        result = bench.cost_profile(backbone, out, refiner=RefinerConfig(**refiner), progress=not args.quiet)
        print(bench.format_cost(result))
        files = "cost.json, cost.md"
    print(f"\nwrote {files} to {out} ({time.time() - started:.0f} s); command: {_command_line()}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import EMBEDDED_DIR, PretrainConfig, pretrain_backbone

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


def _dataset(args: argparse.Namespace, split: str, transform):
    from .data import loaders

    kind = args.dataset
    if kind == "coop":
        if not args.split_file or not args.image_dir:
            raise SystemExit("--dataset coop needs --split-file split_zhou_<Dataset>.json and --image-dir DIR")
        return loaders.load_coop_split(args.split_file, args.image_dir, split, transform=transform)
    if kind == "waterbirds":
        return loaders.load_waterbirds(args.root, split, transform=transform)
    if kind == "celeba":
        return loaders.load_celeba(args.root, args.target, args.spurious, split, transform=transform)
    dataset = loaders.load_domainbed(args.root, transform=transform)
    if not args.test_domains:
        raise SystemExit("--dataset domainbed needs --test-domains (the held-out domains)")
    train, tests = loaders.split_by_domain(dataset, args.test_domains)
    return train if split == "train" else tests


def _train(args: argparse.Namespace) -> int:
    from . import build_learner, wrap
    from .data.fewshot import sample_few_shot, save_split
    from .data.loaders import transform_for
    from .training import FitConfig, fit

    backbone = _embedded_or_given(args.backbone)
    data = _dataset(args, "train", transform_for(backbone))
    if args.k:
        indices = sample_few_shot(data.labels, args.k, args.seed)
        save_split(Path(args.out) / "split.json", indices, meta={"k": args.k, "seed": args.seed, "n_total": len(data)})
        data = data.subset(indices)
    from .config import RefinerConfig, RobustConfig

    adapter_dir = Path(args.out) / "adapter"
    if not args.overwrite and (adapter_dir / "adapter_config.json").exists():
        raise SystemExit(f"{adapter_dir} already holds an adapter; pass --overwrite or choose another --out.")
    settings = {name: _json_option(getattr(args, f"{name}_config"), f"--{name}-config") for name in _JSON_ADDONS}
    settings["refiner"] = _set_fields(RefinerConfig, args)
    robust = RobustConfig(**{name: RobustConfig.nested[name](**settings[name]) for name in args.addons or []})
    learner = build_learner(args.learner, backbone, data.classnames)
    model = wrap(learner, robust)
    config = dataclass_from_args(FitConfig, args, seed=args.seed)
    model.prepare_addons(data, seed=args.seed, cache_dir=Path(args.out) / "cache", progress=not args.quiet)
    result = fit(model, data, config, checkpoint_dir=Path(args.out) / "checkpoints")
    logs = {}
    if len(model.stages()) > 1:
        logs = model.fit_addons(
            data,
            seed=args.seed,
            cache_dir=Path(args.out) / "cache",
            checkpoint_dir=Path(args.out) / "checkpoints",
            progress=not args.quiet,
        )
    model.save_pretrained(adapter_dir, overwrite=args.overwrite)
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

    backbone = _embedded_or_given(args.backbone)
    model = RobustPromptModel.from_pretrained(args.adapter, backbone=backbone)
    sets = _dataset(args, "test", transform_for(backbone))
    sets = sets if isinstance(sets, dict) else {"test": sets}
    report = {}
    for name, data in sets.items():
        groups = "groups" if getattr(data, "groups", None) is not None else None
        metrics = evaluate(model, data, groups_key=groups)
        report[name] = {k: v for k, v in metrics.items() if k != "per_group"}
    print(json.dumps(report, indent=2))
    return 0


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        choices=["coop", "waterbirds", "celeba", "domainbed"],
        help="Layout of the dataset under --root (see docs/quickstart.md).",
    )
    parser.add_argument("--root", help="Dataset root (waterbirds, celeba, domainbed).")
    parser.add_argument("--split-file", help="split_zhou_<Dataset>.json (coop layout).")
    parser.add_argument("--image-dir", help="Image root of the split file (coop layout).")
    parser.add_argument("--target", default="Blond_Hair", help="CelebA target attribute.")
    parser.add_argument("--spurious", default="Male", help="CelebA spurious attribute.")
    parser.add_argument("--test-domains", nargs="+", help="DomainBed held-out domains.")
    parser.add_argument("--backbone", help="hf:<dir>, <dir> or open_clip:<model>:<weights>; default: embedded.")


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import BenchConfig
    from .config import RefinerConfig
    from .learners import LEARNERS
    from .pretrain import PretrainConfig
    from .training import FitConfig

    parser = argparse.ArgumentParser(
        prog="prompt-robust", description="Make CLIP prompt learners robust to distribution shift."
    )
    parser.add_argument("--version", action="version", version=f"prompt_robust {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bars.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="Compare zero-shot, CoOp and the add-ons on the embedded world.")
    demo.add_argument("--out", default="prompt_robust_demo", help="Output directory.")
    demo.add_argument("--backbone", help=argparse.SUPPRESS)
    demo.set_defaults(func=_demo)

    bench = commands.add_parser("bench", help="Every learner x add-on x task, mean ± std over seeds.")
    bench.add_argument(
        "--suite",
        choices=["quick", "full", "calibration", "mechanisms", "refiner-sweep", "refiner-cost", *_FEATURE_SUITES],
        default="quick",
        help="quick: zero-shot, CoOp, CoOp+each add-on; full: every learner x add-on; calibration: does the world "
        "reproduce real CLIP's baseline behaviour (zero-shot, linear probe, CoOp, CoCoOp vs targets); mechanisms: each "
        "add-on where its premise holds, against an oracle (LEARNER, default coop); refiner-sweep: sampler "
        "steps x solver for LEARNER+refiner; refiner-cost: images/s of CoOp, CoOp+refiner, CoCoOp on a real-size "
        "architecture (default backbone open_clip:ViT-B-16, random weights); icm: zero-shot / ICM zero-shot / linear "
        "probe / ICM linear probe on the DG task; icm-grid: every (λ, k) of the ICM rule's grid scored on the test "
        "styles (a diagnostic); counterfactual-quality: validity and proximity of counterfactuals.",
    )
    bench.add_argument("--learner", default="coop", help="Learner of the refiner sweep and the mechanism suites.")
    bench.add_argument(
        "--mechanisms",
        nargs="+",
        default=["refiner", "refiner-tpt", "counterfactual", "invariance"],
        choices=["refiner", "refiner-tpt", "counterfactual", "invariance"],
        help="Which mechanism suites --suite mechanisms runs (refiner-tpt: the refiner's label-free targets on "
        "domain generalisation, against test-time prompt tuning applied to every test image).",
    )
    for name in _JSON_ADDONS:
        bench.add_argument(
            f"--{name}-config", help=f"Settings of the +{name} methods as a JSON object of config fields."
        )
    bench.add_argument("--seeds", type=int, default=3, help="Number of seeds (1..N).")
    bench.add_argument("--out", default="prompt_robust_bench", help="Output directory.")
    bench.add_argument("--backbone", help="Backbone spec; default: the embedded mini-CLIP.")
    # the add-on settings dicts come as --<addon>-config JSON (and the refiner's fields as options), below
    add_dataclass_args(bench, BenchConfig, skip=("seeds", "refiner", "counterfactual", "invariance", "debias"))
    add_dataclass_args(bench, RefinerConfig)
    bench.set_defaults(func=_bench)

    pretrain = commands.add_parser("pretrain-backbone", help="Pretrain the mini-CLIP on the embedded world.")
    pretrain.add_argument("--out", help="Output directory (default: the package's embedded model directory).")
    pretrain.add_argument("--overwrite", action="store_true", help="Replace a model already saved there.")
    pretrain.add_argument("--checkpoint-dir", help="Resumable checkpoints (default: <out>.checkpoints).")
    add_dataclass_args(pretrain, PretrainConfig)
    pretrain.set_defaults(func=_pretrain)

    train = commands.add_parser("train", help="Tune a prompt learner on your dataset and save an adapter.")
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
    train.add_argument("--out", required=True, help="Run directory (checkpoints, split, adapter).")
    train.add_argument("--overwrite", action="store_true", help="Replace an adapter already saved there.")
    add_dataclass_args(train, FitConfig, skip=("seed",))
    add_dataclass_args(train, RefinerConfig)
    train.add_argument("--seed", type=int, default=1, help="Seed of the few-shot split, initialisation and training.")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="Evaluate a saved adapter on your dataset's test split.")
    _add_data_args(evaluate)
    evaluate.add_argument("--adapter", required=True, help="Adapter directory written by train.")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
