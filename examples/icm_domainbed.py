"""CLIP-ICM on leave-domains-out generalisation: zero-shot, ICM zero-shot, linear probe and ICM linear probe on
each unseen domain and their average.

ICM (https://arxiv.org/abs/2405.15289; docs/invariance.md) pairs every training image with intervened copies
(colour jitter, grayscale, blur, ...) and keeps the feature directions those interventions do not move:
``P`` = top-k eigenvectors of ``ZᵀZ/n − λ·ΔᵀΔ/m``. ``λ`` and ``k`` are chosen on held-out *training* images
unless given (``--lam``, ``--dim``). Zero-shot CLIP wrapped with the ``invariance`` add-on is the ICM zero-shot
predictor; ``model.fit_addons(train, phase="before_prompt")`` fits it, and its adapter (the projection) is what gets saved.

Runs as is on the embedded world's domain-generalisation task (train: photo; test: sketch, painting, pixel) with
the shipped mini-CLIP (no downloads, ~10 s on one CPU thread):

    python examples/icm_domainbed.py --out runs/icm

On a local CLIP checkpoint and a DomainBed dataset (``<root>/<domain>/<class>/<image>``, e.g. PACS):

    python examples/icm_domainbed.py --backbone hf:/models/clip-vit-base-patch16 --root data/PACS \\
        --test-domain sketch --k 16 --out runs/pacs_sketch

Every field of ``InvarianceConfig`` is an option (``--lam``, ``--dim``, ``--interventions``, ...). The adapter
is saved to ``<out>/adapter``; an existing adapter there is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json

import torch
from _data import add_data_args, add_run_args, check_args, world_tasks  # examples/_data.py
from torch.utils.data import DataLoader

import prompt_robust as pr
from prompt_robust.addons.invariance import compare_predictors
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.data import load_domainbed, sample_few_shot, split_by_domain, transform_for

PREDICTORS = ("zero_shot", "icm_zero_shot", "linear_probe", "icm_linear_probe")


def domain_data(args: argparse.Namespace, backbone: pr.ClipBackbone):
    """(k-shot training set of the training domains, {unseen domain: test set}, class names for the prompts)."""
    if args.root:
        dataset = load_domainbed(args.root, transform=transform_for(backbone))
        train, tests = split_by_domain(dataset, args.test_domain)
        if args.k:
            train = train.subset(sample_few_shot(train.labels, args.k, args.seed, allow_fewer=True))
        # folder names such as "Alarm_Clock" read better in a prompt as "Alarm Clock"
        return train, tests, [name.replace("_", " ") for name in dataset.classnames]
    tasks = world_tasks(backbone, args)
    train, _ = tasks.dg_train(args.k, args.seed)
    return train, tasks.dg_test(), train.classnames


@torch.no_grad()
def image_features(learner: pr.PromptLearner, dataset, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-free image features ``(n, d)`` and labels ``(n,)`` of a dataset, a batch at a time."""
    features, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        features.append(learner.image_features(batch["pixel_values"]))
        labels.append(torch.as_tensor(batch["labels"]))
    return torch.cat(features), torch.cat(labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "domainbed")  # --backbone, --root, --test-domain
    parser.add_argument("--k", type=int, default=16, help="Shots per class (DomainBed: 0 = every training image).")
    add_run_args(  # no training: --pool-per-class, --test-per-class, --seed, --out, --overwrite, --quiet
        parser,
        "domainbed",
        steps=None,
        lr=None,
        seed_help="Few-shot draw, interventions and held-out split.",
        out_default="runs/icm",
        out_help="The adapter, feature cache and results.json go here.",
    )
    add_dataclass_args(parser, pr.InvarianceConfig)
    args = parser.parse_args(argv)
    out = check_args(parser, args, ["adapter"])

    backbone = pr.load_backbone(args.backbone)
    train, tests, classnames = domain_data(args, backbone)
    config = dataclass_from_args(pr.InvarianceConfig, args)
    learner = pr.build_learner("zeroshot", backbone, classnames)
    model = pr.wrap(learner, pr.RobustConfig(invariance=config))
    # interventional pairs, λ/k on held-out training images, the projection
    logs = model.fit_addons(
        train, phase="before_prompt", seed=args.seed, cache_dir=out / "cache", progress=not args.quiet
    )

    train_features, train_labels = image_features(learner, train)
    test_features = {name: image_features(learner, data) for name, data in tests.items()}
    with torch.no_grad():
        text = learner.text_features()  # (n_cls, d): "a photo of a {}.", as the wrapped model uses
    scores = compare_predictors(
        train_features,
        train_labels,
        model.addons["invariance"].icm(),
        text,
        test_features,
        probe_reg=config.probe_reg,
    )
    for values in scores.values():
        values["avg"] = sum(values[name] for name in tests) / len(tests)

    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    record = {"results": scores, "lam": logs["invariance/lam"], "dim": int(logs["invariance/dim"]), "logs": logs}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    columns = [*tests, "avg"]
    print(f"unseen domains, {len(train)} training images, seed {args.seed} (accuracy)")
    print(f"{'predictor':18s} " + " ".join(f"{name:>9s}" for name in columns))
    for predictor in PREDICTORS:
        print(f"{predictor:18s} " + " ".join(f"{scores[predictor][name]:9.3f}" for name in columns))
    print(f"chosen on held-out training images: λ {record['lam']:g} (relative), k {record['dim']} of {text.shape[1]}")
    print(f"adapter (zero-shot CLIP + ICM projection) in {out / 'adapter'}")
    return record


if __name__ == "__main__":
    main()
