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

from _data import add_data_args, add_run_args, check_args, few_shot_data, fit_config, save_shots  # examples/_data.py

import prompt_robust as pr
from prompt_robust.training import evaluate, fit


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "split")  # --backbone, --split-file, --image-dir
    parser.add_argument("--k", type=int, default=16, help="Shots per class.")
    parser.add_argument("--ctx-init", default="a photo of a", help="Words the context starts from.")
    add_run_args(  # --steps, --batch-size, --lr, --pool-per-class, --test-per-class, --seed, --out, ...
        parser,
        "split",
        steps=100,
        steps_help=None,
        out_default="runs/coop",
        out_help="Checkpoints, the split and the adapter go here.",
    )
    args = parser.parse_args(argv)
    out = check_args(parser, args, ["adapter"])

    backbone = pr.load_backbone(args.backbone)
    train, test, shots = few_shot_data(backbone, args)
    save_shots(out / "split.json", shots, args, "embedded world (few-shot)")
    model = pr.wrap(pr.build_learner("coop", backbone, train.classnames, ctx_init=args.ctx_init), pr.RobustConfig())

    before = evaluate(model, test)["accuracy"]
    config = fit_config(args, checkpoint_every=max(1, args.steps // 4))
    fit(model, train, config, checkpoint_dir=out / "checkpoints")
    after = evaluate(model, test)["accuracy"]
    model.save_pretrained(out / "adapter", overwrite=args.overwrite)
    results = {"before": before, "after": after}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"test accuracy: {before:.3f} before training, {after:.3f} after; adapter in {out / 'adapter'}")
    return results


if __name__ == "__main__":
    main()
