"""CoOp prediction at 1000 classes on a random transformers ViT-B/16 CLIP: images/s with the shared-text cache
(reused class features) and without it (learner._shared_text_features cleared before every batch)."""

import time

import torch

import prompt_robust as pr
from prompt_robust.bench.suites.speed import build_speed_backbone, class_names

torch.manual_seed(0)
names = class_names(1000)
backbone = build_speed_backbone("hf-random:ViT-B-16", names)
learner = pr.build_learner("coop", backbone, names, ctx_init="a photo of a").eval()
images = [torch.randn(8, 3, 224, 224) for _ in range(3)]
with torch.no_grad():
    learner(images[0])  # warm-up (fills the cache)
    for cached in (True, False):
        seconds = []
        for x in images[1:]:
            if not cached:
                learner.__dict__.pop("_shared_text_features", None)
            start = time.perf_counter()
            learner(x)
            seconds.append(time.perf_counter() - start)
        print(
            f"CoOp, 1000 classes, cache {'on' if cached else 'off'}: {8 * len(seconds) / sum(seconds):.2f} images/s "
            f"({1000 * sum(seconds) / len(seconds):.0f} ms per batch of 8)"
        )
