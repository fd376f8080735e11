"""The Trainer path under DDP: 2 CPU processes (gloo) launched by torchrun end with identical prompts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import import_optional
from safetensors.torch import load_file

import_optional("transformers")
import_optional("accelerate")  # the Trainer's distributed backend (the [trainer] and [dev] extras)

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_hold_the_same_prompt_and_addons(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    infos = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, info in enumerate(infos):
        assert info["rank"] == rank and info["world_size"] == 2 and info["backend"] == "gloo"
        assert info["ddp"] == "DistributedDataParallel"
        assert info["steps"] == 6 and info["refiner_steps"] == 3  # the add-on stage ran under DDP too
    rank0, rank1 = (load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1))
    assert set(rank0) == set(rank1)
    assert not torch.equal(rank0["ctx"], rank0["initial_ctx"])  # the prompt was trained...
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # ...to the same tensors on both ranks
