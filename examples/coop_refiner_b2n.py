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
from pathlib import Path

import torch
from _data import base_new_accuracy, base_to_new_data  # examples/_data.py

import prompt_robust as pr
from prompt_robust.cli import add_dataclass_args, dataclass_from_args
from prompt_robust.data import save_split
from prompt_robust.training import FitConfig, fit


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded", help="embedded, hf:<dir> or open_clip:<model>:<weights>.")
    parser.add_argument("--split-file", help="CoOp/Dassl split_zhou_<Dataset>.json; default: the embedded world.")
    parser.add_argument("--image-dir", help="Image root the split file's paths are relative to.")
    parser.add_argument("--k", type=int, default=16, help="Shots per base class.")
    parser.add_argument("--steps", type=int, default=200, help="Prompt-tuning steps (AdamW, cosine decay).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-per-class", type=int, default=32, help="Embedded world: images the shots come from.")
    parser.add_argument("--test-per-class", type=int, default=50, help="Embedded world: test images per class.")
    parser.add_argument("--seed", type=int, default=1, help="Few-shot draw, initialisation and training order.")
    parser.add_argument("--out", default="runs/coop_refiner", help="Adapter, split, cache and results.json go here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an adapter already saved in --out.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    add_dataclass_args(parser, pr.RefinerConfig)
    args = parser.parse_args(argv)
    if bool(args.split_file) != bool(args.image_dir):
        parser.error("--split-file and --image-dir go together.")
    out = Path(args.out)
    if (out / "adapter" / "adapter_config.json").exists() and not args.overwrite:
        parser.error(f"{out / 'adapter'} already holds an adapter; pass --overwrite or choose another --out.")

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

    torch.manual_seed(args.seed)  # the refiner's velocity network is initialised here
    learner = pr.build_learner("coop", backbone, train.classnames, ctx_init="a photo of a")
    model = pr.wrap(learner, pr.RobustConfig(refiner=dataclass_from_args(pr.RefinerConfig, args)))
    config = FitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        warmup_steps=min(10, args.steps // 10),
        seed=args.seed,
        progress=not args.quiet,
    )
    fit(model, train, config)  # the prompt; the untrained refiner is off
    results = {"coop": base_new_accuracy(model, base_test, new_test)}
    logs = model.fit_addons(train, seed=args.seed, cache_dir=out / "cache", progress=not args.quiet)
    results["coop+refiner"] = base_new_accuracy(model, base_test, new_test)

    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    (out / "results.json").write_text(json.dumps({"results": results, "refiner_logs": logs}, indent=2) + "\n")
    print(f"base-to-new, {args.k} shots per base class, seed {args.seed} (accuracy)")
    print(f"{'method':14s} {'base':>6s} {'new':>6s} {'hm':>6s}")
    for method, values in results.items():
        print(f"{method:14s} " + " ".join(f"{values[key]:6.3f}" for key in ("base", "new", "hm")))
    print(f"refiner final flow-matching loss {logs['refiner/final_loss']:.4f}; adapter in {out / 'adapter'}")
    return results


if __name__ == "__main__":
    main()
