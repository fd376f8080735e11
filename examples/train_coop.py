"""Train CoOp with `prompt_robust.fit` and save it as an adapter.

Runs as is on a tiny in-process CLIP and a synthetic colour task (no downloads); pass --backbone with a local
transformers CLIP directory (or open_clip:<model>:<weights.safetensors>) to use a real model — then the images
are synthetic too, so this only shows the mechanics. The embedded benchmark world replaces the synthetic task
once it ships.

    python examples/train_coop.py --out runs/coop
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import TensorDataset

import prompt_robust as pr
from prompt_robust.backbones.tiny import tiny_clip_backbone
from prompt_robust.training import FitConfig, evaluate, fit

CLASSNAMES = ["cat", "dog", "bird", "fish"]


def colour_task(n_per_class: int, size: int, seed: int) -> TensorDataset:
    """Four classes told apart by their colour, with pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1.0, -1], [-1, -1, 1.0], [1.0, 1.0, -1]])
    labels = torch.arange(len(CLASSNAMES)).repeat_interleave(n_per_class)
    noise = 0.3 * torch.randn(len(labels), 3, size, size, generator=generator)
    return TensorDataset(colours[labels][:, :, None, None] + noise, labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="hf:<dir>, <dir> or open_clip:<model>:<weights>.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/coop", help="Checkpoints and the adapter go here.")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    backbone = pr.load_backbone(args.backbone) if args.backbone else tiny_clip_backbone(initializer_factor=3.0)
    model = pr.wrap(pr.build_learner("coop", backbone, CLASSNAMES, n_ctx=4), pr.RobustConfig())
    train = colour_task(8, backbone.image_size, seed=args.seed)
    test = colour_task(16, backbone.image_size, seed=args.seed + 1000)

    before = evaluate(model, test)["accuracy"]
    config = FitConfig(steps=args.steps, batch_size=16, lr=0.05, optimizer="adamw", weight_decay=0.0, seed=args.seed)
    fit(model, train, config, checkpoint_dir=f"{args.out}/checkpoints")
    after = evaluate(model, test)["accuracy"]
    model.save_pretrained(f"{args.out}/adapter", overwrite=True)
    print(f"test accuracy: {before:.3f} before training, {after:.3f} after; adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()
