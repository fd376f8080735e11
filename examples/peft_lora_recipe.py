"""LoRA on CLIP's attention projections and a prompt learner, trained together, each saved by its owner and
loaded back (the recipe of docs/adapters.md, "With a PEFT (LoRA) backbone").

PEFT wraps the transformers ``CLIPModel``; ``HFClipBackbone`` keeps PEFT's LoRA tensors trainable while freezing
the rest, so ``fit`` updates the prompt and the LoRA in one optimizer. PEFT writes the LoRA
(``<out>/lora``, ``PeftModel.from_pretrained`` loads it), prompt_robust the prompt (``<out>/prompts``); the prompt
adapter records the LoRA it was trained through, so loading it onto the base model alone is refused.

Runs as is with the shipped mini-CLIP (a transformers ``CLIPModel``) on the embedded world: ``--k`` shots of its
24 classes (photo style), tested on held-out photos (no downloads, ~20 s on one CPU thread):

    python examples/peft_lora_recipe.py --out runs/lora_coop

On a local transformers CLIP checkpoint and a dataset in CoOp/Dassl's layout (train split for the shots, test
split for evaluation):

    python examples/peft_lora_recipe.py --backbone hf:/models/clip-vit-base-patch16 \\
        --split-file data/oxford_pets/split_zhou_OxfordPets.json --image-dir data/oxford_pets/images --out runs/pets

Existing adapters in ``<out>`` are only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json

import peft
import torch
from _data import add_data_args, add_run_args, check_args, few_shot_data, fit_config, save_shots

import prompt_robust as pr
from prompt_robust.bench.runner import LEARNER_SETTINGS
from prompt_robust.training import evaluate, fit


def hf_backbone(spec: str) -> pr.HFClipBackbone:
    """A fresh copy of the base checkpoint (transformers CLIP only: PEFT's recipe targets its module names)."""
    backbone = pr.load_backbone(spec)
    if not isinstance(backbone, pr.HFClipBackbone):
        raise SystemExit(
            f"--backbone {spec!r} is a {type(backbone).__name__}; the LoRA recipe needs a transformers CLIP: "
            "'embedded' or hf:<dir>."
        )
    return backbone


def with_lora(base: pr.HFClipBackbone, model: torch.nn.Module) -> pr.HFClipBackbone:
    """``base``'s tokenizer, normalisation and name around a PEFT-wrapped CLIP."""
    return pr.HFClipBackbone(
        model, base.tokenizer, name=base.name, image_mean=base.image_mean, image_std=base.image_std
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser, "split", backbone_help="embedded or hf:<dir> (a transformers CLIP).")  # + --split-file, ...
    parser.add_argument("--learner", default="coop", choices=[n for n in pr.LEARNERS if n != "zeroshot"])
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r.")
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (the update is scaled by alpha / r).")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="CLIP modules to adapt.")
    parser.add_argument("--k", type=int, default=16, help="Shots per class.")
    add_run_args(  # --steps, --batch-size, --lr, --pool-per-class, --test-per-class, --seed, --out, ...
        parser,
        "split",
        steps_help="Training steps (AdamW, cosine decay).",
        lr=5e-4,
        lr_help="AdamW lr of prompt and LoRA (2e-3, CoOp's, overfits the LoRA).",
        seed_help="Few-shot draw, LoRA initialisation, training order.",
        out_default="runs/lora_coop",
        out_help="lora/, prompts/, split and results.json go here.",
        overwrite_help="Replace adapters already saved in --out.",
    )
    args = parser.parse_args(argv)
    out = check_args(parser, args, ["lora", "prompts"])

    base = hf_backbone(args.backbone)
    train, test, shots = few_shot_data(base, args)
    save_shots(out / "split.json", shots, args, "embedded world (few-shot)")
    torch.manual_seed(args.seed)  # LoRA's A matrices (B starts at 0: the LoRA starts as the identity)
    lora_config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.target_modules)
    lora = peft.get_peft_model(base.clip, lora_config)
    backbone = with_lora(base, lora)
    learner = pr.build_learner(args.learner, backbone, train.classnames, **LEARNER_SETTINGS[args.learner])
    model = pr.wrap(learner)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    n_prompt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    results = {"before training": evaluate(model, test)["accuracy"]}
    config = fit_config(args)
    fit(model, train, config)  # prompt and LoRA tensors in one optimizer
    results["after training"] = evaluate(model, test)["accuracy"]
    model.eval()
    probe = torch.stack([test[i]["pixel_values"] for i in range(min(8, len(test)))])
    with torch.no_grad():
        expected = model(probe).logits

    lora.save_pretrained(out / "lora")  # PEFT's adapter_config.json + adapter_model.safetensors
    model.save_pretrained(out / "prompts", overwrite=args.overwrite)  # the prompt, never backbone tensors

    # later, on the same base checkpoint: the prompts alone are refused, the LoRA must be loaded first
    fresh = hf_backbone(args.backbone)
    try:
        pr.RobustPromptModel.from_pretrained(out / "prompts", backbone=fresh)
        refused = ""
    except ValueError as error:
        refused = str(error)
    reloaded = pr.RobustPromptModel.from_pretrained(
        out / "prompts", backbone=with_lora(fresh, peft.PeftModel.from_pretrained(fresh.clip, out / "lora"))
    ).eval()
    with torch.no_grad():
        max_diff = float((reloaded(probe).logits - expected).abs().max())
    results["reloaded"] = evaluate(reloaded, test)["accuracy"]

    record = {
        "results": results,
        "reload_max_abs_logit_diff": max_diff,
        "prompts_without_lora_refused": bool(refused),
        "trainable": {"lora": n_lora, "prompt": n_prompt},
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.learner} + LoRA(r={args.rank}, {','.join(args.target_modules)}), {len(train)} training images")
    print(f"trainable tensors: {n_prompt} prompt values, {n_lora} LoRA values")
    for name, accuracy in results.items():
        print(f"test accuracy {name:16s} {accuracy:.3f}")
    print(f"reloaded vs trained logits: max |difference| {max_diff:.2e}")
    print(f"prompts loaded onto the base model without the LoRA: {'refused' if refused else 'NOT refused'}")
    print(f"LoRA in {out / 'lora'} (PEFT), prompts in {out / 'prompts'} (prompt_robust)")
    return record


if __name__ == "__main__":
    main()
