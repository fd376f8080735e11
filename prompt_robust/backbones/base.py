"""The backbone protocol every CLIP implementation is adapted to.

A prompt learner never touches a concrete CLIP class. It talks to a :class:`ClipBackbone`, which offers:

* ``tokenize(texts)`` -> token ids padded to the context length, EOT kept in place;
* ``token_embedding`` (the embedding table) and ``eot_positions(input_ids)`` (where pooling reads);
* ``text_length(input_ids)``: how many leading positions the text tower runs (see below);
* ``encode_text(input_ids, token_embeds=..., deep_prompts=...)`` -> projected text features;
* ``encode_image(pixel_values, prompts=..., deep_prompts=...)`` -> projected image features;
* ``logit_scale`` and the dimensions of both towers.

Prompts are injected with forward hooks that live only for the duration of one call, so a backbone is
never left modified: nothing has to be "unhooked" afterwards, and the same backbone can be shared by
several learners.

Text sequences are trimmed: the text tower is causal and pools one position per sequence (the EOT token), so no
position after the batch's last pooled one can change a text feature. ``encode_text`` therefore runs only the
first :meth:`ClipBackbone.text_length` positions (e.g. 8 of CLIP's 77 for ``"a photo of a cat."``); the
features are those of the full run up to float rounding. ``trim_text = False`` (or ``trim=False``) runs all of
them, for comparison or a fixed shape.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["BackboneIdentity", "ClipBackbone", "find_backbone"]

# (batch, length, width) hidden states are rewritten in place of these positions: index 0 is the BOS token of
# the text tower and the CLS token of the vision tower, so prompts always start right after it.
PROMPT_START = 1


@dataclass(frozen=True)
class BackboneIdentity:
    """What an adapter needs to know to refuse a backbone it was not trained on.

    ``fingerprint`` hashes a few weight tensors: two backbones with the same architecture but different weights
    (e.g. two different pretrainings) have different fingerprints.
    """

    type: str
    name: str
    embed_dim: int
    text_width: int
    vision_width: int
    image_size: int
    context_length: int
    vocab_size: int
    num_text_layers: int
    num_vision_layers: int
    fingerprint: str
    #: PEFT adapters wrapped around the CLIP weights ("" for none), e.g. "default=LORA(q_proj,v_proj;r=4)"
    peft: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatches(self, other: Mapping) -> list[str]:
        """Names and values of the fields that differ from ``other`` (a saved identity dict)."""
        diffs = []
        for key, value in self.to_dict().items():
            if key == "name":  # the same weights may live at another path
                continue
            if key in other and other[key] != value:
                diffs.append(f"{key}: adapter has {other[key]!r}, backbone has {value!r}")
                if key == "peft" and other[key]:
                    diffs[-1] += " (load the PEFT adapter first: peft.PeftModel.from_pretrained(clip, lora_dir))"
        return diffs


def _expand_prompts(prompts: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Broadcast ``(n, width)`` or ``(1|batch, n, width)`` prompts to ``(batch, n, width)``."""
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0)
    if prompts.dim() != 3 or prompts.shape[0] not in (1, batch):
        raise ValueError(
            f"{what} must have shape (n_tokens, width) or (batch, n_tokens, width) with batch 1 or {batch}; "
            f"got {tuple(prompts.shape)}."
        )
    return prompts.expand(batch, -1, -1)


