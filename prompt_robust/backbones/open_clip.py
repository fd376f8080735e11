"""open_clip ``CLIP`` models as a :class:`ClipBackbone` (optional extra: ``pip install 'prompt_robust[open_clip]'``).

What the adapter relies on in open_clip (checked against open_clip_torch 3.3):

* ``CLIP.encode_text`` looks tokens up through the ``token_embedding`` module, so the shared forward hook of
  :meth:`ClipBackbone.encode_text` injects learned context. It adds the full ``(context_length, width)``
  ``positional_embedding`` and passes the full causal ``attn_mask`` buffer to ``transformer``; to run a trimmed
  sequence (:meth:`ClipBackbone.text_length`) a pre-hook on ``transformer`` keeps the first ``L`` positions of
  its input (position embeddings already added, so positions ``0 .. L-1`` keep theirs) and the top-left
  ``L x L`` block of the mask. ``ln_final`` works per position and the pooling indexes the (shorter) states with
  the full ids, whose EOT lies inside the kept prefix. Towers without a causal mask (``attn_mask`` None) are
  never trimmed. The transformer's input is ``(batch, length, width)`` when it has a ``batch_first`` attribute
  (open_clip >= 2.26, which transposes inside), else ``(length, batch, width)``.
* The text tower pools at ``argmax(input_ids)`` (``text_pool_type='argmax'``, the CLIP BPE's EOT id 49407 is the
  largest id) or at the first ``eos_id`` (``'eos'``). Towers pooling at a fixed position (``'first'``, ``'last'``:
  SigLIP / CLIPA style) or not at all (``'none'``) are refused: the reference learners lay prompts out around
  the EOT token.
* ``VisionTransformer._embeds`` adds the class token and position embeddings, applies patch dropout, then
  ``ln_pre``; visual prompts are inserted by a forward pre-hook on ``ln_pre``, so (as in MaPLe's reference code)
  they are normalised by ``ln_pre`` but get no position embedding. The vision transformer runs without an
  attention mask, so a longer sequence is fine.
* ``Transformer.batch_first`` is True since open_clip 2.24 (blocks see ``(batch, length, width)``); older
  releases ran ``(length, batch, width)`` and had no such attribute, which the adapter reads as False.

Only the plain ``open_clip.CLIP`` with a ViT image tower is supported: ``CustomTextCLIP`` / ``CoCa`` (Hugging Face
or custom text towers), ``ModifiedResNet`` and timm image towers are refused at construction with a
``TypeError``. A ResNet tower could serve text-only learners, but a backbone that breaks half of the learners
at run time is worse than a clear refusal up front.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import unknown_name_error
from .base import ClipBackbone
from .hf_clip import OPENAI_MEAN, OPENAI_STD

__all__ = ["OpenClipBackbone", "tiny_open_clip_backbone"]

#: text pooling rules whose pooled position is the EOT token (what the reference learners need).
_EOT_POOLS = ("argmax", "eos")
_INSTALL_HINT = "pip install 'prompt_robust[open_clip]'"


def _import_open_clip():
    """The ``open_clip`` module, or an ImportError that says how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"OpenClipBackbone needs the open_clip_torch package, which is not installed: {_INSTALL_HINT}"
        ) from error
    return open_clip


def _check_model_config(name: str, config: Mapping[str, Any]) -> None:
    """Refuse, before anything is built (or downloaded), configs this adapter cannot serve."""
    text_cfg = config.get("text_cfg", {})
    vision_cfg = config.get("vision_cfg", {})
    if config.get("custom_text") or "hf_model_name" in text_cfg or "multimodal_cfg" in config:
        raise TypeError(
            f"open_clip model {name!r} has a custom or Hugging Face text tower (CustomTextCLIP/CoCa); "
            "OpenClipBackbone supports models with open_clip's own text transformer (e.g. ViT-B-16, ViT-L-14). "
            "For Hugging Face towers use HFClipBackbone with a transformers CLIP checkpoint."
        )
    if "timm_model_name" in vision_cfg or not isinstance(vision_cfg.get("layers", 12), int):
        kind = "timm" if "timm_model_name" in vision_cfg else "ModifiedResNet"
        raise TypeError(
            f"open_clip model {name!r} has a {kind} image tower; visual prompt learners (VPT, MaPLe) need "
            "open_clip's VisionTransformer, so OpenClipBackbone only accepts ViT models (e.g. ViT-B-16)."
        )
    pool = text_cfg.get("pool_type", "argmax")
    if pool not in _EOT_POOLS:
        raise NotImplementedError(_pool_message(name, pool))


