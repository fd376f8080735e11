"""Train CoOp with `prompt_robust.fit` on the embedded world and save it as an adapter.

Runs as is with the shipped mini-CLIP (no downloads, ~25 s on one CPU thread): CoOp on --k shots of each of the
embedded world's 24 classes (photo style), tested on held-out photos. Training writes resumable checkpoints to
<out>/checkpoints: run the same command again after an interruption and it continues from the latest one.

    python examples/train_coop.py --out runs/coop

On a local CLIP checkpoint and a dataset in CoOp/Dassl's layout (the train split for the shots, the test split
for evaluation):

    python examples/train_coop.py --backbone hf:/models/clip-vit-base-patch16 \\
        --split-file data/oxford_pets/split_zhou_OxfordPets.json --image-dir data/oxford_pets/images --out runs/pets

The adapter is saved to <out>/adapter; an existing adapter there is only replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _data import few_shot_data  # examples/_data.py

import prompt_robust as pr
from prompt_robust.data import save_split
from prompt_robust.training import FitConfig, evaluate, fit


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded", help="embedded, hf:<dir> or open_clip:<model>:<weights>.")
    parser.add_argument("--split-file", help="CoOp/Dassl split_zhou_<Dataset>.json; default: the embedded world.")
    parser.add_argument("--image-dir", help="Image root the split file's paths are relative to.")
    parser.add_argument("--k", type=int, default=16, help="Shots per class.")
    parser.add_argument("--ctx-init", default="a photo of a", help="Words the context starts from.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-per-class", type=int, default=32, help="Embedded world: images the shots come from.")
    parser.add_argument("--test-per-class", type=int, default=50, help="Embedded world: test images per class.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/coop", help="Checkpoints, the split and the adapter go here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an adapter already saved in --out.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    if bool(args.split_file) != bool(args.image_dir):
        parser.error("--split-file and --image-dir go together.")
    out = Path(args.out)
    if (out / "adapter" / "adapter_config.json").exists() and not args.overwrite:
        parser.error(f"{out / 'adapter'} already holds an adapter; pass --overwrite or choose another --out.")

    backbone = pr.load_backbone(args.backbone)
    train, test, shots = few_shot_data(
        backbone,
        k=args.k,
        seed=args.seed,
        split_file=args.split_file,
        image_dir=args.image_dir,
        pool_per_class=args.pool_per_class,
        test_per_class=args.test_per_class,
    )
    meta = {"dataset": args.split_file or "embedded world (few-shot)", "k": args.k, "seed": args.seed}
    save_split(out / "split.json", shots, meta=meta, overwrite=args.overwrite)
    model = pr.wrap(pr.build_learner("coop", backbone, train.classnames, ctx_init=args.ctx_init), pr.RobustConfig())

    before = evaluate(model, test)["accuracy"]
    config = FitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        warmup_steps=min(10, args.steps // 10),
        seed=args.seed,
        checkpoint_every=max(1, args.steps // 4),
        progress=not args.quiet,
    )
    fit(model, train, config, checkpoint_dir=out / "checkpoints")
    after = evaluate(model, test)["accuracy"]
    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    results = {"before": before, "after": after}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"test accuracy: {before:.3f} before training, {after:.3f} after; adapter in {out / 'adapter'}")
    return results


if __name__ == "__main__":
    main()
