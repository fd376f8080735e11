"""One rank of the 2-process DDP test (tests/test_distributed.py); run by torchrun, not collected by pytest.

Trains CoOp + refiner with ``transformers.Trainer`` and the RobustCallback (the add-on stage runs mid-training
under DDP), then writes this rank's trainable prompt and add-on tensors to ``<out>/rank<r>.safetensors``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file

import prompt_robust as pr
from prompt_robust.backbones.tiny import tiny_clip_backbone
from prompt_robust.bench.tasks import WorldTasks
from prompt_robust.integrations.trainer import RobustCallback


def main(out: Path) -> None:
    torch.set_num_threads(1)
    backbone = tiny_clip_backbone(seed=0, context_length=32, initializer_factor=3.0)
    tasks = WorldTasks(backbone.image_size, backbone.image_mean, backbone.image_std, pool_per_class=4)
    train = tasks.spurious_train(n_per_class=8, seed=1)
    torch.manual_seed(0)
    learner = pr.build_learner("coop", backbone, train.classnames, n_ctx=2)
    refiner = pr.RefinerConfig(train_steps=3, inner_steps=1, hidden_dim=16, layers=1, heads=2)
    model = pr.wrap(learner, pr.RobustConfig(refiner=refiner))
    initial = model.learner.ctx.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=4,
        learning_rate=0.01,
        max_steps=6,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels", "groups"],
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=train, callbacks=[RobustCallback(train, addon_start_step=3)]
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else -1
    world = dist.get_world_size() if dist.is_initialized() else 1
    tensors = {"ctx": model.learner.ctx.detach().contiguous(), "initial_ctx": initial.contiguous()}
    for name, tensor in model.addons.state_dict().items():
        tensors["addons." + name] = tensor.detach().contiguous()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    info = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "steps": trainer.state.global_step,
        "refiner_steps": int(model.addons["refiner"].trained_steps),
        "ddp": type(trainer.model_wrapped).__name__,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
