"""Shared fixtures: tiny CLIP backbones built in-process (no downloads), one torch thread."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# Two shared cores make multi-threaded torch erratic (and 50x slower under contention).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CLASSNAMES = ["cat", "dog", "bird", "fish"]
BACKBONES = ["hf", "open_clip"]
LEARNER_NAMES = ["zeroshot", "coop", "cocoop", "vpt", "maple"]
# Small settings so every learner fits the tiny backbones' context and runs in milliseconds.
LEARNER_KWARGS = {
    "zeroshot": {},
    "coop": {"n_ctx": 4},
    "cocoop": {},
    "vpt": {"n_tokens": 4, "deep": True},
    "maple": {"depth": 2},
}


def import_optional(name: str):
    """Import an optional extra; skip without it, except where PROMPT_ROBUST_REQUIRE_EXTRAS=1 (CI), where a
    missing extra must fail the run instead of silently skipping its tests."""
    if os.environ.get("PROMPT_ROBUST_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def make_backbone(kind: str, seed: int = 0):
    if kind == "hf":
        from prompt_robust.backbones.tiny import tiny_clip_backbone

        return tiny_clip_backbone(seed=seed, context_length=32, initializer_factor=3.0)
    import_optional("open_clip")
    from prompt_robust.backbones.open_clip import tiny_open_clip_backbone

    return tiny_open_clip_backbone(seed=seed, attention_scale=3.0)


@pytest.fixture(params=BACKBONES)
def backbone(request):
    return make_backbone(request.param)


@pytest.fixture(scope="module")
def bb():
    """One tiny HF CLIP backbone per test module (frozen by every learner; never modified)."""
    return make_backbone("hf")


#: size of the ``train_data`` fixture
N_TRAIN = 12


@pytest.fixture(scope="module")
def train_data():
    """``N_TRAIN`` random 32 px images as ``(pixel_values, label)`` pairs, labels cycling over CLASSNAMES."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(N_TRAIN, 3, 32, 32, generator=generator)
    labels = torch.arange(N_TRAIN) % len(CLASSNAMES)
    return [(images[i], int(labels[i])) for i in range(N_TRAIN)]


@pytest.fixture
def hf_backbone():
    return make_backbone("hf")


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=generator)
