"""Train a wrapped prompt learner with ``transformers.Trainer``: the ``RobustCallback`` schedules the add-ons and
saves adapter files, ``robust_metrics`` reports accuracy, worst-group accuracy and the gap (docs/trainer.md).

CoOp + annotation-free debiasing + refiner (``--addons``, both by default). At the start the callback
pseudo-labels the spurious attribute from its values in words (``--attribute-values``) and the loss reweights
the (class, pseudo-attribute) groups. The prompt is tuned for ``--addon-start-step`` steps, then the callback
trains the refiner (``model.fit_addons``), and the Trainer goes on tuning the prompt with the refiner active. The wrapped model's
forward returns the complete loss, so the Trainer needs no custom ``compute_loss``; the batches keep their
``groups`` (``remove_unused_columns=False``) and the metrics receive them (``label_names``).

Runs as is on the embedded world's spurious task (Waterbirds-like: 95% of a class on its habitat background in
training, every (class, background) group equally large in test) with the shipped mini-CLIP (no downloads,
~1.5 min on one CPU thread):

    python examples/trainer_recipe.py --out runs/trainer

On a local CLIP checkpoint and Waterbirds as distributed (``<root>/metadata.csv`` and the images):

    python examples/trainer_recipe.py --backbone hf:/models/clip-vit-base-patch16 \\
        --root data/waterbird_complete95_forest2water2 --out runs/trainer_wb

Resume an interrupted run from its last Trainer checkpoint with ``--resume``; the debias group statistics are
restored with it. Every field of ``RefinerConfig`` is
an option (``--train-steps``, ``--num-steps``, ...). The adapter is saved to ``<out>/robust_adapter`` (and into
every ``checkpoint-<step>/``); a folder that already holds a run is only reused with ``--resume`` or
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from _data import add_data_args, add_run_args  # examples/_data.py

import prompt_robust as pr
from prompt_robust.bench.tasks import SPURIOUS_BACKGROUNDS, WorldTasks
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.data import load_waterbirds, transform_for
from prompt_robust.integrations.trainer import ADAPTER_SUBDIR, RobustCallback, robust_metrics

#: the spurious attribute's values in words: Waterbirds' places, in the loader's attribute order
WATERBIRDS_VALUES = ["land background", "water background"]


def group_data(args: argparse.Namespace, backbone: pr.ClipBackbone):
    """(training set, evaluation set), both with ``groups`` (class x background) and ``group_names``."""
    if args.root:
        transform = transform_for(backbone)
        return load_waterbirds(args.root, "train", transform=transform), load_waterbirds(
            args.root, args.eval_split, transform=transform
        )
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=args.test_per_class)
    return tasks.spurious_train(args.train_per_class, args.seed), tasks.spurious_test()


def readable(metrics: dict[str, float], group_names: list[str]) -> dict[str, float]:
    """The Trainer's ``eval_*`` metrics with group ids replaced by the groups' names."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("eval_group_") and key.endswith("_accuracy"):
            key = "eval_group/" + group_names[int(key[len("eval_group_") : -len("_accuracy")])]
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "waterbirds")  # --backbone, --root
    parser.add_argument("--eval-split", default="test", choices=["val", "test"], help="Waterbirds evaluation split.")
    parser.add_argument("--max-steps", type=int, default=200, help="Optimizer steps of the Trainer.")
    parser.add_argument("--addon-start-step", type=int, default=100, help="Prompt warm-up before fit_addons.")
    parser.add_argument("--save-steps", type=int, default=100, help="Trainer checkpoint every this many steps.")
    add_run_args(  # --batch-size, --lr, --train-per-class, --test-per-class, --seed, --out, --resume, ...
        parser,
        "waterbirds",
        steps=None,  # the Trainer's --max-steps
        seed_help="Training draw, initialisation and data order.",
        out_default="runs/trainer",
        out_help="The Trainer's output_dir.",
        resume_help="Resume from the last checkpoint in --out.",
        overwrite_help="Start afresh in an --out that holds a run (its files are written over).",
    )
    parser.add_argument(
        "--addons", nargs="+", default=["debias", "refiner"], choices=["debias", "refiner"], help="Add-ons to wrap."
    )
    parser.add_argument(
        "--attribute-values",
        nargs="+",
        help="The spurious attribute's values in words, for debias (default: the embedded world's backgrounds, or "
        f"{' / '.join(WATERBIRDS_VALUES)} with --root).",
    )
    add_dataclass_args(parser, pr.RefinerConfig)
    args = parser.parse_args(argv)
    out = Path(args.out)
    previous = (out / ADAPTER_SUBDIR).exists() or any(out.glob("checkpoint-*"))
    if previous and not (args.resume or args.overwrite):
        parser.error(f"{out} already holds a Trainer run; pass --resume to continue it, --overwrite to start afresh.")
    if args.resume and not any(out.glob("checkpoint-*")):
        parser.error(f"--resume: {out} holds no checkpoint-* folder to resume from.")

    backbone = pr.load_backbone(args.backbone)
    train, test = group_data(args, backbone)
    torch.manual_seed(args.seed)  # the refiner's velocity network is initialised here
    learner = pr.build_learner("coop", backbone, train.classnames, ctx_init="a photo of a")
    values = args.attribute_values or (WATERBIRDS_VALUES if args.root else list(SPURIOUS_BACKGROUNDS))
    config = pr.RobustConfig(
        refiner=dataclass_from_args(pr.RefinerConfig, args) if "refiner" in args.addons else None,
        debias=pr.DebiasConfig(attribute_values=values) if "debias" in args.addons else None,
    )
    model = pr.wrap(learner, config)
    training_args = transformers.TrainingArguments(
        output_dir=str(out),
        remove_unused_columns=False,  # keep "groups" in the batches
        label_names=["labels", "groups"],  # robust_metrics receives (labels, groups)
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.max_steps // 10),
        seed=args.seed,
        report_to=[],
        disable_tqdm=args.quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callback = RobustCallback(train, addon_start_step=args.addon_start_step)
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=robust_metrics,
        callbacks=[callback],
    )
    results = {}
    if not args.resume:
        results["before training"] = readable(trainer.evaluate(), test.group_names)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    results["after training"] = readable(trainer.evaluate(), test.group_names)

    record = {"results": results, "addon_logs": callback.logs, "global_step": trainer.state.global_step}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    methods = " + ".join(["CoOp", *sorted(args.addons)])
    print(f"transformers.Trainer, {methods}, {trainer.state.global_step} steps, seed {args.seed} (accuracy)")
    print(f"{'':16s} {'avg':>6s} {'worst':>6s} {'gap':>6s}")
    for name, metrics in results.items():
        values = [metrics[f"eval_{key}"] for key in ("accuracy", "worst_group_accuracy", "gap")]
        print(f"{name:16s} " + " ".join(f"{value:6.3f}" for value in values))
    groups = {k[len("eval_group/") :]: v for k, v in results["after training"].items() if k.startswith("eval_group/")}
    print("per group after training: " + ", ".join(f"{name} {acc:.3f}" for name, acc in groups.items()))
    print(f"adapter in {out / ADAPTER_SUBDIR}; Trainer checkpoints in {out}/checkpoint-*")
    return record


if __name__ == "__main__":
    main()
