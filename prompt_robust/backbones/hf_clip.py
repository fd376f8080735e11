"""transformers ``CLIPModel`` (plain or wrapped by PEFT) as a :class:`ClipBackbone`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .base import ClipBackbone

__all__ = ["HFClipBackbone"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_REQUIRED_FILES = ("config.json",)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _features(output) -> torch.Tensor:
    # transformers >= 5 returns an output object whose pooler_output is the projected vector; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_local_checkpoint(path: str | Path) -> Path:
    """Return ``path`` as a directory holding a transformers CLIP checkpoint, or raise an error naming what is
    missing. Only local directories are accepted: nothing is ever downloaded."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"CLIP checkpoint directory {str(path)!r} does not exist. prompt_robust loads backbones from local "
            "directories only (it never downloads): pass a directory written by CLIPModel.save_pretrained() "
            "together with its tokenizer (tokenizer.save_pretrained())."
        )
    missing = [name for name in _REQUIRED_FILES if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if missing:
        raise FileNotFoundError(
            f"{str(directory)!r} is not a complete CLIP checkpoint: missing {', '.join(missing)}. Expected the "
            "layout written by CLIPModel.save_pretrained() and CLIPTokenizer.save_pretrained() (safetensors "
            "weights only; pickled .bin files are not loaded)."
        )
    return directory


class HFClipBackbone(ClipBackbone):
    """A transformers CLIP model, optionally wrapped by PEFT (e.g. LoRA on ``q_proj``/``v_proj``).

    Args:
        model: a ``transformers.CLIPModel`` or a ``peft.PeftModel`` around one.
        tokenizer: the matching ``CLIPTokenizer`` (fast or slow).
        name: where the weights came from, stored in adapter files for information.
        image_mean / image_std: normalisation the vision tower was trained with (OpenAI's by default).

    Example:
        >>> backbone = HFClipBackbone.from_pretrained("/models/clip-vit-base-patch16")  # doctest: +SKIP
        >>> ids = backbone.tokenize(["a photo of a dog."])  # doctest: +SKIP
    """

    backbone_type = "hf_clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        name: str = "",
        image_mean: Sequence[float] = OPENAI_MEAN,
        image_std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__(name=name)
        clip = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not (hasattr(clip, "text_model") and hasattr(clip, "vision_model") and hasattr(clip, "text_projection")):
            raise TypeError(
                f"HFClipBackbone needs a transformers CLIPModel (or a PEFT model wrapping one); got "
                f"{type(clip).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        text_cfg = clip.config.text_config
        vision_cfg = clip.config.vision_config
        self._dims = {
            "embed_dim": int(clip.config.projection_dim),
            "text_width": int(text_cfg.hidden_size),
            "vision_width": int(vision_cfg.hidden_size),
            "image_size": int(vision_cfg.image_size),
            "context_length": int(text_cfg.max_position_embeddings),
            "vocab_size": int(text_cfg.vocab_size),
            "num_text_layers": int(text_cfg.num_hidden_layers),
            "num_vision_layers": int(vision_cfg.num_hidden_layers),
        }
        self._eos_token_id = int(text_cfg.eos_token_id)
        self._check_tokenizer()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> HFClipBackbone:
        """Load a CLIP checkpoint and tokenizer from a local directory (``local_files_only=True``).

        Args:
            path: directory written by ``CLIPModel.save_pretrained`` and ``CLIPTokenizer.save_pretrained``.
            **kwargs: forwarded to ``CLIPModel.from_pretrained`` (e.g. ``torch_dtype``).
        """
        from transformers import CLIPModel, CLIPTokenizer

        directory = check_local_checkpoint(path)
        model = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        mean, std = OPENAI_MEAN, OPENAI_STD
        processor_file = directory / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            mean = processor.get("image_mean", mean)
            std = processor.get("image_std", std)
        return cls(model.eval(), tokenizer, name=str(directory), image_mean=mean, image_std=std)

    # ------------------------------------------------------------------------------------------------------
    @property
    def clip(self) -> nn.Module:
        """The underlying ``CLIPModel`` (inside the PEFT wrapper if there is one)."""
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def dims(self) -> dict[str, int]:
        return self._dims

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.text_model.embeddings.token_embedding

    @property
    def text_layers(self) -> Sequence[nn.Module]:
        return self.clip.text_model.encoder.layers

    @property
    def vision_layers(self) -> Sequence[nn.Module]:
        return self.clip.vision_model.encoder.layers

    @property
    def logit_scale(self) -> torch.Tensor:
        # not clamped, as transformers' CLIPModel.forward and the learners' reference repositories
        return self.clip.logit_scale.exp()

    @property
    def is_peft(self) -> bool:
        """Whether the CLIP model is wrapped by PEFT (its adapter weights are then trained with the prompts)."""
        return hasattr(self.model, "get_base_model")

    def peft_description(self) -> str:
        if not self.is_peft:
            return ""
        parts = []
        for name, config in sorted(getattr(self.model, "peft_config", {}).items()):
            kind = getattr(getattr(config, "peft_type", None), "value", str(getattr(config, "peft_type", "?")))
            targets = getattr(config, "target_modules", None) or []
            targets = ",".join(sorted(targets)) if not isinstance(targets, str) else targets
            rank = getattr(config, "r", None)
            parts.append(f"{name}={kind}({targets}" + (f";r={rank}" if rank is not None else "") + ")")
        return " ".join(parts) or "peft"

    def freeze(self) -> None:
        # A PEFT model already froze its base weights and left its adapters (LoRA, modules_to_save) trainable:
        # keep that choice, so LoRA and prompts train together.
        if not self.is_peft:
            self.requires_grad_(False)

    def _check_tokenizer(self) -> None:
        # A tokenizer whose EOT id the model does not pool at silently reads the wrong token: refuse it.
        vocab = self._dims["vocab_size"]
        eot = self.tokenizer.eos_token_id
        if eot is None or eot >= vocab:
            raise ValueError(
                f"tokenizer EOT id {eot} is outside the model vocabulary ({vocab}); the tokenizer does not "
                "belong to this checkpoint."
            )
        if self._eos_token_id == 2 and eot != max(self.tokenizer.get_vocab().values()):
            raise ValueError(
                f"model config has the legacy eos_token_id=2, so pooling reads the largest token id, but the "
                f"tokenizer's EOT id {eot} is not the largest: pooling would read the wrong position. Set "
                "config.text_config.eos_token_id to the tokenizer's EOT id."
            )
        if self._eos_token_id != 2 and self._eos_token_id != eot:
            raise ValueError(
                f"model config eos_token_id={self._eos_token_id} but the tokenizer's EOT id is {eot}: pooling "
                "would read the wrong position. Set config.text_config.eos_token_id to the tokenizer's id."
            )

    def tokenize(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(list(texts), padding=False, truncation=False)["input_ids"]
        length = self.context_length
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = torch.full((len(ids), length), int(pad), dtype=torch.long)
        for row, (text, tokens) in enumerate(zip(texts, ids, strict=True)):
            if len(tokens) > length and truncate:
                tokens = [*tokens[: length - 1], tokens[-1]]  # the first tokens, then EOT
            if len(tokens) > length:
                raise ValueError(
                    f"text {text!r} is {len(tokens)} tokens long, more than the context length {length}; shorten "
                    "it (or use fewer context tokens)."
                )
            out[row, : len(tokens)] = torch.tensor(tokens)
        return out.to(self.device)

    def eot_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The same rule as CLIPTextTransformer: legacy configs (eos_token_id == 2) take the largest id.
        if self._eos_token_id == 2:
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids == self._eos_token_id).to(torch.int).argmax(dim=-1)

    def _run_text(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        # No padding mask: the causal mask already keeps every token up to EOT from seeing the padding, which
        # is how CLIP was trained (and what open_clip does). CLIPTextTransformer takes position ids 0..L-1 and
        # builds its causal mask from the length of what it is given, and its pooling rule finds the same EOT in
        # the kept prefix, so the trimmed ids are all it needs.
        return _features(self.clip.get_text_features(input_ids=input_ids[:, :length]))

    def _run_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.clip.get_image_features(pixel_values=pixel_values.to(self.dtype)))

    def _register_patch_tokens_hook(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        # CLIPVisionEmbeddings returns (b, 1 + n_patches, w) with position embeddings added; pre_layrnorm follows.
        return self.clip.vision_model.embeddings.register_forward_hook(lambda _m, _i, out: fn(out))
