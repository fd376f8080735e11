"""``wrap(learner, config)``: a prompt learner plus robustness add-ons, with PEFT-style adapter files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _io
from .addons import ADDONS, RobustAddon
from .addons.base import FIT_PHASES, ForwardState, StagePlan, as_learner_output
from .backbones.base import ClipBackbone, find_backbone
from .config import ConfigMixin, RobustConfig
from .data.checks import check_batch, class_count
from .layers import non_finite
from .learners import LEARNERS, PromptLearner
from .learners.base import LearnerOutput

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "RobustOutput", "RobustPromptModel", "wrap"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Format 1 gained an optional "weights" record ({"file", "sha256", "size"} of the weights file the config belongs
# to); a config without it (older saves) loads unchecked, and older versions ignore it.
FORMAT_VERSION = 1
_REQUIRED_METHODS = ("prompt_tokens", "image_features", "forward")

# Bounds on what an adapter config (untrusted input) may ask for, checked before anything is allocated.
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 32
logger = logging.getLogger(__name__)

MAX_CLASSES = 100_000
MAX_CLASSNAME_CHARS = 1_000
MAX_TEXT_CHARS = 10_000  # any other string of a learner or add-on config (templates, ctx_init, ...)
MAX_LIST_ENTRIES = 10_000  # any list or object of a learner or add-on config
MAX_VISUAL_TOKENS = 1_024  # VPT prompt tokens per layer
# reads of a folder being saved into: a mismatched pair is read again this often before it is an error
_LOAD_ATTEMPTS = 3
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class RobustOutput:
    """What the wrapped model returns.

    Attributes:
        loss: scalar training loss when ``labels`` were given (task loss, reweighted, plus add-on terms).
        logits: ``(batch, n_classes)``; None in a stage that trains an add-on's own model (e.g. ``"refiner"``).
        logs: scalar diagnostics of the add-ons (floats), e.g. ``{"counterfactual/loss": 0.3}``.
        learner_output: the learner's output as a ``LearnerOutput`` (logits and, for reference learners, image
            and text features), after the add-ons' ``adjust_output``.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)
    learner_output: LearnerOutput | None = None

    def __getitem__(self, key: str | int | slice) -> Any:
        """``out["logits"]``, or tuple-style ``out[0]`` / ``out[1:]`` over the non-None ``(loss, logits)`` as
        transformers' ``ModelOutput`` does (the Trainer indexes outputs both ways)."""
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def keys(self) -> list[str]:
        return [key for key in ("loss", "logits") if getattr(self, key) is not None]


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _check_learner(learner: Any) -> None:
    if not isinstance(learner, nn.Module):
        raise TypeError(f"wrap() needs a torch.nn.Module prompt learner; got {type(learner).__name__}.")
    missing = [name for name in _REQUIRED_METHODS if not callable(getattr(learner, name, None))]
    if missing:
        raise TypeError(
            f"{type(learner).__name__} does not implement the prompt-learner contract: missing "
            f"{', '.join(missing)}. A learner needs prompt_tokens() -> {{site: (n_tokens, dim)}}, "
            "forward(pixel_values, prompt_override=None) -> logits and image_features(pixel_values); see "
            "docs/learner_contract.md."
        )


