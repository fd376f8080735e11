"""MaPLe + the counterfactual contrastive regularizer on base-to-new, against bare MaPLe.

The regularizer (DiCap, https://arxiv.org/abs/2507.19882; docs/counterfactual.md) needs a generative model of the
training images' features before the prompt is tuned: ``model.prepare_addons(train)`` fits it, then ``fit``
tunes the prompt with ``CE + weight * InfoNCE(t_y; z, z')`` against counterfactual features ``z'``. Bare MaPLe
is trained with the same seed, data and schedule, so the two rows differ by the regularizer only.

Runs as is on the embedded world with the shipped mini-CLIP (no downloads, ~2 min on one CPU thread):

    python examples/maple_counterfactual.py --out runs/maple_cf

On a local CLIP checkpoint and a dataset in CoOp/Dassl's layout (classes split in half, base first):

    python examples/maple_counterfactual.py --backbone hf:/models/clip-vit-base-patch16 \\
        --split-file data/oxford_pets/split_zhou_OxfordPets.json --image-dir data/oxford_pets/images --out runs/pets

Every field of ``CounterfactualConfig`` is an option (``--weight``, ``--train-steps``, ``--guidance-scale``,
...). Both adapters are saved, ``<out>/maple`` and ``<out>/maple_counterfactual`` (prompt + feature flow);
existing adapters there are only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _data import base_new_accuracy, base_to_new_data  # examples/_data.py

import prompt_robust as pr
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.data import save_split
from prompt_robust.training import FitConfig, fit

ADAPTERS = {"maple": "maple", "maple+counterfactual": "maple_counterfactual"}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded", help="embedded, hf:<dir> or open_clip:<model>:<weights>.")
    parser.add_argument("--split-file", help="CoOp/Dassl split_zhou_<Dataset>.json; default: the embedded world.")
    parser.add_argument("--image-dir", help="Image root the split file's paths are relative to.")
    parser.add_argument("--k", type=int, default=16, help="Shots per base class.")
    parser.add_argument("--maple-depth", type=int, default=3, help="MaPLe's prompted layers (<= the towers' depth).")
    parser.add_argument("--steps", type=int, default=200, help="Prompt-tuning steps (AdamW, cosine decay).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-per-class", type=int, default=32, help="Embedded world: images the shots come from.")
    parser.add_argument("--test-per-class", type=int, default=50, help="Embedded world: test images per class.")
    parser.add_argument("--seed", type=int, default=1, help="Few-shot draw, initialisation and training order.")
    parser.add_argument("--out", default="runs/maple_cf", help="Adapters, split, cache and results.json go here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace adapters already saved in --out.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    add_dataclass_args(parser, pr.CounterfactualConfig)
    args = parser.parse_args(argv)
    if bool(args.split_file) != bool(args.image_dir):
        parser.error("--split-file and --image-dir go together.")
    out = Path(args.out)
    for name in ADAPTERS.values():
        if (out / name / "adapter_config.json").exists() and not args.overwrite:
            parser.error(f"{out / name} already holds an adapter; pass --overwrite or choose another --out.")

    backbone = pr.load_backbone(args.backbone)
    train, base_test, new_test, shots = base_to_new_data(
        backbone,
        k=args.k,
        seed=args.seed,
        split_file=args.split_file,
        image_dir=args.image_dir,
        pool_per_class=args.pool_per_class,
        test_per_class=args.test_per_class,
    )
    meta = {"dataset": args.split_file or "embedded world (base-to-new)", "k": args.k, "seed": args.seed}
    save_split(out / "split.json", shots, meta=meta, overwrite=args.overwrite)
    counterfactual = dataclass_from_args(pr.CounterfactualConfig, args)
    config = FitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        warmup_steps=min(10, args.steps // 10),
        seed=args.seed,
        progress=not args.quiet,
    )

    results, logs = {}, {}
    for method, folder in ADAPTERS.items():
        torch.manual_seed(args.seed)  # the same MaPLe initialisation for both
        learner = pr.build_learner("maple", backbone, train.classnames, ctx_init="a photo of a", depth=args.maple_depth)
        robust = pr.RobustConfig(counterfactual=counterfactual if method.endswith("counterfactual") else None)
        model = pr.wrap(learner, robust)
        # fits the feature flow before the prompt is tuned (nothing to do for bare MaPLe)
        logs.update(model.prepare_addons(train, seed=args.seed, cache_dir=out / "cache", progress=not args.quiet))
        fit(model, train, config)
        results[method] = base_new_accuracy(model, base_test, new_test)
        model.save_pretrained(out / folder, overwrite=args.overwrite)

    (out / "results.json").write_text(json.dumps({"results": results, "prepare_logs": logs}, indent=2) + "\n")
    print(f"base-to-new, {args.k} shots per base class, seed {args.seed} (accuracy)")
    print(f"{'method':22s} {'base':>6s} {'new':>6s} {'hm':>6s}")
    for method, values in results.items():
        print(f"{method:22s} " + " ".join(f"{values[key]:6.3f}" for key in ("base", "new", "hm")))
    print(f"adapters in {out / 'maple'} and {out / 'maple_counterfactual'}")
    return results


if __name__ == "__main__":
    main()
