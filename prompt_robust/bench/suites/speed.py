"""Speed and memory of the prompt learners on real-size CLIP architectures, against the reference per-sample loop.

``prompt-robust bench --suite speed`` measures side by side, in one run, the images/s and peak memory of
prediction and the time and peak memory of one training step of zero-shot CLIP, CoOp, CoCoOp, CoOp+refiner and
MaPLe, on open_clip's ViT-B-16 and on a transformers CLIP of the same size (random weights: cost does not depend
on them), at 10, 100 and 1000 classes. The baseline is the reference repositories' algorithm for per-sample text
prompts, re-implemented here (:func:`reference_logits`): CoCoOp's loop over the images of a batch, each image
encoding all its class prompts at the full context length; its logits are checked against the library's with
the same weights.

Protocol (see :class:`SpeedConfig`): every measurement runs in a process of its own (forked from the suite's,
which holds the backbone; spawned where fork is unavailable or on CUDA), so its peak memory is its own. On the
CPU the peak is the rise of the resident set over its level before the first batch (Linux: the high-water mark,
reset through ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere ``ru_maxrss``); on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory in use. Images/s come from ``batches`` batches of fresh
random images after one warm-up batch (the reference loop warms up on one image: its unit of work, the same
``(n_cls, context_length)`` text pass as every later image); one torch thread by default. A measurement whose
time, predicted from the same method's measurements at fewer classes (:func:`_predict`), would exceed
``budget_s`` runs with one batch, or is skipped and listed in the report.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import multiprocessing
import os
import platform
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ... import _io
from ...config import ConfigMixin, _check, help_field
from .base import SuiteRequest, register_suite

__all__ = [
    "SpeedConfig",
    "build_model",
    "build_speed_backbone",
    "format_speed",
    "reference_logits",
    "speed_profile",
    "time_sampler",
]

logger = logging.getLogger(__name__)

OUTPUTS = ("speed.json", "speed.md")
#: learners a speed method may name (optionally ``+refiner``); the refiner is the one add-on that runs untrained
_LEARNERS = ("zeroshot", "coop", "cocoop", "vpt", "maple")
#: the per-sample methods whose reference loop the suite can run (:func:`reference_logits`)
_REFERENCES = ("cocoop", "coop+refiner")
#: transformers CLIP sizes of ``hf-random:<preset>`` (ViT-B-16: OpenAI's ViT-B/16 CLIP, 149.6M parameters)
_HF_PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B-16": {
        "text": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "context": 77},
        "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image": 224, "patch": 16},
        "embed_dim": 512,
        "vocab_size": 49408,
    },
    "tiny": {
        "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "context": 32},
        "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image": 32, "patch": 8},
        "embed_dim": 32,
        "vocab_size": None,  # the tokenizer's
    },
}
_CONTEXT_WORDS = "a photo of a"


def _method_parts(method: str) -> tuple[str, bool]:
    """``"coop+refiner"`` -> ``("coop", True)``; other add-ons are refused (they only act once fitted)."""
    learner, *addons = [part.strip() for part in method.split("+")]
    if learner not in _LEARNERS or addons not in ([], ["refiner"]):
        raise ValueError(
            f"speed method {method!r} is not measurable: give a learner ({', '.join(_LEARNERS)}), optionally with "
            "'+refiner' (the other add-ons need fitting before they act)."
        )
    return learner, bool(addons)


@dataclass
class SpeedConfig(ConfigMixin):
    """What ``--suite speed`` measures (on the command line: ``--backbone`` sets one backbone, ``--steps`` the
    measured batches, ``--batch-size`` the batch size).

    Example:
        >>> SpeedConfig(classes=[10], backbones=["hf-random:tiny"]).reference_classes
        [10, 100]
    """

    backbones: list[str] = help_field(
        ["open_clip:ViT-B-16", "hf-random:ViT-B-16"],
        "Backbones: 'hf-random:ViT-B-16' / 'hf-random:tiny' (a transformers CLIP with random weights), "
        "'open_clip-random:tiny', or any load_backbone spec ('open_clip:ViT-B-16' is random without weights).",
        min_len=1,
        unique=True,
    )
    methods: list[str] = help_field(
        ["zeroshot", "coop", "cocoop", "coop+refiner", "maple"],
        "Methods: a learner, optionally '+refiner' (marked trained so that it samples).",
        min_len=1,
        unique=True,
    )
    classes: list[int] = help_field([10, 100, 1000], "Class counts of the prediction measurements.", ge=2, min_len=1)
    references: list[str] = help_field(
        list(_REFERENCES), "Methods also measured through the reference per-sample loop (cocoop, coop+refiner)."
    )
    reference_classes: list[int] = help_field(
        [10, 100], "Class counts of the reference loops (they encode every prompt at the full length).", ge=2
    )
    train_classes: list[int] = help_field([10, 100], "Class counts of the training-step measurements.", ge=2)
    batch_size: int = help_field(8, "Images per batch.", ge=1)
    batches: int = help_field(2, "Measured batches (prediction) after one warm-up batch.", ge=1)
    train_steps: int = help_field(1, "Measured training steps after one warm-up step.", ge=1)
    budget_s: float = help_field(
        150.0,
        "Most seconds one measurement may be predicted to take, warm-up included (extrapolated from the same "
        "method's measurements at fewer classes): above it, one batch; above that, skipped.",
        gt=0,
    )
    threads: int = help_field(1, "Torch threads of each measurement.", ge=1)
    device: str = help_field("cpu", "Device of the measurements (cpu, cuda, cuda:1, ...).")
    text_chunk_size: int | None = help_field(None, "The learners' text_chunk_size (None: their default).", ge=1)
    seed: int = help_field(0, "Seed of the random weights, prompts and images.", ge=0)
    timeout_s: float = help_field(1800.0, "A measurement still running after this long is stopped and listed.", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for method in self.methods:
            _method_parts(method)
        for method in self.references:
            _check(
                method in _REFERENCES,
                f"references: the reference loop exists for {list(_REFERENCES)}; got {method!r}.",
            )


# -------------------------------------------------------------------------------------------------------------
# backbones and models
# -------------------------------------------------------------------------------------------------------------
def class_names(count: int) -> list[str]:
    """``["class0", ..., f"class{count - 1}"]``: with CLIP's BPE each name is ``class`` and one token per digit.

    Example:
        >>> class_names(3)
        ['class0', 'class1', 'class2']
    """
    return [f"class{i}" for i in range(count)]


def _hf_random(preset: str, vocabulary: Sequence[str], seed: int):
    """A transformers CLIP of ``preset``'s size with random weights and a BPE tokenizer learned (deterministically)
    on ``vocabulary``: the words split into the same tokens as with CLIP's own vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    from ...backbones.hf_clip import HFClipBackbone
    from ...backbones.tiny import build_clip_tokenizer

    if preset not in _HF_PRESETS:
        from ...config import unknown_name_error

        raise unknown_name_error("hf-random size", preset, list(_HF_PRESETS))
    size = _HF_PRESETS[preset]
    tokenizer = build_clip_tokenizer([_CONTEXT_WORDS, "X", *vocabulary], vocab_size=4096)
    text, vision = size["text"], size["vision"]
    text_config = {
        "vocab_size": size["vocab_size"] or len(tokenizer),
        "hidden_size": text["hidden_size"],
        "intermediate_size": 4 * text["hidden_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "max_position_embeddings": text["context"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": vision["hidden_size"],
        "intermediate_size": 4 * vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "image_size": vision["image"],
        "patch_size": vision["patch"],
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=size["embed_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return HFClipBackbone(model.eval(), tokenizer, name=f"hf-random:{preset}")


def build_speed_backbone(spec: str, vocabulary: Sequence[str] = (), seed: int = 0, device: str = "cpu"):
    """The backbone of a :attr:`SpeedConfig.backbones` entry.

    Args:
        spec: ``hf-random:<ViT-B-16|tiny>``, ``open_clip-random:tiny`` or a
            :func:`~prompt_robust.backbones.load_backbone` spec.
        vocabulary: words the class names use (``hf-random`` learns its tokenizer on them).
        seed: seed of the random weights.
        device: where the backbone goes.

    Example:
        >>> build_speed_backbone("hf-random:tiny", class_names(2)).dims["context_length"]
        32
    """
    if spec.startswith("hf-random:"):
        backbone = _hf_random(spec.partition(":")[2], vocabulary, seed)
    elif spec == "open_clip-random:tiny":
        from ...backbones.open_clip import tiny_open_clip_backbone

        backbone = tiny_open_clip_backbone(seed=seed, name=spec)
    else:
        from ...backbones import load_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = load_backbone(spec)
    return backbone.to(device)


def _missing_package(spec: str) -> str | None:
    """Why ``spec`` cannot be built in this interpreter (an optional package is missing), or None."""
    if spec.startswith("open_clip") and importlib.util.find_spec("open_clip") is None:
        return (
            f"open_clip is not importable in this Python ({sys.executable}): pip install 'prompt_robust[open_clip]', "
            "or run the suite with an interpreter that has it"
        )
    return None


def build_model(
    backbone,
    method: str,
    classnames: Sequence[str],
    *,
    refiner: dict[str, Any] | None = None,
    text_chunk_size: int | None = None,
):
    """A wrapped learner of ``method`` ready to predict, for cost measurements: CoOp starts from "a photo of a"
    (the other learners from their own defaults), and a ``+refiner`` is marked trained so that it samples.

    Args:
        backbone: the CLIP backbone.
        method: ``learner`` or ``learner+refiner``.
        classnames: class names.
        refiner: :class:`~prompt_robust.RefinerConfig` fields.
        text_chunk_size: the learner's ``text_chunk_size``.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = build_model(tiny_clip_backbone(layers=1), "coop+refiner", ["cat", "dog"])
        >>> model(torch.zeros(2, 3, 32, 32)).logits.shape
        torch.Size([2, 2])
    """
    from ... import build_learner, wrap
    from ...addons.refiner.config import RefinerConfig
    from ...config import RobustConfig

    learner_name, with_refiner = _method_parts(method)
    options: dict[str, Any] = {"text_chunk_size": text_chunk_size}
    if learner_name == "coop":
        options["ctx_init"] = _CONTEXT_WORDS
    learner = build_learner(learner_name, backbone, list(classnames), **options)
    model = wrap(learner, RobustConfig(refiner=RefinerConfig(**(refiner or {})) if with_refiner else None))
    if with_refiner:
        model.addons["refiner"].trained_steps.fill_(1)  # random generator weights: cost does not depend on them
    return model.eval()


@contextlib.contextmanager
def time_sampler(model) -> Iterator[list[float]]:
    """Seconds spent in the refiner's :meth:`~prompt_robust.addons.refiner.addon.PromptRefiner.sample_offsets`
    while the block runs, accumulated in the yielded one-element list (``[0.0]`` without a refiner).

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = build_model(tiny_clip_backbone(layers=1), "coop+refiner", ["cat", "dog"])
        >>> with time_sampler(model) as seconds:
        ...     _ = model(torch.zeros(2, 3, 32, 32))
        >>> seconds[0] > 0
        True
    """
    total = [0.0]
    addons = getattr(model, "addons", {})
    addon = addons["refiner"] if "refiner" in addons else None
    if addon is None:
        yield total
        return
    sample = addon.sample_offsets

    def timed(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    addon.sample_offsets = timed  # an instance attribute: shadows the method for this block only
    try:
        yield total
    finally:
        del addon.sample_offsets


# -------------------------------------------------------------------------------------------------------------
# the baseline: the reference repositories' per-sample loop
# -------------------------------------------------------------------------------------------------------------
def _reference_prompts(learner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``(n_cls, L)`` and the frozen embeddings before ``(n_cls, 1, w)`` and after ``(n_cls, L-1-n, w)``
    the ``n`` context slots of ``"<ctx words> <name>."``, as the reference code builds them: the context words
    (or ``"X"`` placeholders) are tokenized with each class name and their embeddings later replaced."""
    backbone, n_ctx = learner.backbone, learner.n_ctx
    words = learner.config.ctx_init or " ".join(["X"] * n_ctx)
    ids = backbone.tokenize([f"{words} {name}." for name in learner.classnames])  # (n_cls, L)
    alone = backbone.tokenize([words])
    if int(backbone.eot_positions(alone)[0]) - 1 != n_ctx:
        raise ValueError(f"the context words {words!r} are not {n_ctx} tokens, as the learner's context is.")
    with torch.no_grad():
        embeds = backbone.token_embedding(ids)  # (n_cls, L, w)
    return ids, embeds[:, :1], embeds[:, 1 + n_ctx :]


def reference_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of per-sample text prompts computed as the reference repositories do, for comparison.

    Re-implements, from its description, the forward of CoCoOp's reference code (KaiyangZhou/CoOp,
    ``trainers/cocoop.py``; paper https://arxiv.org/abs/2203.05557): the normalised image features condition each
    image's context (``ctx + meta_net(f)``); then for every image of the batch, one after the other, the prompts
    of all classes ``[SOS][ctx_i][name . EOT pad...]`` are encoded over the full context length (77 positions for
    CLIP) and that image's logits are ``scale * f_i . t_c``. The same loop serves CoOp+refiner, the image's
    context being the refiner's sampled prompt.

    Args:
        model: a :func:`build_model` of ``cocoop`` or ``coop+refiner`` (or a bare CoCoOp learner).
        pixel_values: ``(b, 3, H, W)``.

    Returns:
        ``(b, n_cls)`` logits; equal to the model's up to float rounding.

    Example:
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = build_model(tiny_clip_backbone(layers=1), "cocoop", ["cat", "dog"])
        >>> x = torch.randn(2, 3, 32, 32)
        >>> bool((reference_logits(model, x) - model(x).logits).abs().max() < 1e-4)
        True
    """
    from ...learners.cocoop import CoCoOp
    from ...learners.coop import CoOp

    learner = getattr(model, "learner", model)
    addons = getattr(model, "addons", {})
    image = learner.plain_image_features(pixel_values)  # (b, d), normalised
    if isinstance(learner, CoCoOp) and not addons:
        shift = learner.meta_net(image.to(learner.ctx.dtype))  # (b, w)
        ctx = learner.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (b, n_ctx, w)
    elif isinstance(learner, CoOp) and "refiner" in addons and len(addons) == 1:
        if learner.config.class_specific or learner.config.class_token_position != "end":
            raise ValueError("the reference loop builds shared-context prompts with the class name at the end.")
        ctx = addons["refiner"].refined_prompts(pixel_values, cond=learner.image_features(pixel_values))["text"]
    else:
        raise ValueError(f"the reference loop covers {list(_REFERENCES)}; got {type(learner).__name__} {list(addons)}.")
    ids, prefix, suffix = _reference_prompts(learner)
    n_cls = ids.shape[0]
    scale = learner.backbone.logit_scale
    rows = []
    for i in range(pixel_values.shape[0]):
        ctx_i = ctx[i].to(prefix.dtype).unsqueeze(0).expand(n_cls, -1, -1)  # (n_cls, n_ctx, w)
        prompts = torch.cat([prefix, ctx_i, suffix], dim=1)  # (n_cls, L, w)
        text = F.normalize(learner.backbone.encode_text(ids, token_embeds=prompts, trim=False), dim=-1)  # (n_cls, d)
        rows.append(scale * image[i] @ text.t())  # (n_cls,)
    return torch.stack(rows)  # (b, n_cls)


# -------------------------------------------------------------------------------------------------------------
# one measurement (in its own process)
# -------------------------------------------------------------------------------------------------------------
def _proc_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


class _PeakMemory:
    """Peak memory of a block above what was in use when it began, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = math.nan
        self.before_mib = math.nan
        self.method = ""

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        try:  # Linux: reset the high-water mark to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _proc_kib("VmRSS")
            self.method = "VmHWM (reset through /proc/self/clear_refs)"
        except OSError:
            self._start = None
        if self._start is None:
            self._start = _maxrss_kib()
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start
            self.peak_mib, self.before_mib = peak / 2**20, self._start / 2**20
            return
        peak = _proc_kib("VmHWM") if self.method.startswith("VmHWM") else _maxrss_kib()
        self.peak_mib, self.before_mib = max(0, peak - self._start) / 1024, self._start / 1024


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, device: torch.device) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, out


def _measure(backbone, job: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement ``job`` (a dict from :func:`_jobs`) on ``backbone``; the row of the report."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    device = torch.device(job["device"])
    names = class_names(job["classes"])
    model = build_model(
        backbone, job["method"], names, refiner=job["refiner"], text_chunk_size=job["text_chunk_size"]
    ).to(device)
    generator = torch.Generator().manual_seed(job["seed"])
    size, batch = backbone.image_size, job["batch_size"]
    count = job["batches"]
    # fresh images for every batch: learners cache the image features of the last batch they saw
    images = [torch.randn(batch, 3, size, size, generator=generator).to(device) for _ in range(count + 1)]
    row: dict[str, Any] = {key: job[key] for key in ("backbone", "method", "reference", "classes", "mode")}
    row["batches"] = count
    prompts = getattr(model.learner, "prompts", None)
    if prompts is not None:
        row["text_positions"] = backbone.text_length(prompts.input_ids)
    row["context_length"] = backbone.context_length
    if job["mode"] == "train":
        model.train()
        model.set_stage("refiner_joint" if "refiner" in model.addons else "prompt")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9)
        labels = torch.randint(0, len(names), (batch,), generator=generator).to(device)

        def step(x: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x, labels=labels).loss.backward()
            optimizer.step()

        with _PeakMemory(device) as memory:
            row["warmup_s"], _ = _timed(step, images[0], device)
            seconds = [_timed(step, x, device)[0] for x in images[1:]]
    else:
        predict = (lambda x: reference_logits(model, x)) if job["reference"] else (lambda x: model(x).logits)
        with torch.no_grad(), time_sampler(model) as sampler, _PeakMemory(device) as memory:
            # the reference loop's unit of work is one image; the library's is the whole batch
            warmup = images[0][:1] if job["reference"] else images[0]
            row["warmup_s"], _ = _timed(predict, warmup, device)
            sampler[0] = 0.0
            seconds, logits = [], None
            for x in images[1:]:
                elapsed, logits = _timed(predict, x, device)
                seconds.append(elapsed)
        row["sampler_s"] = sampler[0]
        if job["reference"]:
            with torch.no_grad():
                row["logit_max_abs_diff"] = float((logits - model(images[-1]).logits).abs().max())
    row["seconds"] = seconds
    row["peak_mib"] = memory.peak_mib
    row["rss_before_mib"] = memory.before_mib
    row["memory_method"] = memory.method
    return row


def _child(conn, backbone, job: dict[str, Any]) -> None:
    """Process target: measure ``job`` (building the backbone when it was not inherited) and send the row."""
    try:
        if backbone is None:
            backbone = build_speed_backbone(job["backbone"], class_names(job["vocabulary"]), job["seed"], job["device"])
        conn.send({"ok": True, "row": _measure(backbone, job)})
    except BaseException as error:  # report anything, the parent decides
        conn.send({"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()})
    finally:
        conn.close()


def _run_isolated(backbone, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``job`` in a process of its own: forked (inheriting ``backbone``) where possible, else spawned."""
    fork = job["device"] == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, backbone if fork else None, job), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            return {"ok": False, "error": f"still running after {timeout_s:.0f} s (timeout_s); stopped"}
        return receive.recv()
    except EOFError:
        return {"ok": False, "error": f"the measurement process died (exit code {process.exitcode})"}
    finally:
        if process.is_alive():
            process.kill()
        process.join()


# -------------------------------------------------------------------------------------------------------------
# the suite
# -------------------------------------------------------------------------------------------------------------
def _jobs(config: SpeedConfig, backbone: str) -> list[dict[str, Any]]:
    """Every measurement of one backbone, cheap before expensive (ascending class counts) so that the budget can
    extrapolate."""
    common = {
        "backbone": backbone,
        "batch_size": config.batch_size,
        "threads": config.threads,
        "device": config.device,
        "text_chunk_size": config.text_chunk_size,
        "seed": config.seed,
        "vocabulary": max([*config.classes, *config.reference_classes, *config.train_classes]),
    }
    jobs = []
    for classes in sorted(set(config.classes) | set(config.reference_classes) | set(config.train_classes)):
        for method in config.methods:
            if classes in config.classes:
                jobs.append({**common, "method": method, "reference": False, "classes": classes, "mode": "infer"})
            if classes in config.reference_classes and method in config.references:
                jobs.append({**common, "method": method, "reference": True, "classes": classes, "mode": "infer"})
            if classes in config.train_classes and _method_parts(method)[0] != "zeroshot":
                jobs.append({**common, "method": method, "reference": False, "classes": classes, "mode": "train"})
    return jobs


def _label(row: dict[str, Any]) -> str:
    return f"{row['method']} (reference loop)" if row["reference"] else row["method"]


def _predict(job: dict[str, Any], done: dict[tuple, list[tuple[int, float]]]) -> tuple[float, str] | None:
    """Seconds per batch ``job`` is expected to take, and from what; None before any measurement of its kind.

    From the same (backbone, method, reference, mode) measured at fewer classes: a training step scales as the
    method's prediction did between the two class counts (both measured by then); otherwise the line through
    the last two measurements, or, after one, through the origin (costs grow at most linearly in classes).
    """
    points = done.get((job["backbone"], job["method"], job["reference"], job["mode"]))
    if not points:
        return None
    classes, seconds = points[-1]
    infer = dict(done.get((job["backbone"], job["method"], False, "infer"), []))
    if job["mode"] == "train" and classes in infer and job["classes"] in infer:
        per_batch = seconds * infer[job["classes"]] / infer[classes]
        return per_batch, f"{seconds:.1f} s at {classes} classes, scaled as its prediction"
    if len(points) > 1:
        (c0, t0), slope_from = points[-2], f"{points[-2][1]:.1f} s at {points[-2][0]} and "
        per_batch = seconds + max(0.0, (seconds - t0) / (classes - c0)) * (job["classes"] - classes)
        return per_batch, f"{slope_from}{seconds:.1f} s at {classes} classes"
    return seconds * job["classes"] / classes, f"{seconds:.1f} s at {classes} classes"


def _plan(job: dict[str, Any], done: dict[tuple, list[tuple[int, float]]], config: SpeedConfig) -> tuple[int, str]:
    """Batches to measure for ``job`` within :attr:`SpeedConfig.budget_s` and, for 0, why it is skipped."""
    wanted = config.train_steps if job["mode"] == "train" else config.batches
    predicted = _predict(job, done)
    if predicted is None:
        return wanted, ""
    per_batch, source = predicted
    warmup = per_batch / job["batch_size"] if job["reference"] else per_batch
    for batches in (wanted, 1):
        if warmup + batches * per_batch <= config.budget_s:
            return batches, ""
    return 0, (
        f"predicted {warmup + per_batch:.0f} s with one batch ({per_batch:.0f} s per batch, from {source}) > "
        f"budget_s {config.budget_s:.0f}"
    )


def speed_profile(
    config: SpeedConfig,
    out_dir: str | Path,
    *,
    refiner: dict[str, Any] | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Measure everything :class:`SpeedConfig` asks for and write ``speed.json`` and ``speed.md`` into ``out_dir``.

    Args:
        config: what to measure.
        out_dir: output directory (written after every measurement, so an interrupted run keeps its rows).
        refiner: :class:`~prompt_robust.RefinerConfig` fields of the ``+refiner`` methods.
        progress: show a progress bar.
        command: the command line, recorded in the report.

    Returns:
        ``{"config", "environment", "rows": [...], "skipped": [{backbone, method, classes, mode, reason}]}``; a
        row has ``images_per_s`` / ``ms_per_batch`` (prediction) or ``step_s`` (training), ``peak_mib``, and
        ``sampler_share`` (with a refiner) or ``logit_max_abs_diff`` (reference loops).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "config": config.to_dict(),
        "refiner": dict(refiner or {}),
        "command": command,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": _version("open_clip_torch"),
            "transformers": _version("transformers"),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "rows": [],
        "skipped": [],
    }
    torch.set_num_threads(config.threads)
    done: dict[tuple, list[tuple[int, float]]] = {}  # (backbone, method, reference, mode) -> (classes, s / batch)
    all_jobs = [(spec, job) for spec in config.backbones for job in _jobs(config, spec)]
    bar = tqdm(total=len(all_jobs), desc="speed", disable=not progress)
    for spec in config.backbones:
        jobs = [job for s, job in all_jobs if s == spec]
        missing = _missing_package(spec)
        backbone = None
        if missing is None and config.device == "cpu" and "fork" in multiprocessing.get_all_start_methods():
            try:
                backbone = build_speed_backbone(spec, class_names(jobs[0]["vocabulary"]), config.seed, config.device)
            except Exception as error:  # a spec that cannot be built is reported, the others still run
                missing = f"cannot be built: {type(error).__name__}: {error}"
        if missing:  # one line for the whole backbone
            result["skipped"].append({"backbone": spec, "method": "every method", "classes": "any", "mode": "all"})
            result["skipped"][-1]["reason"] = missing
            bar.update(len(jobs))
            continue
        for job in jobs:
            bar.set_postfix_str(f"{spec} {_label(job)} {job['classes']} {job['mode']}")
            batches, reason = _plan(job, done, config)
            if batches:
                job = {**job, "batches": batches, "refiner": dict(refiner or {})}
                answer = _run_isolated(backbone, job, config.timeout_s)
                if answer["ok"]:
                    row = _summarise(answer["row"], job["batch_size"])
                    result["rows"].append(row)
                    key = (spec, job["method"], job["reference"], job["mode"])
                    done.setdefault(key, []).append((job["classes"], row["mean_s"]))
                else:
                    reason = f"failed: {answer['error']}"
                    logger.warning("speed %s %s: %s\n%s", spec, _label(job), reason, answer.get("trace", ""))
            if reason:
                result["skipped"].append(
                    {
                        "backbone": spec,
                        "method": _label(job),
                        "classes": job["classes"],
                        "mode": job["mode"],
                        "reason": reason,
                    }
                )
            _io.write_json(out / "speed.json", result)  # after every measurement: an interrupted run keeps its rows
            (out / "speed.md").write_text(format_speed(result) + "\n")
            bar.update()
        del backbone
        gc.collect()
    bar.close()
    _io.write_json(out / "speed.json", result)
    (out / "speed.md").write_text(format_speed(result) + "\n")
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _summarise(row: dict[str, Any], batch_size: int) -> dict[str, Any]:
    mean = sum(row["seconds"]) / len(row["seconds"])
    row["mean_s"] = mean
    if row["mode"] == "train":
        row["step_s"] = mean
    else:
        row["ms_per_batch"] = 1000 * mean
        row["images_per_s"] = batch_size / mean
        row["sampler_share"] = row["sampler_s"] / sum(row["seconds"])
    return row


# -------------------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------------------
def _find(rows: list[dict], backbone: str, method: str, classes: int, mode: str, reference: bool = False):
    for row in rows:
        if (row["backbone"], row["method"], row["classes"], row["mode"], row["reference"]) == (
            backbone,
            method,
            classes,
            mode,
            reference,
        ):
            return row
    return None


def _mib(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def format_speed(result: dict[str, Any]) -> str:
    """Markdown report of :func:`speed_profile`: the table, the checks of the issue and what was skipped.

    Example:
        >>> print(format_speed({"config": SpeedConfig().to_dict(), "rows": [], "skipped": []}).splitlines()[0])
        Batch 8, 2 measured batch(es) after one warm-up (training: 1 step(s) after one), 1 torch thread(s), cpu.
    """
    config = result["config"]
    rows, skipped = result["rows"], result["skipped"]
    lines = [
        f"Batch {config['batch_size']}, {config['batches']} measured batch(es) after one warm-up (training: "
        f"{config['train_steps']} step(s) after one), {config['threads']} torch thread(s), {config['device']}.",
        "Peak memory: the rise over the memory in use before the first batch (weights excluded), one fresh "
        "process per measurement. `text positions`: what each text pass runs of the context length.",
        "",
        "| backbone | method | classes | text positions | images / s | ms / batch | peak MiB | train step s "
        "| train peak MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r["backbone"], r["method"], r["reference"], r["classes"]) for r in rows)
    for backbone, method, reference, classes in keys:
        infer = _find(rows, backbone, method, classes, "infer", reference)
        train = _find(rows, backbone, method, classes, "train", reference)
        any_row = infer or train
        positions = f"{any_row.get('text_positions', '-')} / {any_row['context_length']}"
        if reference:
            positions = f"{any_row['context_length']} / {any_row['context_length']}"
        notes = []
        if infer and infer.get("sampler_s"):
            notes.append(f"sampler {100 * infer['sampler_share']:.2f}% of prediction")
        if infer and "logit_max_abs_diff" in infer:
            notes.append(f"max abs logit diff vs library {infer['logit_max_abs_diff']:.1e}")
        if infer and infer["batches"] < config["batches"]:
            notes.append(f"{infer['batches']} batch(es) (budget)")
        lines.append(
            f"| {backbone} | {_label(any_row)} | {classes} | {positions} | "
            + (
                f"{infer['images_per_s']:.2f} | {infer['ms_per_batch']:.0f} | {_mib(infer['peak_mib'])}"
                if infer
                else "- | - | -"
            )
            + " | "
            + (f"{train['step_s']:.2f} | {_mib(train['peak_mib'])}" if train else "- | -")
            + f" | {'; '.join(notes)} |"
        )
    lines += ["", *_checks(result)]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [
            f"- {s['backbone']} {s['method']} at {s['classes']} classes ({s['mode']}): {s['reason']}" for s in skipped
        ]
    return "\n".join(lines)


def _checks(result: dict[str, Any]) -> list[str]:
    """The issue's must-show checks, from the rows that were measured."""
    rows = result["rows"]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    lines = ["Checks:", ""]
    for backbone in backbones:
        for row in rows:
            if row["backbone"] != backbone or not row["reference"] or row["mode"] != "infer":
                continue
            library = _find(rows, backbone, row["method"], row["classes"], "infer")
            if library is None:
                continue
            ratio = library["images_per_s"] / row["images_per_s"]
            verdict = "met" if ratio >= 3 else "MISSED"
            lines.append(
                f"- {backbone}, {row['method']}, {row['classes']} classes: {ratio:.1f}x the images/s of the "
                f"full-length per-sample loop ({library['images_per_s']:.2f} vs {row['images_per_s']:.2f}; "
                f"target >= 3x: {verdict}), max abs logit difference {row['logit_max_abs_diff']:.1e}."
            )
        for row in rows:
            if row["backbone"] == backbone and row["mode"] == "infer" and row.get("sampler_s") and not row["reference"]:
                verdict = "met" if row["sampler_share"] <= 0.01 else "MISSED"
                lines.append(
                    f"- {backbone}, {row['method']}, {row['classes']} classes: the refiner's sampler takes "
                    f"{100 * row['sampler_share']:.2f}% of prediction time ({1000 * row['sampler_s'] / row['batches']:.0f} "
                    f"ms per batch; target <= 1%: {verdict})."
                )
        coops = [
            r
            for r in rows
            if (r["backbone"], r["method"], r["mode"], r["reference"]) == (backbone, "coop", "infer", False)
        ]
        largest = max((r["classes"] for r in coops), default=None)
        coop = _find(rows, backbone, "coop", largest, "infer") if largest else None
        if coop is not None:
            lines.append(
                f"- {backbone}, CoOp at {largest} classes: {coop['images_per_s']:.2f} images/s, peak "
                f"{_mib(coop['peak_mib'])} MiB."
            )
        at_100 = [r for r in rows if r["backbone"] == backbone and r["classes"] == 100 and r["mode"] == "infer"]
        if at_100:
            peaks = ", ".join(f"{_label(r)} {_mib(r['peak_mib'])}" for r in at_100)
            lines.append(f"- {backbone}, peak MiB of prediction at 100 classes: {peaks}.")
    return lines


@register_suite(
    "speed",
    outputs=OUTPUTS,
    help="images/s, peak memory and training step time of zero-shot, CoOp, CoCoOp, CoOp+refiner, MaPLe on "
    "open_clip ViT-B-16 and a transformers CLIP of that size (random weights) at 10/100/1000 classes, against the "
    "reference per-sample loop (--backbone: one backbone, --steps: measured batches, --batch-size)",
)
def _speed_suite(request: SuiteRequest) -> str:
    started = time.time()
    options = request.bench_options
    fields: dict[str, Any] = {}
    if request.backbone:
        fields["backbones"] = [request.backbone]
    if options.get("steps") is not None:
        fields["batches"] = options["steps"]
    if options.get("batch_size") is not None:
        fields["batch_size"] = options["batch_size"]
    config = SpeedConfig(**fields)
    result = speed_profile(
        config, request.out, refiner=request.refiner, progress=request.progress, command=request.command
    )
    return f"{format_speed(result)}\n\n" + request.wrote(list(OUTPUTS), started)