def _non_finite_error(tensors: Mapping[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """``(name, non-finite count, size)`` of the first tensor holding NaN or Inf, or None."""
    bad = non_finite(tensors)
    if not bad:
        return None
    tensor = tensors[bad[0]].detach()
    return bad[0], int((~torch.isfinite(tensor)).sum()), tensor.numel()


def _adapter_config_error(path: Path, problem: str, fix: str = "") -> ValueError:
    fix = fix or "re-save the adapter with save_pretrained(), or restore the file from a copy"
    return ValueError(f"adapter config {str(path)!r}: {problem} Fix: {fix}.")


def _check_adapter_config(saved: Any, path: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` if its structure is what :meth:`RobustPromptModel.save_pretrained`
    writes (types of the top-level entries, the learner entry, the weights record); a ValueError otherwise."""
    from . import __version__

    if not isinstance(saved, dict):
        raise _adapter_config_error(
            path, f"the file must be a JSON object (as save_pretrained writes it); got a {type(saved).__name__}."
        )
    if saved.get("library") != "prompt_robust" or "format_version" not in saved:
        raise ValueError(
            f"{str(path.parent)!r} does not hold a prompt_robust adapter (no prompt_robust stamp in "
            f'{str(path)!r}: it needs "library": "prompt_robust" and a "format_version").'
        )
    fmt, version = saved["format_version"], saved.get("prompt_robust_version")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise _adapter_config_error(path, f"'format_version' must be an integer; got {fmt!r}.")
    if not isinstance(version, str):
        raise _adapter_config_error(
            path, f"'prompt_robust_version' must be a string such as {__version__!r}; got {version!r}."
        )
    if fmt != FORMAT_VERSION or _version_tuple(version) > _version_tuple(__version__):
        raise ValueError(
            f"adapter was saved by prompt_robust {version} (format {fmt}); this is prompt_robust {__version__} "
            f"(format {FORMAT_VERSION}). Upgrade prompt_robust to load it ({str(path)!r})."
        )
    if "learner" not in saved:
        raise _adapter_config_error(path, "the file has no 'learner' entry (which learner the weights belong to).")
    info = saved["learner"]
    if not isinstance(info, dict):
        raise _adapter_config_error(path, f"'learner' must be a JSON object; got {type(info).__name__}.")
    kind = info.get("type")
    if not isinstance(kind, str):
        raise _adapter_config_error(
            path, f"learner.type must be a string (a learner name such as 'coop', or 'custom'); got {kind!r}."
        )
    if kind == "custom":
        if not isinstance(info.get("class", ""), str):
            raise _adapter_config_error(path, f"learner.class must be a string; got {info['class']!r}.")
    else:
        if not isinstance(info.get("config"), dict):
            raise _adapter_config_error(
                path, f"learner.config must be a JSON object of the learner's settings; got {info.get('config')!r}."
            )
        names = info.get("classnames")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            shown = names if not isinstance(names, list) else [n for n in names if not isinstance(n, str)][:3]
            raise _adapter_config_error(path, f"learner.classnames must be a list of strings; got {shown!r}.")
        if len(names) > MAX_CLASSES:
            raise _adapter_config_error(
                path,
                f"learner.classnames holds {len(names)} class names; at most {MAX_CLASSES} are accepted (every "
                "class keeps its prompt's token embeddings in memory).",
                "predict fewer classes per model, or re-save the adapter",
            )
        for i, name in enumerate(names):
            if len(name) > MAX_CLASSNAME_CHARS:
                raise _adapter_config_error(
                    path,
                    f"class name {i} has {len(name)} characters; at most {MAX_CLASSNAME_CHARS} are accepted (a class "
                    "name must fit the text context of the backbone).",
                    "use a shorter class name, or re-save the adapter",
                )
    for key in ("learner", "robust_config"):
        _check_json_sizes(saved.get(key), key, path)
    robust = saved.get("robust_config")
    if not isinstance(robust, dict):
        raise _adapter_config_error(
            path, f"robust_config must be a JSON object (the add-ons' settings, {{}} for none); got {robust!r}."
        )
    if saved.get("backbone") is not None and not isinstance(saved["backbone"], dict):
        raise _adapter_config_error(
            path, f"'backbone' must be a JSON object or null (the backbone identity); got {saved['backbone']!r}."
        )
    record = saved.get("weights")
    if record is not None and not (
        isinstance(record, dict)
        and record.get("file") == ADAPTER_WEIGHTS_NAME
        and isinstance(record.get("sha256"), str)
        and _SHA256.fullmatch(record["sha256"])
        and isinstance(record.get("size"), int)
        and not isinstance(record["size"], bool)
        and record["size"] >= 0
    ):
        raise _adapter_config_error(
            path,
            f'the \'weights\' record must be {{"file": "{ADAPTER_WEIGHTS_NAME}", "sha256": <64 hex digits>, '
            f'"size": <bytes>}}; got {record!r}.',
            "re-save the adapter, or delete the 'weights' entry to load the weights file unchecked",
        )
    return saved


def _check_json_sizes(value: Any, where: str, path: Path) -> None:
    """Refuse oversized strings, lists and objects in a learner or add-on config (iterative: hostile input)."""
    stack = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            if len(node) > MAX_TEXT_CHARS:
                raise _adapter_config_error(
                    path, f"{at} is a string of {len(node)} characters; at most {MAX_TEXT_CHARS} are accepted."
                )
        elif isinstance(node, (list, dict)):
            if at == "learner.classnames":  # bounded by _check_adapter_config, with their own limits
                continue
            if len(node) > MAX_LIST_ENTRIES:
                raise _adapter_config_error(
                    path,
                    f"{at} has {len(node)} entries; at most {MAX_LIST_ENTRIES} are accepted (no setting needs more).",
                )
            if isinstance(node, dict):
                stack.extend((child, f"{at}.{key}") for key, child in node.items())
            else:
                stack.extend((child, f"{at}[{i}]") for i, child in enumerate(node))


def _size_caps(backbone: ClipBackbone | None) -> tuple[int, int, str]:
    """``(max width, max layers, why)`` of an add-on network, from the backbone's size."""
    if backbone is None:
        return 8192, 48, "without a backbone to compare with"
    width = max(backbone.text_width, backbone.vision_width, backbone.embed_dim)
    layers = max(backbone.num_text_layers, backbone.num_vision_layers)
    return (
        max(1024, 4 * width),
        max(12, 2 * layers),
        f"4x the backbone width {width}, at least 1024; 2x its {layers} layers, at least 12",
    )


def _check_sizes(
    learner_config: ConfigMixin | None, robust: RobustConfig, backbone: ClipBackbone | None, path: Path
) -> None:
    """Refuse sizes in an adapter config that would allocate far more than the backbone could use, before any
    tensor is built (types and ranges were checked by the configs' ``from_dict``)."""
    fix = "correct the value, or re-save the adapter from the model it belongs to"
    if learner_config is not None and backbone is not None:
        length = backbone.context_length
        n_ctx = getattr(learner_config, "n_ctx", None)
        if n_ctx is not None and not getattr(learner_config, "ctx_init", None) and n_ctx > length - 4:
            raise _adapter_config_error(
                path,
                f"learner.config.n_ctx={n_ctx} does not fit the backbone's text context length {length} (BOS, a "
                f"class name, '.' and EOT take at least 4 positions): at most {max(length - 4, 0)}.",
                fix,
            )
        n_tokens = getattr(learner_config, "n_tokens", None)
        if n_tokens is not None and n_tokens > MAX_VISUAL_TOKENS:
            raise _adapter_config_error(
                path,
                f"learner.config.n_tokens={n_tokens} visual prompt tokens per layer; at most {MAX_VISUAL_TOKENS}.",
                fix,
            )
        depth = getattr(learner_config, "depth", None)
        # VPT refuses a depth beyond the vision tower (MaPLe caps its depth at the backbone's instead)
        if n_tokens is not None and depth is not None and depth > backbone.num_vision_layers:
            raise _adapter_config_error(
                path,
                f"learner.config.depth={depth} exceeds the {backbone.num_vision_layers} vision layers of this backbone.",
                fix,
            )
    max_width, max_layers, why = _size_caps(backbone)
    checks = []
    if robust.refiner is not None:
        checks += [("refiner.hidden_dim", robust.refiner.hidden_dim, max_width)]
        checks += [("refiner.layers", robust.refiner.layers, max_layers)]
    if robust.counterfactual is not None:
        checks += [("counterfactual.hidden_dim", robust.counterfactual.hidden_dim, max_width)]
        checks += [("counterfactual.depth", robust.counterfactual.depth, max_layers)]
    for name, value, cap in checks:
        if value > cap:
            raise _adapter_config_error(
                path, f"robust_config.{name}={value} is too large: at most {cap} for this backbone ({why}).", fix
            )


def _config_from_dict(config_class: type, data: dict[str, Any], where: str, path: Path) -> Any:
    """``config_class.from_dict(data)`` with errors naming the adapter config and the entry."""
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise _adapter_config_error(path, f"{where}: {err}") from err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unchanged(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except OSError:
        return False


def _staged_weights(weights_path: Path, record: Mapping[str, Any]) -> bytes | None:
    """The content of a written-but-not-renamed weights file of the save that wrote the config (its temporary
    file, found by size and hash), or None: a save killed between its two renames still loads completely."""
    prefix = f".{weights_path.name}."
    try:
        entries = list(os.scandir(weights_path.parent))
    except OSError:
        return None
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_size != record["size"]:
                continue
            data = Path(entry.path).read_bytes()
        except OSError:  # renamed into place meanwhile: the next attempt reads it under its final name
            continue
        if _sha256(data) == record["sha256"]:
            return data
    return None


def _read_adapter_pair(directory: Path) -> tuple[dict[str, Any], bytes]:
    """The checked config and the weights' bytes of one save, never a mixture of two.

    The config's ``weights`` record (size and sha256) must match the weights read; otherwise the written-but-not-
    renamed weights of the save that wrote the config are used if present, else the pair is read again (a
    concurrent save may have been between its two renames). A config without the record (older saves) is read
    again after the weights and must be unchanged.
    """
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for attempt in range(_LOAD_ATTEMPTS):
        if attempt:
            time.sleep(0.02 * attempt)
        raw = _io.read_bytes(config_path, "adapter config", MAX_CONFIG_BYTES)
        saved = _io.parse_json(raw, config_path, "adapter config", max_depth=MAX_CONFIG_DEPTH)
        saved = _check_adapter_config(saved, config_path)
        record = saved.get("weights")
        try:
            data = weights_path.read_bytes()
        except FileNotFoundError:
            data = None
        if record is None:
            if data is not None and _unchanged(config_path, raw):
                return saved, data
            continue
        if data is not None and len(data) == record["size"] and _sha256(data) == record["sha256"]:
            return saved, data
        staged = _staged_weights(weights_path, record)
        if staged is not None:
            return saved, staged
    if data is None:
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} is missing {ADAPTER_WEIGHTS_NAME}; an adapter folder holds "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} as written by save_pretrained()."
        )
    if record is None:
        raise ValueError(
            f"adapter config {str(config_path)!r} changed while its weights were read, {_LOAD_ATTEMPTS} times: a "
            "concurrent save is writing this folder. Load it again once that save has finished."
        )
    _io.safetensors_from_bytes(data, weights_path, "adapter weights")  # a damaged file is named as such
    raise ValueError(
        f"adapter weights file {str(weights_path)!r} does not belong to {str(config_path)!r}: the config records "
        f"{record['size']} bytes with sha256 {record['sha256'][:12]}..., the file has {len(data)} bytes with sha256 "
        f"{_sha256(data)[:12]}... (read {_LOAD_ATTEMPTS} times). A save into this folder was interrupted or is still "
        "running (a concurrent save), or one of the two files was replaced on its own. Save the adapter again with save_pretrained(directory, "
        'overwrite=True); to load replaced weights on purpose, delete the "weights" entry of the config.'
    )


class RobustPromptModel(nn.Module):
    """A prompt learner with robustness add-ons; trains and predicts like the learner.

    With no add-on enabled its logits equal the learner's exactly. ``forward`` returns a :class:`RobustOutput`
    with the loss when ``labels`` are given, so it trains with :func:`prompt_robust.fit`, a plain loop or a
    transformers ``Trainer``.

    Args:
        learner: a reference learner or any module implementing the learner contract.
        config: which add-ons to attach (:class:`RobustConfig`).

    Example:
        >>> import prompt_robust as pr
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> learner = pr.build_learner("coop", tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=4)
        >>> model = pr.wrap(learner, pr.RobustConfig())
        >>> out = model(torch.zeros(2, 3, 32, 32), labels=torch.tensor([0, 1]))
        >>> out.logits.shape, out.loss.dim()
        (torch.Size([2, 2]), 0)
    """

    # transformers.Trainer: the loss is complete as returned (no gradient-accumulation rescaling by the Trainer).
    accepts_loss_kwargs = False

    def __init__(self, learner: nn.Module, config: RobustConfig | None = None) -> None:
        super().__init__()
        _check_learner(learner)
        config = config if config is not None else RobustConfig()
        if not isinstance(config, RobustConfig):
            raise TypeError(f"config must be a RobustConfig; got {type(config).__name__}.")
        self.learner = learner
        self.config = config
        self.addons = nn.ModuleDict()
        for name in config.enabled():  # RobustConfig's fields are the registered add-ons
            self.addons[name] = ADDONS[name](learner, getattr(config, name))
        # the learner's tensors trained in the "prompt" stage: those trainable when wrapped
        self._learner_trainable = [p for p in learner.parameters() if p.requires_grad]
        self.stage = "prompt"
        self.set_stage("prompt")

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **batch: Any) -> RobustOutput:
        """Logits for ``pixel_values``; the loss too when ``labels`` are given.

        In training mode the loss is the add-ons' training objective (reweighted task loss plus regularizers), plus
        the learner's own regulariser (``LearnerOutput.loss``, e.g. KgCoOp's) whenever the learner trains. In
        eval mode it is the plain mean cross-entropy, comparable across methods and defined before any add-on
        has been prepared (e.g. ``Trainer.evaluate()`` before training).

        Args:
            pixel_values: ``(batch, 3, H, W)`` normalised images.
            labels: ``(batch,)`` class indices.
            **batch: extra per-sample fields some add-ons read (e.g. ``groups``); others are ignored.
        """
        check_batch(pixel_values, labels, num_classes=class_count(self.learner))
        addons: list[RobustAddon] = list(self.addons.values())
        state = ForwardState(
            learner=self.learner,
            pixel_values=pixel_values,
            labels=labels,
            batch={"pixel_values": pixel_values, "labels": labels, **batch},
            stage=self.stage,
            training=self.training,
        )
        if labels is not None and self.stage != "prompt":
            for addon in addons:
                staged = addon.stage_loss(state)
                if staged is not None:
                    return RobustOutput(loss=staged[0], logits=None, logs=staged[1])
        override: dict[str, torch.Tensor] = {}
        for addon in addons:
            override.update(addon.prompt_override(state) or {})
        raw = self.learner(pixel_values, prompt_override=override) if override else self.learner(pixel_values)
        state.output = as_learner_output(raw)
        learner_loss = getattr(raw, "loss", None)  # the learner's own regulariser (LearnerOutput.loss), if any
        for addon in addons:
            state.output = addon.adjust_output(state) or state.output
        logits = state.output.logits
        if logits.dim() != 2 or logits.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"the learner returned logits of shape {tuple(logits.shape)}; expected (batch={pixel_values.shape[0]}, "
                "n_classes)."
            )
        logs: dict[str, float] = {}
        loss = None
        if labels is not None:
            per_sample = F.cross_entropy(logits, labels, reduction="none")  # (b,)
            # reweighting and regularizers are training objectives: in eval mode the loss is the plain mean CE
            terms = [t for addon in addons if (t := addon.loss_terms(state)) is not None] if self.training else []
            weights = None
            for term in terms:
                if term.weights is not None:
                    weights = term.weights if weights is None else weights * term.weights
            loss = per_sample.mean() if weights is None else (weights * per_sample).sum() / weights.sum()
            for term in terms:
                if term.loss is not None:
                    loss = loss + term.loss
                logs.update(term.logs)
            # the learner's regulariser is part of its training objective: added whenever the learner trains
            trains = self.stage == "prompt" or any(addon.trains_learner(self.stage) for addon in addons)
            if self.training and trains and learner_loss is not None:
                if not isinstance(learner_loss, torch.Tensor) or learner_loss.numel() != 1:
                    got = tuple(learner_loss.shape) if isinstance(learner_loss, torch.Tensor) else learner_loss
                    raise ValueError(
                        f"the learner's output.loss must be a scalar tensor (its regulariser) or None; got {got!r}."
                    )
                loss = loss + learner_loss.reshape(())
                logs["learner/loss"] = float(learner_loss.detach())
        return RobustOutput(loss=loss, logits=logits, logs=logs, learner_output=state.output)

    # -- training stages ---------------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        """``"prompt"`` (the learner's own training) followed by the add-ons' stages, in training order."""
        return ["prompt", *(stage for addon in self.addons.values() for stage in addon.stages)]

    def set_stage(self, stage: str) -> None:
        """Make exactly the tensors trained in ``stage`` require gradients (for :func:`prompt_robust.fit`, a
        plain loop or a Trainer); the add-ons read the stage from each forward's ``ForwardState``.

        Args:
            stage: one of :meth:`stages`.
        """
        if stage not in self.stages():
            from .config import unknown_name_error

            raise unknown_name_error("training stage", stage, self.stages())
        learner_on = stage == "prompt" or any(addon.trains_learner(stage) for addon in self.addons.values())
        for param in self._learner_trainable:
            param.requires_grad_(learner_on)
        for addon in self.addons.values():
            for param in addon.parameters():
                param.requires_grad_(False)
            for param in addon.stage_parameters(stage):
                param.requires_grad_(True)
        self.stage = stage

    def fit_addons(
        self,
        dataset: Any,
        *,
        phase: str | None = None,
        refit: bool = False,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
        resume: bool | str = True,
    ) -> dict[str, float]:
        """Fit the add-ons on ``dataset``: the one entry for everything add-ons learn from data.

        Each add-on declares its ``fit_phase``: ``"before_prompt"`` (what prompt tuning needs: the counterfactual
        generator, the invariant projection, the debias groups; :func:`prompt_robust.fit` fits these itself when
        they are not yet fitted) or ``"after_prompt"`` (stages trained on the tuned prompt: the refiner). An add-on
        fits directly or returns training stages, which run here, in order, with ``prompt_robust.fit``. The
        usual path is ``wrap → fit → fit_addons → predict``.

        Args:
            dataset: the training set the prompt is (or was) tuned on.
            phase: fit only the add-ons of this phase (one of ``"before_prompt"``, ``"after_prompt"``); None: both,
                in that order.
            refit: fit the add-ons again even when they are already fitted (by default a fitted add-on — fitted
                earlier or loaded with an adapter — is kept, and the log says so).
            seed: seed of the fits.
            cache_dir: where add-ons cache what they derive from the data (features, flows, targets).
            checkpoint_dir: where each training stage keeps resumable checkpoints (a subfolder per stage).
            progress: show progress bars.
            resume: how each stage treats checkpoints already in its subfolder, as ``fit``'s ``resume``: True
                continues an identical run, ``"new-settings"`` continues from the last good checkpoint with the
                settings given now, False refuses existing checkpoints.

        Returns:
            Logs of the fits and stages (e.g. ``invariance/dim``, ``refiner/final_loss``).
        """
        if phase is not None and phase not in FIT_PHASES:
            from .config import unknown_name_error

            raise unknown_name_error("add-on fit phase", phase, FIT_PHASES)
        phases = FIT_PHASES if phase is None else (phase,)
        logs: dict[str, float] = {}
        was_training, stage = self.training, self.stage
        try:
            for current in phases:
                for addon in self.addons.values():
                    if addon.fit_phase != current:
                        continue
                    if addon.fitted and not refit:
                        logger.info("the %r add-on is already fitted; kept (fit_addons(refit=True) refits)", addon.name)
                        continue
                    result = addon.fit(self, dataset, seed=seed, cache_dir=cache_dir, progress=progress)
                    self.set_stage(stage)  # an add-on's fit may have run the model
                    logs.update(result.logs)
                    for plan in result.stages:
                        if plan.stage not in addon.stages:
                            raise ValueError(
                                f"the {addon.name!r} add-on planned stage {plan.stage!r}, which it does not declare "
                                f"(its stages: {list(addon.stages)})."
                            )
                        logs[f"{plan.stage}/final_loss"] = self._run_stage(plan, seed, progress, checkpoint_dir, resume)
                        self.set_stage(stage)
        finally:
            self.set_stage(stage)
            self.train(was_training)
        return logs

    def _run_stage(
        self, plan: StagePlan, seed: int, progress: bool, checkpoint_dir: str | Path | None, resume: bool | str
    ) -> float:
        """Train one planned add-on stage with :func:`prompt_robust.fit`; its final loss."""
        from .training import FitConfig, fit

        self.set_stage(plan.stage)
        config = FitConfig(
            steps=plan.steps,
            batch_size=plan.batch_size,
            lr=plan.lr,
            optimizer=plan.optimizer,
            weight_decay=plan.weight_decay,
            warmup_steps=plan.warmup_steps,
            seed=seed,
            progress=progress,
            # resumable stages: a killed run continues from its last checkpoint, bit-identical
            checkpoint_every=None if checkpoint_dir is None else max(1, plan.steps // 5),
        )
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / plan.stage
        return fit(self, plan.dataset, config, checkpoint_dir=folder, resume=resume).final_loss

    def unfitted_addons(self, phase: str | None = None) -> list[str]:
        """Names of the enabled add-ons (of ``phase``, if given) that have something to fit and are not fitted."""
        return [
            name
            for name, addon in self.addons.items()
            if addon.fit_phase is not None and (phase is None or addon.fit_phase == phase) and not addon.fitted
        ]

    # -- composition -----------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Detach every add-on and return the learner, unchanged."""
        self.set_stage("prompt")
        for addon in self.addons.values():
            addon.detach()
        self.addons = nn.ModuleDict()
        return self.learner

    @property
    def backbone(self) -> ClipBackbone | None:
        return find_backbone(self.learner)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The add-ons' running training state (``{"<addon>.<name>": tensor}``), saved in training checkpoints
        (not in adapters): e.g. the debias add-on's EMA group statistics."""
        return {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, addon in self.addons.items()
            for key, value in addon.training_state().items()
        }

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`training_state` into prepared add-ons (after ``fit_addons`` on a resume)."""
        unknown = sorted({key.split(".", 1)[0] for key in state} - set(self.addons))
        if unknown:
            raise ValueError(
                f"the training state holds add-on(s) {unknown} that this model does not have (add-ons: "
                f"{sorted(self.addons)}); resume with the model that wrote the checkpoint."
            )
        for name, addon in self.addons.items():
            prefix = name + "."
            addon.load_training_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter holds: the learner's own parameters (never the frozen backbone's) and the
        add-ons' state. A learner without a ClipBackbone submodule contributes its trainable parameters."""
        backbone = find_backbone(self.learner)
        frozen = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        state = {}
        for name, param in self.learner.named_parameters():
            if id(param) in frozen or (backbone is None and not param.requires_grad):
                continue
            state[f"learner.{name}"] = param
        for name, tensor in self.addons.state_dict().items():
            state[f"addons.{name}"] = tensor
        return state

    # -- adapter files -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (trainable tensors only) to ``directory``.

        An existing adapter in ``directory`` is never replaced unless ``overwrite=True``; other files in the
        folder are left alone. The two files are one unit: the config records the size and sha256 of the weights
        it belongs to, both are written under temporary names, the config is renamed into place first, then the
        weights. Whenever this is interrupted (even by SIGKILL), the folder loads as the old adapter or the new
        one, never a mixture; concurrent saves into one folder take turns (see ``docs/adapters.md``,
        "Guarantees"). Temporary files orphaned by killed saves are removed.

        Args:
            directory: target folder (created if missing).
            overwrite: replace an adapter already saved there.

        Returns:
            The directory path.

        Raises:
            FileExistsError: ``directory`` holds an adapter and ``overwrite`` is False.
            ValueError: a tensor holds NaN or Inf (training diverged).
        """
        from . import __version__

        directory = Path(directory)
        tensors = self.trainable_state_dict()
        found = _non_finite_error(tensors)
        if found is not None:
            name, bad, size = found
            raise ValueError(
                f"refusing to save: adapter tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) of "
                f"{size}, so the adapter could not predict; training diverged. Retrain with a lower "
                "learning rate (or gradient clipping), or save the model of an earlier checkpoint."
            )
        learner = self.learner
        if isinstance(learner, PromptLearner):
            learner_info = {
                "type": learner.learner_type,
                "config": learner.hyperparameters(),
                "classnames": list(learner.classnames),
            }
        else:
            cls = type(learner)
            learner_info = {"type": "custom", "class": f"{cls.__module__}:{cls.__qualname__}"}
        backbone = self.backbone
        weights = _io.safetensors_bytes(tensors, {"format": "pt", "prompt_robust_version": __version__})
        config = {
            "library": "prompt_robust",
            "prompt_robust_version": __version__,
            "format_version": FORMAT_VERSION,
            "learner": learner_info,
            "robust_config": self.config.to_dict(),
            "backbone": backbone.identity().to_dict() if backbone is not None else None,
            "weights": {"file": ADAPTER_WEIGHTS_NAME, "sha256": _sha256(weights), "size": len(weights)},
        }
        config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
        config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
        directory.mkdir(parents=True, exist_ok=True)
        with _io.directory_lock(directory):  # another save into this folder waits (checked inside: no race)
            existing = [path.name for path in (config_path, weights_path) if path.exists()]
            if existing and not overwrite:
                raise FileExistsError(
                    f"{str(directory)!r} already holds an adapter ({', '.join(existing)}); pass overwrite=True to "
                    "replace it or choose another directory."
                )
            staged_weights = _io.stage_bytes(weights_path, weights)
            staged_config = None
            try:
                staged_config = _io.stage_bytes(config_path, config_bytes)
                _io.commit(staged_config, config_path)
            except BaseException:
                for staged in (staged_weights, staged_config):
                    if staged is not None:
                        staged.unlink(missing_ok=True)
                raise
            # The new config is visible: its weights must follow. If this rename is interrupted, it is tried once
            # more; failing that the staged file stays, and a load finds it by the config's hash.
            try:
                _io.commit(staged_weights, weights_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    _io.commit(staged_weights, weights_path)
                raise
            for path in (config_path, weights_path):
                _io.remove_stale_temps(path)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: ClipBackbone | None = None,
        *,
        learner: nn.Module | None = None,
        strict_backbone: bool = True,
    ) -> RobustPromptModel:
        """Load an adapter written by :meth:`save_pretrained`.

        The config is untrusted input: its structure, value types and sizes (bounded by the backbone's) are
        checked before anything is built, and the weights must be the ones the config records (a save that was
        interrupted or is running concurrently is never loaded half; see ``docs/adapters.md``, "Guarantees").

        Args:
            directory: the adapter folder.
            backbone: the CLIP backbone to attach a reference learner to (required unless ``learner`` is given).
            learner: an already built learner to load the weights into (required for custom learners).
            strict_backbone: refuse a backbone whose architecture or weights fingerprint differs from the one the
                adapter was trained on.

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            ValueError: a damaged, malformed, oversized or mismatched file, weights from another save, NaN/Inf
                weights, or another backbone; the message names the file and the fix.

        Example:
            >>> model = RobustPromptModel.from_pretrained("runs/coop", backbone=backbone)  # doctest: +SKIP
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist.")
        config_path = directory / ADAPTER_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"adapter directory {str(directory)!r} is missing {ADAPTER_CONFIG_NAME}; an adapter folder holds "
                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} as written by save_pretrained()."
            )
        saved, weights = _read_adapter_pair(directory)
        info = saved["learner"]
        robust = _config_from_dict(RobustConfig, saved["robust_config"], "robust_config", config_path)
        learner_cls = learner_config = None
        if learner is None:
            if info["type"] == "custom":
                raise ValueError(
                    f"the adapter holds a custom learner ({info.get('class', '?')}); build it and pass learner=... "
                    "to load its weights into it."
                )
            if backbone is None:
                raise ValueError("pass backbone=... (the CLIP backbone the adapter was trained on).")
            if not isinstance(backbone, ClipBackbone):
                raise TypeError(
                    f"backbone must be a prompt_robust ClipBackbone (e.g. prompt_robust.load_backbone(...)); got "
                    f"{type(backbone).__name__}."
                )
            if info["type"] not in LEARNERS:
                from .config import unknown_name_error

                err = unknown_name_error("learner type", info["type"], list(LEARNERS))
                raise _adapter_config_error(config_path, f"learner.type: {err}")
            learner_cls = LEARNERS[info["type"]]
            learner_config = _config_from_dict(learner_cls.config_class, info["config"], "learner.config", config_path)
            found = backbone
        else:
            if isinstance(learner, PromptLearner) and info["type"] != learner.learner_type:
                raise ValueError(
                    f"the adapter holds a {info['type']!r} learner; got a {learner.learner_type!r} learner."
                )
            found = find_backbone(learner)
        if strict_backbone and found is not None and saved.get("backbone"):
            diffs = found.identity().mismatches(saved["backbone"])
            if diffs:
                raise ValueError(
                    "this adapter was trained on another backbone: " + "; ".join(diffs) + ". Load it with the "
                    "backbone it was saved with, or pass strict_backbone=False to attach it anyway."
                )
        _check_sizes(learner_config, robust, found, config_path)  # before anything is allocated
        if learner is None:
            learner = learner_cls(backbone, info["classnames"], learner_config)
        model = cls(learner, robust)
        model._load_adapter_tensors(
            _io.safetensors_from_bytes(weights, directory / ADAPTER_WEIGHTS_NAME, "adapter weights"),
            directory / ADAPTER_WEIGHTS_NAME,
        )
        return model

    def load_adapter_weights(self, path: str | Path) -> None:
        """Copy the tensors of an ``adapter_model.safetensors`` into this model, checking names, shapes and that
        every value is finite (the model is unchanged when a check fails)."""
        self._load_adapter_tensors(_io.read_safetensors(path, "adapter weights"), Path(path))

    def _load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not match this model: missing {missing or 'none'}, unexpected "
                f"{unexpected or 'none'}. Was the adapter saved from another learner or configuration?"
            )
        for name, value in tensors.items():
            if tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"adapter tensor {name!r} has shape {tuple(value.shape)}; the model expects "
                    f"{tuple(own[name].shape)} (different n_ctx, depth, class count or backbone width?)."
                )
        found = _non_finite_error(tensors)
        if found is not None:
            name, bad, size = found
            raise ValueError(
                f"adapter tensor {name!r} in {str(path)!r} holds {bad} non-finite value(s) (NaN or Inf) of "
                f"{size}: the training that wrote it diverged. Retrain with a lower learning rate (or "
                "gradient clipping), or load an adapter saved before it diverged."
            )
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))


def wrap(learner: nn.Module, config: RobustConfig | None = None) -> RobustPromptModel:
    """Attach robustness add-ons to a prompt learner.

    Args:
        learner: a reference learner (:func:`prompt_robust.build_learner`) or your own module implementing the
            contract in ``docs/learner_contract.md``.
        config: which add-ons to enable; ``None`` or ``RobustConfig()`` enables none.

    Returns:
        A :class:`RobustPromptModel`; ``model.unwrap()`` gives the learner back.

    Example:
        >>> import prompt_robust as pr
        >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
        >>> model = pr.wrap(pr.build_learner("zeroshot", tiny_clip_backbone(layers=1), ["cat", "dog"]))
        >>> type(model).__name__
        'RobustPromptModel'
    """
    return RobustPromptModel(learner, config)
