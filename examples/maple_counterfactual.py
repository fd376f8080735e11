"""MaPLe + the counterfactual contrastive regularizer on base-to-new, against bare MaPLe.

The regularizer (DiCap, https://arxiv.org/abs/2507.19882; docs/counterfactual.md) needs a generative model of the
training images' features before the prompt is tuned: ``model.fit_addons(train, phase="before_prompt")`` fits it, then ``fit``
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

import torch
from _data import (
    add_data_args,
    add_run_args,
    base_new_accuracy,
    base_to_new_data,
    check_args,
    fit_config,
    print_base_new,
    save_shots,
)

import prompt_robust as pr
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.training import fit

ADAPTERS = {"maple": "maple", "maple+counterfactual": "maple_counterfactual"}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "split")  # --backbone, --split-file, --image-dir
    parser.add_argument("--k", type=int, default=16, help="Shots per base class.")
    parser.add_argument("--maple-depth", type=int, default=3, help="MaPLe's prompted layers (<= the towers' depth).")
    add_run_args(  # --steps, --batch-size, --lr, --pool-per-class, --test-per-class, --seed, --out, ...
        parser,
        "split",
        seed_help="Few-shot draw, initialisation and training order.",
        out_default="runs/maple_cf",
        out_help="Adapters, split, cache and results.json go here.",
        overwrite_help="Replace adapters already saved in --out.",
    )
    add_dataclass_args(parser, pr.CounterfactualConfig)
    args = parser.parse_args(argv)
    out = check_args(parser, args, ADAPTERS.values())

    backbone = pr.load_backbone(args.backbone)
    train, base_test, new_test, shots = base_to_new_data(backbone, args)
    save_shots(out / "split.json", shots, args, "embedded world (base-to-new)")
    counterfactual = dataclass_from_args(pr.CounterfactualConfig, args)
    config = fit_config(args)

    results, logs = {}, {}
    for method, folder in ADAPTERS.items():
        torch.manual_seed(args.seed)  # the same MaPLe initialisation for both
        learner = pr.build_learner("maple", backbone, train.classnames, ctx_init="a photo of a", depth=args.maple_depth)
        robust = pr.RobustConfig(counterfactual=counterfactual if method.endswith("counterfactual") else None)
        model = pr.wrap(learner, robust)
        # fits the feature flow before the prompt is tuned (nothing to do for bare MaPLe)
        logs.update(
            model.fit_addons(
                train, phase="before_prompt", seed=args.seed, cache_dir=out / "cache", progress=not args.quiet
            )
        )
        fit(model, train, config)
        results[method] = base_new_accuracy(model, base_test, new_test)
        model.save_pretrained(out / folder, overwrite=args.overwrite)

    (out / "results.json").write_text(json.dumps({"results": results, "prepare_logs": logs}, indent=2) + "\n")
    print_base_new(results, args.k, args.seed)
    print(f"adapters in {out / 'maple'} and {out / 'maple_counterfactual'}")
    return results


if __name__ == "__main__":
    main()
