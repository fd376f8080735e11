"""``wrap(learner, config)``: a prompt learner plus robustness add-ons, with PEFT-style adapter files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _io
from .addons import ADDONS, RobustAddon
from .backbones.base import ClipBackbone, find_backbone
from .config import RobustConfig
from .learners import LEARNERS, PromptLearner

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "RobustOutput", "RobustPromptModel", "wrap"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
_REQUIRED_METHODS = ("prompt_tokens", "image_features", "forward")


@dataclass
class RobustOutput:
    """What the wrapped model returns.

    Attributes:
        loss: scalar training loss when ``labels`` were given (task loss, reweighted, plus add-on terms).
        logits: ``(batch, n_classes)``; None in a stage that trains an add-on's own model (e.g. ``"refiner"``).
        logs: scalar diagnostics of the add-ons (floats), e.g. ``{"counterfactual/loss": 0.3}``.
        learner_output: whatever the learner returned (its features, for reference learners).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)
    learner_output: Any = None

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
        for name in config.enabled():
            if name not in ADDONS:
                raise NotImplementedError(
                    f"the {name!r} add-on is not available in this version of prompt_robust; available add-ons: "
                    f"{', '.join(sorted(ADDONS)) or 'none yet'}. Set RobustConfig.{name}=None."
                )
            self.addons[name] = ADDONS[name](learner, getattr(config, name))
        # the learner's tensors trained in the "prompt" stage: those trainable when wrapped
        self._learner_trainable = [p for p in learner.parameters() if p.requires_grad]
        self.stage = "prompt"
        self.set_stage("prompt")

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **batch: Any) -> RobustOutput:
        """Logits for ``pixel_values``; the loss too when ``labels`` are given.

        In training mode the loss is the add-ons' training objective (reweighted task loss plus regularizers). In
        eval mode it is the plain mean cross-entropy, comparable across methods and defined before any add-on
        has been prepared (e.g. ``Trainer.evaluate()`` before training).

        Args:
            pixel_values: ``(batch, 3, H, W)`` normalised images.
            labels: ``(batch,)`` class indices.
            **batch: extra per-sample fields some add-ons read (e.g. ``groups``); others are ignored.
        """
        addons: list[RobustAddon] = list(self.addons.values())
        if labels is not None and self.stage != "prompt":
            for addon in addons:
                staged = addon.stage_loss(self.stage, pixel_values, labels, batch)
                if staged is not None:
                    return RobustOutput(loss=staged[0], logits=None, logs=staged[1])
        override: dict[str, torch.Tensor] = {}
        for addon in addons:
            override.update(addon.prompt_override(pixel_values) or {})
        raw = self.learner(pixel_values, prompt_override=override) if override else self.learner(pixel_values)
        for addon in addons:
            raw = addon.adjust_output(raw)
        logits = raw if isinstance(raw, torch.Tensor) else raw.logits
        if logits.dim() != 2 or logits.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"the learner returned logits of shape {tuple(logits.shape)}; expected (batch={pixel_values.shape[0]}, "
                "n_classes)."
            )
        logs: dict[str, float] = {}
        loss = None
        if labels is not None:
            full = {"pixel_values": pixel_values, "labels": labels, **batch}
            per_sample = F.cross_entropy(logits, labels, reduction="none")  # (b,)
            weights = None
            objective = addons if self.training else []  # reweighting and regularizers are training objectives
            for addon in objective:
                w = addon.sample_weights(full, raw)
                if w is not None:
                    weights = w if weights is None else weights * w
            loss = per_sample.mean() if weights is None else (weights * per_sample).sum() / weights.sum()
            for addon in objective:
                extra, addon_logs = addon.extra_loss(full, raw)
                if extra is not None:
                    loss = loss + extra
                logs.update(addon_logs)
        return RobustOutput(loss=loss, logits=logits, logs=logs, learner_output=raw)

    # -- training stages ---------------------------------------------------------------------------------------
    def stages(self) -> list[str]:
        """``"prompt"`` (the learner's own training) followed by the add-ons' stages, in training order."""
        return ["prompt", *(stage for addon in self.addons.values() for stage in addon.stages)]

    def set_stage(self, stage: str) -> None:
        """Make exactly the tensors trained in ``stage`` require gradients (for :func:`prompt_robust.fit`, a
        plain loop or a Trainer) and tell the add-ons which stage runs.

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
            addon.stage = stage
        self.stage = stage

    def prepare_addons(
        self, dataset: Any, *, seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True
    ) -> dict[str, float]:
        """Fit what the add-ons need before the prompt is trained (call before training the ``"prompt"`` stage).

        Args:
            dataset: the training set the prompt will be tuned on.
            seed: seed of the add-on fits.
            cache_dir: where add-ons cache what they derive from the data.
            progress: show progress bars.
        """
        logs: dict[str, float] = {}
        was_training = self.training
        try:
            for addon in self.addons.values():
                logs.update(addon.prepare(self, dataset, seed=seed, cache_dir=cache_dir, progress=progress))
        finally:
            self.set_stage(self.stage)
            self.train(was_training)
        return logs

    def fit_addons(
        self,
        dataset: Any,
        *,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Train every add-on's own stages on ``dataset`` (after the learner's prompt was trained), then return to
        the ``"prompt"`` stage.

        Args:
            dataset: the training set the prompt was tuned on.
            seed: seed of the add-on trainings.
            cache_dir: where add-ons cache what they derive from the data (e.g. the refiner's targets).
            checkpoint_dir: where each stage keeps resumable checkpoints (a subfolder per stage).
            progress: show progress bars.

        Returns:
            Logs of the stages (final losses, target statistics).
        """
        logs: dict[str, float] = {}
        was_training = self.training
        try:
            for addon in self.addons.values():
                logs.update(
                    addon.fit_stages(
                        self, dataset, seed=seed, cache_dir=cache_dir, checkpoint_dir=checkpoint_dir, progress=progress
                    )
                )
        finally:
            self.set_stage("prompt")
            self.train(was_training)
        return logs

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
        """Restore :meth:`training_state` into prepared add-ons (after ``prepare_addons`` on a resume)."""
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
        folder are left alone. Each file is written to a temporary name and renamed into place, the config last,
        so an interrupted save never leaves a loadable half-adapter.

        Args:
            directory: target folder (created if missing).
            overwrite: replace an adapter already saved there.

        Returns:
            The directory path.
        """
        from . import __version__

        directory = Path(directory)
        existing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if (directory / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{str(directory)!r} already holds an adapter ({', '.join(existing)}); pass overwrite=True to "
                "replace it or choose another directory."
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
        config = {
            "library": "prompt_robust",
            "prompt_robust_version": __version__,
            "format_version": FORMAT_VERSION,
            "learner": learner_info,
            "robust_config": self.config.to_dict(),
            "backbone": backbone.identity().to_dict() if backbone is not None else None,
        }
        metadata = {"format": "pt", "prompt_robust_version": __version__}
        _io.write_safetensors(directory / ADAPTER_WEIGHTS_NAME, self.trainable_state_dict(), metadata=metadata)
        _io.write_json(directory / ADAPTER_CONFIG_NAME, config)
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

        Args:
            directory: the adapter folder.
            backbone: the CLIP backbone to attach a reference learner to (required unless ``learner`` is given).
            learner: an already built learner to load the weights into (required for custom learners).
            strict_backbone: refuse a backbone whose architecture or weights fingerprint differs from the one the
                adapter was trained on.

        Example:
            >>> model = RobustPromptModel.from_pretrained("runs/coop", backbone=backbone)  # doctest: +SKIP
        """
        from . import __version__

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist.")
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"adapter directory {str(directory)!r} is missing {name}; an adapter folder holds "
                    f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} as written by save_pretrained()."
                )
        saved = _io.read_json(directory / ADAPTER_CONFIG_NAME, "adapter config")
        if saved.get("library") != "prompt_robust" or "format_version" not in saved:
            raise ValueError(f"{str(directory)!r} does not hold a prompt_robust adapter (no prompt_robust stamp).")
        if saved["format_version"] != FORMAT_VERSION or _version_tuple(saved["prompt_robust_version"]) > _version_tuple(
            __version__
        ):
            raise ValueError(
                f"adapter was saved by prompt_robust {saved['prompt_robust_version']} (format "
                f"{saved['format_version']}); this is prompt_robust {__version__} (format {FORMAT_VERSION}). "
                "Upgrade prompt_robust to load it."
            )
        info = saved["learner"]
        if learner is None:
            if info["type"] == "custom":
                raise ValueError(
                    f"the adapter holds a custom learner ({info['class']}); build it and pass learner=... to load "
                    "its weights into it."
                )
            if backbone is None:
                raise ValueError("pass backbone=... (the CLIP backbone the adapter was trained on).")
            if info["type"] not in LEARNERS:
                raise ValueError(f"unknown learner type {info['type']!r} in the adapter; known: {sorted(LEARNERS)}.")
            learner_cls = LEARNERS[info["type"]]
            learner = learner_cls(backbone, info["classnames"], learner_cls.config_class.from_dict(info["config"]))
        elif isinstance(learner, PromptLearner) and info["type"] != learner.learner_type:
            raise ValueError(f"the adapter holds a {info['type']!r} learner; got a {learner.learner_type!r} learner.")
        found = find_backbone(learner)
        if strict_backbone and found is not None and saved.get("backbone"):
            diffs = found.identity().mismatches(saved["backbone"])
            if diffs:
                raise ValueError(
                    "this adapter was trained on another backbone: " + "; ".join(diffs) + ". Load it with the "
                    "backbone it was saved with, or pass strict_backbone=False to attach it anyway."
                )
        model = cls(learner, RobustConfig.from_dict(saved["robust_config"]))
        model.load_adapter_weights(directory / ADAPTER_WEIGHTS_NAME)
        return model

    def load_adapter_weights(self, path: str | Path) -> None:
        """Copy the tensors of an ``adapter_model.safetensors`` into this model, checking names and shapes."""
        tensors = _io.read_safetensors(path, "adapter weights")
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
