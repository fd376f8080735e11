"""Annotation-free debiasing (DPT) of prompt tuning on a Waterbirds-like task, and its baselines: average and
worst-group accuracy, their gap, and how well zero-shot pseudo-labels recover the spurious attribute.

``--mode pseudo`` (the default; DPT, https://arxiv.org/abs/2503.08368, docs/debias.md) names the spurious
attribute in words only (``--attribute-values``); zero-shot CLIP labels every training image with one of them and
the loss reweights the (class, pseudo-attribute) groups. The baselines: ``erm`` (no add-on), ``oracle`` (true
groups, w ~ 1/N_g), ``groupdro`` (true groups, online group DRO) and ``jtt`` (a short ERM run's errors
upweighted).

Runs as is on the embedded world's spurious task with the shipped mini-CLIP (no downloads, ~20 s on one CPU
thread):

    python examples/debias_waterbirds.py --out runs/debias

On a local CLIP checkpoint and Waterbirds as distributed (``<root>/metadata.csv`` and the images):

    python examples/debias_waterbirds.py --backbone hf:/models/clip-vit-base-patch16 \\
        --root data/waterbird_complete95_forest2water2 --k 64 --out runs/waterbirds

Every other field of ``DebiasConfig`` is an option (``--eta``, ``--groupdro-step``, ``--jtt-upweight``, ...).
The adapter is saved to ``<out>/adapter`` (it holds the prompt only: the add-on acts in training); an existing
adapter there is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from _data import add_data_args, add_run_args, check_args, fit_config  # examples/_data.py

import prompt_robust as pr
import prompt_robust.addons.debias as db
from prompt_robust.attributes import pseudo_label_accuracy
from prompt_robust.bench.runner import LEARNER_SETTINGS
from prompt_robust.bench.tasks import SPURIOUS_BACKGROUNDS, WorldTasks
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.data import load_waterbirds, sample_few_shot, transform_for
from prompt_robust.training import evaluate, fit

MODES = ("pseudo", "oracle", "groupdro", "jtt", "erm")
#: Waterbirds' places in the loader's attribute order (land = 0, water = 1)
WATERBIRDS_VALUES = ["land background", "water background"]


def spurious_data(args: argparse.Namespace, backbone: pr.ClipBackbone):
    """(training set, test set, true attribute of each training image, default attribute words)."""
    if args.root:
        transform = transform_for(backbone)
        train = load_waterbirds(args.root, "train", transform=transform)
        test = load_waterbirds(args.root, args.test_split, transform=transform)
        if args.k:
            train = train.subset(sample_few_shot(train.labels, args.k, args.seed, allow_fewer=True))
        return train, test, train.attributes, WATERBIRDS_VALUES
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, test_per_class=args.test_per_class)
    train = tasks.spurious_train(args.train_per_class, args.seed)
    # group = class * n_backgrounds + background
    return train, tasks.spurious_test(), train.groups % len(SPURIOUS_BACKGROUNDS), list(SPURIOUS_BACKGROUNDS)


def group_metrics(model: pr.RobustPromptModel, test) -> dict:
    """Average, worst-group accuracy, gap and the accuracy of every (class, attribute) group by name."""
    metrics = evaluate(model, test, groups_key="groups")
    per_group = {test.group_names[int(g)]: acc for g, acc in sorted(metrics["per_group"].items())}
    return {"avg": metrics["accuracy"], "worst_group": metrics["worst_group"], "gap": metrics["gap"], **per_group}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "waterbirds")  # --backbone, --root
    parser.add_argument("--test-split", default="test", choices=["val", "test"], help="Waterbirds evaluation split.")
    parser.add_argument("--k", type=int, default=None, help="Waterbirds: shots per class (default: the whole split).")
    parser.add_argument("--mode", default="pseudo", choices=MODES, help="pseudo (DPT) or a baseline.")
    parser.add_argument("--learner", default="coop", choices=[n for n in pr.LEARNERS if n != "zeroshot"])
    parser.add_argument("--steps", type=int, default=200, help="Prompt-tuning steps (AdamW, cosine decay).")
    parser.add_argument("--jtt-steps", type=int, default=60, help="Steps of JTT's ERM identification run.")
    add_run_args(  # --batch-size, --lr, --train-per-class, --test-per-class, --seed, --out, --overwrite, --quiet
        parser,
        "waterbirds",
        steps=None,  # --steps and --jtt-steps above
        seed_help="Training draw, initialisation and training order.",
        out_default="runs/debias",
        out_help="The adapter and results.json go here.",
    )
    add_dataclass_args(parser, pr.DebiasConfig, skip=("mode", "batch_size", "log_every"))
    args = parser.parse_args(argv)
    out = check_args(parser, args, ["adapter"])

    backbone = pr.load_backbone(args.backbone)
    train, test, true_attribute, default_values = spurious_data(args, backbone)
    config = fit_config(args)

    def build(robust: pr.RobustConfig) -> pr.RobustPromptModel:
        torch.manual_seed(args.seed)
        return pr.wrap(
            pr.build_learner(args.learner, backbone, train.classnames, **LEARNER_SETTINGS[args.learner]), robust
        )

    debias = None
    if args.mode != "erm":
        debias = dataclass_from_args(pr.DebiasConfig, args, mode=args.mode, attribute_values=default_values)
    model = build(pr.RobustConfig(debias=debias))
    results = {"initial prompt": group_metrics(model, test)}
    data = train
    if args.mode == "jtt":
        erm = build(pr.RobustConfig())
        fit(erm, train, dataclasses.replace(config, steps=args.jtt_steps, warmup_steps=0))  # JTT's stage 1
        model.addons["debias"].set_error_set(db.jtt_error_set(erm, train, progress=not args.quiet))
    if args.mode in ("pseudo", "jtt"):
        data = db.with_index(train)  # pseudo: the labels computed in prepare are looked up; jtt: needs the index
    logs = model.fit_addons(train, phase="before_prompt", seed=args.seed, progress=not args.quiet)
    fit(model, data, config)
    results["after training"] = group_metrics(model, test)
    pseudo_accuracy = None
    if args.mode == "pseudo":
        pseudo_accuracy = pseudo_label_accuracy(model.addons["debias"].pseudo_labels, true_attribute)

    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    record = {"mode": args.mode, "results": results, "pseudo_label_accuracy": pseudo_accuracy, "prepare_logs": logs}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.learner} + {args.mode}, seed {args.seed}, {len(train)} training images (accuracy)")
    print(f"{'':16s} {'avg':>6s} {'worst':>6s} {'gap':>6s}")
    for name, values in results.items():
        print(f"{name:16s} " + " ".join(f"{values[key]:6.3f}" for key in ("avg", "worst_group", "gap")))
    groups = {k: v for k, v in results["after training"].items() if k not in ("avg", "worst_group", "gap")}
    print("per group after training: " + ", ".join(f"{name} {acc:.3f}" for name, acc in groups.items()))
    if pseudo_accuracy is not None:
        words = ", ".join(model.config.debias.attribute_values)
        print(f"pseudo-label accuracy against the true attribute ({words}): {pseudo_accuracy:.3f}")
    print(f"adapter in {out / 'adapter'}")
    return record


if __name__ == "__main__":
    main()