class ClipBackbone(nn.Module, ABC):
    """A frozen CLIP model seen through the interface prompt learners need.

    Subclasses adapt one implementation (transformers, open_clip, ...) by naming where the token embedding,
    the transformer layers and the vision patch tokens live; the prompt-injection logic is shared here.

    Attributes:
        backbone_type: Registry name, stored in adapter files.
        name: Where the weights came from (a path or a model name), informational.
        image_mean / image_std: Per-channel normalisation the vision tower expects.
    """

    backbone_type: str = "abstract"

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------------
    # What a subclass provides
    # ----------------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The text token embedding table, ``(vocab_size, text_width)``."""

    @property
    @abstractmethod
    def text_layers(self) -> Sequence[nn.Module]:
        """Text transformer blocks, in order."""

    @property
    @abstractmethod
    def vision_layers(self) -> Sequence[nn.Module]:
        """Vision transformer blocks, in order."""

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """The (exponentiated) temperature CLIP multiplies cosine similarities by; a 0-dim tensor."""

    @property
    @abstractmethod
    def dims(self) -> dict[str, int]:
        """``embed_dim, text_width, vision_width, image_size, context_length, vocab_size, num_*_layers``."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Token ids ``(n, context_length)`` on the backbone's device; raises if a text does not fit, unless
        ``truncate`` (free captions, e.g. for retrieval: the tokens that fit, then EOT, as CLIP's tokenizer does)."""

    @abstractmethod
    def eot_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the token pooled into the text feature, ``(n,)``, with the model's own rule."""

    @abstractmethod
    def _run_text(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        """The implementation's projected text features for ``input_ids`` (hooks may be active).

        Args:
            input_ids: ``(n, context_length)`` token ids, as given to :meth:`encode_text`.
            length: run only positions ``0 .. length - 1`` (position embeddings ``0 .. length - 1``, a
                ``length x length`` causal mask); every pooled position and every deep-prompt slot lies inside.
                The token-embedding hook of :meth:`encode_text` answers a lookup of all ids or of the first
                ``length``, whichever the implementation makes. Running all positions instead is correct, only
                slower.
        """

    @abstractmethod
    def _run_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The implementation's projected image features (hooks may be active)."""

    @abstractmethod
    def _register_patch_tokens_hook(
        self, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn`` on the ``(batch, 1 + n_patches, width)`` vision tokens right before the first block.

        The tokens already carry position embeddings, so prompts inserted by ``fn`` get none (as in VPT).
        """

    #: whether transformer blocks see ``(batch, length, width)`` (True) or ``(length, batch, width)``.
    layers_batch_first: bool = True

    #: run the text tower on the first :meth:`text_length` positions only (exact, see the module docstring); set
    #: it to False on an instance to run all ``context_length`` positions (to compare, or to keep one fixed shape
    #: for CUDA graphs / ``torch.compile``). ``encode_text(..., trim=...)`` overrides it for one call.
    trim_text: bool = True

    # ----------------------------------------------------------------------------------------------------
    # Shared public interface
    # ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def embed_dim(self) -> int:
        return self.dims["embed_dim"]

    @property
    def text_width(self) -> int:
        return self.dims["text_width"]

    @property
    def vision_width(self) -> int:
        return self.dims["vision_width"]

    @property
    def image_size(self) -> int:
        return self.dims["image_size"]

    @property
    def context_length(self) -> int:
        return self.dims["context_length"]

    @property
    def num_text_layers(self) -> int:
        return self.dims["num_text_layers"]

    @property
    def num_vision_layers(self) -> int:
        return self.dims["num_vision_layers"]

    def freeze(self) -> None:
        """Stop gradients to the backbone's own weights (prompt learners train prompts only)."""
        self.requires_grad_(False)

    def identity(self) -> BackboneIdentity:
        """Architecture and weight fingerprint, saved beside every adapter."""
        return BackboneIdentity(
            type=self.backbone_type,
            name=str(self.name),
            fingerprint=self.fingerprint(),
            peft=self.peft_description(),
            **self.dims,
        )

    def peft_description(self) -> str:
        """The PEFT adapters trained with the prompts ("" for none): prompts trained through a LoRA are only
        valid with that LoRA loaded, so adapters record it and loading checks it."""
        return ""

    def fingerprint(self) -> str:
        """A short hash of the token embedding table and of the first vision block's weights."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            tensors = [self.token_embedding.weight[:1024]]
            tensors += [p for p in self.vision_layers[0].parameters()][:4]
            for tensor in tensors:
                data = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(str(tuple(data.shape)).encode())
                digest.update(data.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError that says how to fix images of the wrong rank, channels or size."""
        size = self.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (batch, 3, {size}, {size}) tensor; got {shape}.")
        if pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (size, size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but this backbone expects "
                f"(batch, 3, {size}, {size}). Resize images to {size}x{size} (e.g. with "
                f"prompt_robust.data.transform_for(backbone)) before calling the model."
            )

    def text_length(self, input_ids: torch.Tensor, deep_prompts: Mapping[int, torch.Tensor] | None = None) -> int:
        """How many leading positions the text tower must run for ``input_ids``: the last pooled position of the
        batch + 1, widened to hold every deep prompt (``1 + n_tokens``), at most ``input_ids.shape[1]``.

        With the causal mask a position only sees positions before it, so the pooled (EOT) states, and hence the
        features, do not depend on anything later. Deep prompts longer than a short prompt's EOT still get their
        slots (positions after the EOT that they rewrite cannot change the features either, but they must exist).

        Args:
            input_ids: ``(n, context_length)`` token ids.
            deep_prompts: ``{layer_index: (n | 1, n_tokens, text_width)}`` as for :meth:`encode_text`.

        Example:
            >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
            >>> backbone = tiny_clip_backbone(layers=1)
            >>> ids = backbone.tokenize(["a cat.", "a photo of a cat."])  # BOS ... EOT, padded to 24
            >>> backbone.eot_positions(ids).tolist(), backbone.text_length(ids)
            ([4, 7], 8)
        """
        full = input_ids.shape[-1]
        if input_ids.numel() == 0:
            return full
        pooled = int(self.eot_positions(input_ids).max()) + 1  # one host sync per call
        deep = max((PROMPT_START + prompts.shape[-2] for prompts in (deep_prompts or {}).values()), default=0)
        return min(full, max(pooled, deep))

    def encode_text(
        self,
        input_ids: torch.Tensor,
        token_embeds: torch.Tensor | None = None,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
        trim: bool | None = None,
    ) -> torch.Tensor:
        """Projected (unnormalised) text features.

        Args:
            input_ids: ``(n, context_length)`` token ids; they decide where EOT pooling reads.
            token_embeds: optional ``(n, context_length, text_width)`` to use instead of the token embedding
                lookup (this is how learned context vectors enter the text tower).
            deep_prompts: ``{layer_index: (n | 1, n_tokens, text_width)}``; before block ``layer_index`` (>= 1)
                the hidden states right after BOS are replaced by these tokens (MaPLe's deep text prompts).
            trim: run only the first :meth:`text_length` positions (the same features: the tower is causal and
                pools at EOT); None: the backbone's ``trim_text`` (True unless switched off).

        Returns:
            ``(n, embed_dim)`` text features.

        Example:
            >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
            >>> backbone = tiny_clip_backbone(layers=1)
            >>> ids = backbone.tokenize(["a photo of a cat."])
            >>> diff = backbone.encode_text(ids) - backbone.encode_text(ids, trim=False)
            >>> bool(diff.abs().max() < 1e-5)
            True
        """
        full = input_ids.shape[-1]
        length = self.text_length(input_ids, deep_prompts) if (self.trim_text if trim is None else trim) else full
        with contextlib.ExitStack() as stack:
            if token_embeds is not None:
                expected = (*input_ids.shape, self.text_width)
                if tuple(token_embeds.shape) != expected:
                    raise ValueError(f"token_embeds must have shape {expected}; got {tuple(token_embeds.shape)}.")
                embeds = token_embeds.to(self.dtype)
                # (n, L', w): the implementation looks up all ids or only the kept ones; answer as many positions
                handle = self.token_embedding.register_forward_hook(lambda _m, _i, out: embeds[:, : out.shape[-2]])
                stack.callback(handle.remove)
            if deep_prompts:
                self._hook_deep(stack, self.text_layers, deep_prompts, "deep text prompts")
            return self._run_text(input_ids, length)

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        prompts: torch.Tensor | None = None,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Projected (unnormalised) image features.

        Args:
            pixel_values: ``(batch, 3, image_size, image_size)`` normalised images.
            prompts: ``(n_tokens, vision_width)`` or ``(batch, n_tokens, vision_width)`` visual prompt tokens
                inserted right after CLS (VPT-shallow; MaPLe's first-layer vision prompts).
            deep_prompts: ``{layer_index: (batch | 1, n_tokens, vision_width)}``; before block ``layer_index``
                (>= 1) the tokens right after CLS are replaced (VPT-deep, MaPLe). Requires ``prompts``.

        Returns:
            ``(batch, embed_dim)`` image features.
        """
        self.check_pixel_values(pixel_values)
        if deep_prompts and prompts is None:
            raise ValueError("deep visual prompts replace inserted prompt tokens: pass `prompts` as well.")
        with contextlib.ExitStack() as stack:
            if prompts is not None:
                batch = pixel_values.shape[0]
                inserted = _expand_prompts(prompts, batch, "visual prompts").to(self.dtype)

                def insert(tokens: torch.Tensor) -> torch.Tensor:
                    # (b, 1 + n_patches, w) -> (b, 1 + n_prompts + n_patches, w)
                    return torch.cat([tokens[:, :PROMPT_START], inserted, tokens[:, PROMPT_START:]], dim=1)

                handle = self._register_patch_tokens_hook(insert)
                stack.callback(handle.remove)
            if deep_prompts:
                self._hook_deep(stack, self.vision_layers, deep_prompts, "deep visual prompts")
            return self._run_image(pixel_values)

    # ----------------------------------------------------------------------------------------------------
    # Helpers
    # ----------------------------------------------------------------------------------------------------
    def _hook_deep(
        self,
        stack: contextlib.ExitStack,
        layers: Sequence[nn.Module],
        deep_prompts: Mapping[int, torch.Tensor],
        what: str,
    ) -> None:
        for index, prompts in deep_prompts.items():
            if not 1 <= index < len(layers):
                raise ValueError(f"{what}: layer index {index} is out of range 1..{len(layers) - 1}.")
            handle = layers[index].register_forward_pre_hook(self._replacer(prompts, what), with_kwargs=True)
            stack.callback(handle.remove)

    def _replacer(self, prompts: torch.Tensor, what: str) -> Callable:
        batch_first = self.layers_batch_first

        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            from_kwargs = not args
            hidden = kwargs["hidden_states"] if from_kwargs else args[0]
            if not batch_first:
                hidden = hidden.transpose(0, 1)
            # hidden: (b, length, w); prompts: (1 | b, n, w)
            new = _expand_prompts(prompts, hidden.shape[0], what).to(hidden.dtype)
            end = PROMPT_START + new.shape[1]
            if end > hidden.shape[1]:
                raise ValueError(f"{what}: {new.shape[1]} tokens do not fit in a sequence of {hidden.shape[1]}.")
            hidden = torch.cat([hidden[:, :PROMPT_START], new, hidden[:, end:]], dim=1)
            if not batch_first:
                hidden = hidden.transpose(0, 1)
            if from_kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return hook


def find_backbone(module: nn.Module) -> ClipBackbone | None:
    """The first :class:`ClipBackbone` inside ``module`` (e.g. a learner's frozen CLIP), or None."""
    return next((m for m in module.modules() if isinstance(m, ClipBackbone)), None)
