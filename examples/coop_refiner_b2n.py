"""CoOp + the prompt-space diffusion refiner on base-to-new: base / new accuracy and their harmonic mean, for the
learner alone and for the learner with its refiner.

The refiner (Prompt Diffusion, https://arxiv.org/abs/2410.20164; docs/refiner.md) stays off until it is trained,
so one model is evaluated twice: after prompt tuning (CoOp) and after ``model.fit_addons`` (CoOp + refiner).
Prompts are tuned on ``--k`` shots of each base class; the new classes are only seen at test time.

Runs as is on the embedded world with the shipped mini-CLIP (no downloads, ~2 min on one CPU thread):

    python examples/coop_refiner_b2n.py --out runs/coop_refiner

On a local CLIP checkpoint and a dataset in CoOp/Dassl's layout (the classes are split in half, base first, as
CoCoOp does):

    python examples/coop_refiner_b2n.py --backbone hf:/models/clip-vit-base-patch16 \\
        --split-file data/oxford_pets/split_zhou_OxfordPets.json --image-dir data/oxford_pets/images --out runs/pets

Every field of ``RefinerConfig`` is an option (``--train-steps``, ``--num-steps``, ``--hidden-dim``, ...).
The adapter (CoOp's prompt + the trained refiner, base class names) is saved to ``<out>/adapter``; an existing
adapter there is only replaced with ``--overwrite``.
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


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "split")  # --backbone, --split-file, --image-dir
    parser.add_argument("--k", type=int, default=16, help="Shots per base class.")
    add_run_args(  # --steps, --batch-size, --lr, --pool-per-class, --test-per-class, --seed, --out, ...
        parser,
        "split",
        seed_help="Few-shot draw, initialisation and training order.",
        out_default="runs/coop_refiner",
        out_help="Adapter, split, cache and results.json go here.",
    )
    add_dataclass_args(parser, pr.RefinerConfig)
    args = parser.parse_args(argv)
    out = check_args(parser, args, ["adapter"])

    backbone = pr.load_backbone(args.backbone)
    train, base_test, new_test, shots = base_to_new_data(backbone, args)
    save_shots(out / "split.json", shots, args, "embedded world (base-to-new)")

    torch.manual_seed(args.seed)  # the refiner's velocity network is initialised here
    learner = pr.build_learner("coop", backbone, train.classnames, ctx_init="a photo of a")
    model = pr.wrap(learner, pr.RobustConfig(refiner=dataclass_from_args(pr.RefinerConfig, args)))
    config = fit_config(args)
    fit(model, train, config)  # the prompt; the untrained refiner is off
    results = {"coop": base_new_accuracy(model, base_test, new_test)}
    logs = model.fit_addons(train, seed=args.seed, cache_dir=out / "cache", progress=not args.quiet)
    results["coop+refiner"] = base_new_accuracy(model, base_test, new_test)

    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    (out / "results.json").write_text(json.dumps({"results": results, "refiner_logs": logs}, indent=2) + "\n")
    print_base_new(results, args.k, args.seed)
    print(f"refiner final flow-matching loss {logs['refiner/final_loss']:.4f}; adapter in {out / 'adapter'}")
    return results


if __name__ == "__main__":
    main()