def _pool_message(name: str, pool: str) -> str:
    return (
        f"open_clip model {name!r} pools its text tower with text_pool_type={pool!r}; OpenClipBackbone supports "
        f"towers that pool at the EOT token ({', '.join(map(repr, _EOT_POOLS))}), around which the prompt learners "
        "lay out their context tokens."
    )


def _check_weights_file(weights: str | Path) -> Path:
    """``weights`` as an existing local ``.safetensors`` file, or an error saying how to get one."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"open_clip weights file {str(weights)!r} does not exist. prompt_robust loads only local weight files "
            "(it never downloads, so pretrained tags such as 'openai' or 'laion2b_s34b_b88k' are not accepted): "
            "pass the path of a .safetensors file holding the model's state dict."
        )
    if not path.is_file():
        raise ValueError(
            f"open_clip weights {str(weights)!r} is not a file; pass the path of the .safetensors weights file "
            "itself (only local weight files are loaded)."
        )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"open_clip weights {str(weights)!r} is not a .safetensors file. prompt_robust does not unpickle "
            "checkpoint files (.pt/.pth/.bin can run arbitrary code). Convert it once, in an environment you "
            "trust: `model = open_clip.create_model(name); open_clip.load_checkpoint(model, path); "
            "safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`."
        )
    return path.resolve()


class OpenClipBackbone(ClipBackbone):
    """An ``open_clip.CLIP`` model with a ViT image tower, seen through the :class:`ClipBackbone` interface.

    Args:
        model: an ``open_clip.CLIP`` (built-in text transformer, ``VisionTransformer`` image tower).
        tokenizer: an open_clip tokenizer, called as ``tokenizer(texts, context_length=n)`` and returning
            ``(len(texts), n)`` token ids padded with 0 (e.g. ``open_clip.get_tokenizer("ViT-B-16")``).
        name: where the weights came from, stored in adapter files for information.
        image_mean / image_std: normalisation the image tower was trained with; None: the model's
            ``visual.preprocess_cfg`` if it has one, else OpenAI's.

    Raises:
        TypeError: the model is not a plain ``CLIP`` with a ViT image tower.
        NotImplementedError: the text tower does not pool at the EOT token, or the text and image transformers
            disagree on ``batch_first``.

    Example:
        >>> backbone = tiny_open_clip_backbone()
        >>> backbone.encode_text(backbone.tokenize(["a photo of a cat."])).shape
        torch.Size([1, 32])
        >>> real = OpenClipBackbone.from_pretrained("ViT-B-16", "/models/vit_b_16.safetensors")  # doctest: +SKIP
    """

    backbone_type = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        name: str = "",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(name=name)
        open_clip = _import_open_clip()
        from open_clip.transformer import VisionTransformer

        needed = ("token_embedding", "positional_embedding", "transformer", "text_projection", "visual")
        if not all(hasattr(model, attr) for attr in needed) or not hasattr(model, "encode_text"):
            raise TypeError(
                f"OpenClipBackbone needs an open_clip.CLIP with open_clip's own text transformer; got "
                f"{type(model).__name__}. CustomTextCLIP and CoCa (Hugging Face or custom text towers) are not "
                "supported: use HFClipBackbone for Hugging Face CLIP checkpoints."
            )
        if not isinstance(model.visual, VisionTransformer):
            raise TypeError(
                f"OpenClipBackbone needs a VisionTransformer image tower; this model has "
                f"{type(model.visual).__name__}. Visual prompt learners (VPT, MaPLe) insert tokens into a ViT, so "
                "ResNet and timm towers are not supported."
            )
        pool = getattr(model, "text_pool_type", "argmax")
        if pool not in _EOT_POOLS:
            raise NotImplementedError(_pool_message(name or type(model).__name__, pool))
        text_batch_first = bool(getattr(model.transformer, "batch_first", False))
        vision_batch_first = bool(getattr(model.visual.transformer, "batch_first", False))
        if text_batch_first != vision_batch_first:
            raise NotImplementedError(
                f"the text transformer has batch_first={text_batch_first} but the image transformer has "
                f"batch_first={vision_batch_first}; OpenClipBackbone needs both towers to use the same layout."
            )
        height, width = _pair(model.visual.image_size)
        if height != width:
            raise ValueError(
                f"OpenClipBackbone supports square images only; this model expects {height}x{width}. Build the "
                "model with a square image_size (force_image_size=...)."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.layers_batch_first = text_batch_first
        self._pool = pool
        self._eos_id = getattr(model, "text_eos_id", None)
        if pool == "eos" and self._eos_id is None:
            raise ValueError("the text tower pools at 'eos' but the model has no text_eos_id.")
        preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
        mean = image_mean if image_mean is not None else preprocess.get("mean", OPENAI_MEAN)
        std = image_std if image_std is not None else preprocess.get("std", OPENAI_STD)
        self.image_mean = tuple(float(x) for x in mean)
        self.image_std = tuple(float(x) for x in std)
        self._dims = {
            "embed_dim": int(model.visual.output_dim),
            "text_width": int(model.transformer.width),
            "vision_width": int(model.visual.transformer.width),
            "image_size": int(height),
            "context_length": int(model.context_length),
            "vocab_size": int(model.vocab_size),
            "num_text_layers": len(model.transformer.resblocks),
            "num_vision_layers": len(model.visual.transformer.resblocks),
        }
        self._check_tokenizer(open_clip)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        weights: str | Path | None = None,
        *,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> OpenClipBackbone:
        """Build a named open_clip architecture and load local ``.safetensors`` weights into it.

        Args:
            model_name: a built-in open_clip architecture (``open_clip.list_models()``, e.g. ``"ViT-B-16"``) or
                one registered with ``open_clip.add_model_config(json_path)``. ``hf-hub:``/``local-dir:`` names
                are refused (nothing is downloaded).
            weights: path of a ``.safetensors`` file with the model's state dict; None: random initialisation
                (useful for cost measurements). Pickled checkpoints are refused.
            tokenizer: the tokenizer to use; None: ``open_clip.get_tokenizer(model_name)`` (the CLIP BPE
                vocabulary ships with open_clip). Required for models with a Hugging Face tokenizer.
            **kwargs: forwarded to ``open_clip.create_model`` (e.g. ``precision="bf16"``, ``device="cuda"``,
                ``force_context_length=...``).

        Raises:
            ValueError: unknown ``model_name`` (the closest valid names are listed), or weights that are not a
                ``.safetensors`` file.
            FileNotFoundError: ``weights`` does not exist.

        Example:
            >>> backbone = OpenClipBackbone.from_pretrained("ViT-B-16")  # random weights  # doctest: +SKIP
            >>> backbone.dims["vision_width"], backbone.context_length  # doctest: +SKIP
            (768, 77)
        """
        open_clip = _import_open_clip()
        if "pretrained" in kwargs:
            raise TypeError("pass local weights as `weights=path.safetensors`, not `pretrained=`.")
        if model_name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(
                f"model_name {model_name!r} uses a schema; prompt_robust never downloads and loads only local "
                "weight files. Pass a built-in architecture name (or one registered with "
                "open_clip.add_model_config) and weights='path/to/weights.safetensors'."
            )
        name = model_name.replace("/", "-")  # open_clip's own spelling rule ("ViT-B/16" -> "ViT-B-16")
        valid = open_clip.list_models()
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=8, cutoff=0.5)
            error = unknown_name_error("open_clip model", model_name, close or valid)
            raise ValueError(f"{error} All architectures: open_clip.list_models().")
        config = open_clip.get_model_config(name)
        _check_model_config(name, config)
        if tokenizer is None and config["text_cfg"].get("hf_tokenizer_name"):
            raise ValueError(
                f"open_clip model {name!r} uses the Hugging Face tokenizer "
                f"{config['text_cfg']['hf_tokenizer_name']!r}, which prompt_robust does not download; pass "
                "tokenizer=... (an open_clip tokenizer built from local files)."
            )
        path = _check_weights_file(weights) if weights is not None else None
        model = open_clip.create_model(name, pretrained=str(path) if path else None, **kwargs)
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(name)
        return cls(model.eval(), tokenizer, name=str(path) if path else name)

    # ------------------------------------------------------------------------------------------------------
    @property
    def dims(self) -> dict[str, int]:
        return self._dims

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def text_layers(self) -> Sequence[nn.Module]:
        return self.model.transformer.resblocks

    @property
    def vision_layers(self) -> Sequence[nn.Module]:
        return self.model.visual.transformer.resblocks

    @property
    def logit_scale(self) -> torch.Tensor:
        # reshape: open_clip may store a (1,) "nonscalar" logit scale; the protocol promises a 0-dim tensor. Not
        # clamped: open_clip clamps the parameter while training CLIP, never at inference (nor do the learners'
        # reference repositories)
        return self.model.logit_scale.exp().reshape(())

    def _check_tokenizer(self, open_clip) -> None:
        # A tokenizer whose ids the embedding table does not cover would fail deep inside the model, and one
        # whose EOT is not the largest id would make argmax pooling read the wrong token: refuse both here.
        vocab = self._dims["vocab_size"]
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is not None and eot >= vocab:
            raise ValueError(
                f"tokenizer EOT id {eot} is outside the model vocabulary ({vocab}); the tokenizer does not belong "
                "to this model."
            )
        if isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer) and self._pool == "argmax":
            if eot != len(self.tokenizer.encoder) - 1:
                raise ValueError(
                    f"the model pools at argmax(token ids) but the tokenizer's EOT id {eot} is not its largest id."
                )

    def tokenize(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Token ids ``(n, context_length)`` padded with 0.

        Args:
            texts: the texts.
            truncate: cut texts that do not fit (open_clip's own behaviour: the first tokens, then EOT).

        Raises:
            ValueError: a text does not fit in the context length with its EOT token and ``truncate`` is False
                (open_clip itself would silently truncate it and overwrite the last token with EOT).
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        length = self.context_length
        if truncate:
            return self.tokenizer(texts, context_length=length).contiguous().to(self.device)
        # One extra position: a text that fits leaves it as padding; one that does not puts a token there.
        ids = self.tokenizer(texts, context_length=length + 1)  # (n, L + 1)
        pad = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        too_long = (ids[:, length] != pad).nonzero().flatten().tolist()
        if too_long:
            text = texts[too_long[0]]
            count = ""
            if hasattr(self.tokenizer, "encode"):
                count = f" is {len(self.tokenizer.encode(text)) + 2} tokens long (BOS and EOT included), which"
            raise ValueError(
                f"text {text!r}{count} does not fit in the context length {length}; shorten it (or use fewer "
                "context tokens)."
            )
        return ids[:, :length].contiguous().to(self.device)

    def eot_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The same rules as open_clip.transformer.text_global_pool.
        if self._pool == "argmax":
            return input_ids.argmax(dim=-1)
        return (input_ids == self._eos_id).to(torch.int).argmax(dim=-1)

    def _run_text(self, input_ids: torch.Tensor, length: int) -> torch.Tensor:
        # encode_text calls self.token_embedding(text), which is where the base class's hook substitutes embeddings.
        # It always looks up and position-embeds all context_length ids (cheap); the blocks run on `length`.
        if length >= input_ids.shape[-1] or getattr(self.model, "attn_mask", None) is None:
            return self.model.encode_text(input_ids)
        seq_dim = 1 if hasattr(self.model.transformer, "batch_first") else 0

        def keep_prefix(_module: nn.Module, args: tuple, kwargs: dict):
            x = args[0].narrow(seq_dim, 0, length)  # (n, L, w) or (L, n, w)
            if len(args) > 1:  # attn_mask passed by position
                mask = args[1]
                return (x, None if mask is None else mask[..., :length, :length], *args[2:]), kwargs
            mask = kwargs.get("attn_mask")
            if mask is not None:  # (context_length, context_length) -> (L, L)
                kwargs = {**kwargs, "attn_mask": mask[..., :length, :length]}
            return (x,), kwargs

        handle = self.model.transformer.register_forward_pre_hook(keep_prefix, with_kwargs=True)
        try:
            return self.model.encode_text(input_ids)
        finally:
            handle.remove()

    def _run_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(pixel_values.to(self.dtype))
        # visual.output_tokens=True makes the tower return (pooled, tokens).
        return features[0] if isinstance(features, tuple) else features

    def _register_patch_tokens_hook(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        visual = self.model.visual
        if visual.attn_pool is not None or visual.pool_type != "tok":
            pooling = "attentional pooling" if visual.attn_pool is not None else f"pool_type={visual.pool_type!r}"
            raise NotImplementedError(
                f"visual prompts need an image tower that reads the class token; this one uses {pooling}, which "
                "would pool the prompt tokens into the image feature. Use a text-only learner (CoOp, CoCoOp) with "
                "this model."
            )
        # ln_pre receives (b, 1 + n_patches, w) tokens: class token, position embeddings and patch dropout done.
        # It is an nn.Identity for no_ln_pre models, which takes hooks just as well.
        return visual.ln_pre.register_forward_pre_hook(lambda _module, args: (fn(args[0]), *args[1:]))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def tiny_open_clip_backbone(
    *,
    embed_dim: int = 32,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    context_length: int = 32,
    seed: int = 0,
    attention_scale: float = 1.0,
    name: str = "tiny-open-clip",
) -> OpenClipBackbone:
    """A randomly initialised small ``open_clip.CLIP`` with open_clip's real BPE tokenizer (for tests).

    The vocabulary is the real 49408-token CLIP vocabulary, so the embedding table dominates the ~1.6M parameters.

    Args:
        embed_dim / width / layers / heads: joint space size, tower width, depth and heads of both towers.
        image_size / patch_size: the image tower's input resolution and patch size.
        context_length: text positions (every prompt must fit, EOT included).
        seed: initialisation seed.
        attention_scale: multiplies the attention projection weights of the image tower after initialisation; > 1
            gives sharper attention, closer to a pretrained model's than the near-uniform attention of open_clip's
            default init (with which visual prompts act as an input-independent shift).
        name: recorded as the backbone's name.

    Example:
        >>> backbone = tiny_open_clip_backbone(layers=1)
        >>> backbone.encode_image(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 32])
    """
    open_clip = _import_open_clip()
    from open_clip import CLIPTextCfg, CLIPVisionCfg

    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads}).")
    vision_cfg = CLIPVisionCfg(
        layers=layers, width=width, head_width=width // heads, patch_size=patch_size, image_size=image_size
    )
    text_cfg = CLIPTextCfg(context_length=context_length, vocab_size=49408, width=width, heads=heads, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.startswith("visual.") and ".attn." in param_name and param.dim() == 2:
                param.mul_(attention_scale)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return OpenClipBackbone(model.eval(), tokenizer, name=name)
