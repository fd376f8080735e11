"""The prompt-learner contract and the machinery the reference learners share.

A *prompt learner* is any ``nn.Module`` with

* ``prompt_tokens() -> dict[str, Tensor]``: its learned prompt, one ``(n_tokens, dim)`` tensor per site
  (e.g. ``"text"``, ``"vision"``);
* ``forward(pixel_values, prompt_override=None)``: logits ``(batch, n_classes)`` (a tensor, or an object with
  ``.logits``); ``prompt_override`` maps sites to per-sample prompts ``(batch, n_tokens, dim)`` used instead of
  the learned ones;
* ``image_features(pixel_values) -> (batch, embed_dim)``: prompt-free features the add-ons condition on.

The reference learners derive from :class:`PromptLearner`; a user's own module only needs the three methods
(see ``docs/learner_contract.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ClipBackbone
from ..config import ConfigMixin, _check, help_field

__all__ = ["ClassPrompts", "ContextConfig", "LearnerConfig", "LearnerOutput", "PromptLearner", "PromptLearnerProtocol"]


@runtime_checkable
class PromptLearnerProtocol(Protocol):
    """What ``wrap()`` needs from a learner."""

    def prompt_tokens(self) -> dict[str, torch.Tensor]: ...

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> Any: ...


@dataclass
class LearnerOutput:
    """What a reference learner returns, and how the wrapped model hands any learner's output to the add-ons.

    Attributes:
        logits: ``(batch, n_classes)`` scaled cosine similarities.
        image_features: ``(batch, embed_dim)`` L2-normalised image features (with visual prompts if any); None
            when a custom learner returns only logits (add-ons that need them say so).
        text_features: ``(n_classes, embed_dim)`` or, for per-sample prompts, ``(batch, n_classes, embed_dim)``,
            L2-normalised; None as above.
        loss: a scalar the learner adds to its own training objective (a regulariser such as KgCoOp's or
            PromptSRC's), computed in training mode only; None for learners without one. The wrapped model adds
            it to the loss in training mode whenever the learner trains (``docs/learner_contract.md``).
    """

    logits: torch.Tensor
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    loss: torch.Tensor | None = None


@dataclass
class LearnerConfig(ConfigMixin):
    """Options every reference learner has."""

    text_chunk_size: int | None = help_field(
        None,
        "Most text sequences encoded in one pass (per-sample prompts need batch x classes of them); bounds "
        "memory. Each pass runs only up to its last EOT position. None: no bound.",
        ge=1,
    )


@dataclass
class ContextConfig(LearnerConfig):
    """Options of learners with learned text context vectors (CoOp, CoCoOp, MaPLe)."""

    n_ctx: int = help_field(16, "Number of context tokens (ignored when ctx_init is given).", ge=0)
    ctx_init: str | None = help_field(None, "Initialise the context from these words, e.g. 'a photo of a'.")
    init_std: float = help_field(0.02, "Std of the random context initialisation.", gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_init is None:
            _check(
                self.n_ctx >= 1,
                f"{type(self).__name__}.n_ctx must be >= 1 when ctx_init is None; got {self.n_ctx!r}. Give at least "
                "one context token, or ctx_init words to start from.",
            )


def check_classnames(classnames: Sequence[str]) -> list[str]:
    """Validate a class list: non-empty, non-blank, unique strings."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a list of strings; got {type(classnames).__name__}.")
    names = [str(name).strip() for name in classnames]
    if not names:
        raise ValueError("classnames is empty: pass the list of class names the model should predict.")
    if not all(names):
        raise ValueError(f"classnames contains an empty name: {list(classnames)!r}.")
    dupes = sorted(name for name, count in Counter(names).items() if count > 1)
    if dupes:
        raise ValueError(f"classnames must be unique; repeated: {dupes}.")
    return names


def _check_class_count(names: list[str]) -> list[str]:
    """A prompt learner tells classes apart: with one class its softmax is always 1 and the loss always 0."""
    if len(names) < 2:
        raise ValueError(
            f"a prompt learner needs at least 2 classes; got {len(names)} ({names!r}). With one class every "
            "prediction has probability 1, the cross-entropy is 0 and nothing trains. Pass every class name of "
            "the task (add a background/'other' class for a one-class detector)."
        )
    return names


def cosine_logits(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * <image, text>`` for normalised features.

    Args:
        image: ``(b, d)``.
        text: ``(n_cls, d)`` shared by the batch or ``(b, n_cls, d)`` per sample.
    """
    if text.dim() == 2:
        return scale * image @ text.t()  # (b, n_cls)
    return scale * torch.einsum("bd,bcd->bc", image, text)  # (b, n_cls)


class ClassPrompts(nn.Module):
    """Token ids and frozen token embeddings of ``<BOS> [ctx]*n_ctx <classname> . <EOT>`` for every class.

    The learned context replaces the ``n_ctx`` placeholders; ``position`` moves the class name to the end
    (CoOp default), the middle (context split in two halves around it) or the front. Total length and the EOT
    position never change, so pooling reads the right token. The class name moved is the bare name's tokens, as
    in CoOp's reference code (a name ending in punctuation may merge with the appended "." into one token).

    With ``prefix`` (MaPLe's layout) the text is ``"<prefix> <classname>."`` and the learned context replaces
    the first ``n_ctx`` tokens of the prefix; the prefix's other tokens stay fixed text (``"a photo of a"`` with
    ``n_ctx=2``: "a photo" learned, "of a" fixed).

    Args:
        backbone: the CLIP backbone (its tokenizer and token embedding are used).
        classnames: class names.
        n_ctx: number of learned context tokens (0 allowed: plain ``"{name}."``).
        position: ``"end"``, ``"middle"`` or ``"front"`` (``prefix`` needs ``"end"``).
        prefix: fixed words whose first ``n_ctx`` tokens are learned, or None.
    """

    POSITIONS: ClassVar[tuple[str, ...]] = ("end", "middle", "front")

    def __init__(
        self,
        backbone: ClipBackbone,
        classnames: Sequence[str],
        n_ctx: int,
        position: str = "end",
        prefix: str | None = None,
    ) -> None:
        super().__init__()
        if position not in self.POSITIONS:
            from ..config import unknown_name_error

            raise unknown_name_error("class token position", position, self.POSITIONS)
        self.n_ctx = n_ctx
        names = check_classnames(classnames)
        if prefix:
            if position != "end":
                raise ValueError(
                    f"a fixed prompt prefix ({prefix!r}) keeps the class name at the end; got {position!r}."
                )
            ids_end = backbone.tokenize([f"{prefix} {name}." for name in names])  # (n_cls, L): BOS prefix name . EOT
            length = ids_end.shape[1]
            prefix_tokens = int(backbone.eot_positions(backbone.tokenize([prefix]))[0]) - 1
            if not 0 <= n_ctx <= prefix_tokens:
                raise ValueError(
                    f"{n_ctx} learned context tokens cannot replace the first tokens of the prefix {prefix!r}, which "
                    f"has {prefix_tokens}; use n_ctx <= {prefix_tokens}."
                )
            name_lens = [0] * len(names)  # the name stays at the end: nothing is moved
        else:
            base = backbone.tokenize([f"{name}." for name in names])  # (n_cls, L): BOS name . EOT pad
            eot = backbone.eot_positions(base)
            length = base.shape[1]
            if int(eot.max()) + n_ctx >= length:
                worst = names[int(eot.argmax())]
                raise ValueError(
                    f"class {worst!r} with {n_ctx} context tokens does not fit in the context length {length}; use "
                    "fewer context tokens or a shorter class name."
                )
            # Shift everything after BOS right by n_ctx; the placeholders reuse BOS's id (never the EOT id, so
            # neither pooling rule can pick them).
            placeholder = base[:, :1].expand(-1, n_ctx)
            ids_end = torch.cat([base[:, :1], placeholder, base[:, 1 : length - n_ctx]], dim=1)  # (n_cls, L)
            # tokens of the bare name (CoOp's name_lens), not eot - 2 from "{name}.": a name ending in punctuation
            # may merge with the "." into one token, which then moves with the name
            name_lens = (backbone.eot_positions(backbone.tokenize(names)) - 1).tolist()
        eot = backbone.eot_positions(ids_end)  # (n_cls,) in the "end" layout, which the others only permute before it
        order = torch.stack([self._order(length, n_ctx, n, position) for n in name_lens]).to(ids_end.device)
        with torch.no_grad():
            embeds = backbone.token_embedding(ids_end)  # (n_cls, L, w)
        self.register_buffer("input_ids", torch.gather(ids_end, 1, order), persistent=False)  # (n_cls, L)
        self.register_buffer("prefix", embeds[:, :1].clone(), persistent=False)  # (n_cls, 1, w)
        self.register_buffer("suffix", embeds[:, 1 + n_ctx :].clone(), persistent=False)  # (n_cls, L-1-n_ctx, w)
        self.register_buffer("order", order, persistent=False)  # (n_cls, L)
        # After every class's EOT (shifted right by n_ctx) the classes hold the same tokens (the padding), so a
        # prefix of at least `min_length` positions plus that shared tail rebuilds every sequence exactly.
        differs = (self.input_ids != self.input_ids[:1]).any(dim=0).nonzero()  # positions where classes differ
        self.min_length = max(int(eot.max()) + 1, int(differs.max()) + 1 if len(differs) else 0)

    @staticmethod
    def _order(length: int, n_ctx: int, name_len: int, position: str) -> torch.Tensor:
        """Permutation from the "end" layout [BOS, ctx, name, rest] to the requested layout."""
        bos, ctx = [0], list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, length))
        if position == "end":
            seq = bos + ctx + name + rest
        elif position == "front":
            seq = bos + name + ctx + rest
        else:
            half = n_ctx // 2
            seq = bos + ctx[:half] + name + ctx[half:] + rest
        return torch.tensor(seq, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]

    def assemble(self, ctx: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Token embeddings with the context in place, for the first ``length`` positions.

        Args:
            ctx: ``(..., n_cls | 1, n_ctx, w)``: shared ``(1, n_ctx, w)``, class-specific ``(n_cls, n_ctx, w)``,
                per-sample ``(b, 1, n_ctx, w)`` or per-sample class-specific ``(b, n_cls, n_ctx, w)``.
            length: build only positions ``0 .. length - 1`` (what a trimmed text pass reads, see
                :meth:`ClipBackbone.text_length`); at least every class's EOT position + 1. None: all of them.

        Returns:
            ``(..., n_cls, length, w)`` token embeddings.

        Example:
            >>> from prompt_robust.backbones.tiny import tiny_clip_backbone
            >>> prompts = ClassPrompts(tiny_clip_backbone(layers=1), ["cat", "dog"], n_ctx=2)
            >>> ctx = torch.zeros(1, 2, 32)
            >>> prompts.assemble(ctx).shape, prompts.assemble(ctx, prompts.min_length).shape
            (torch.Size([2, 24, 32]), torch.Size([2, 6, 32]))
        """
        full = self.input_ids.shape[1]
        length = full if length is None else int(length)
        if not self.min_length <= length <= full:
            raise ValueError(
                f"assemble(length={length}) must keep every class's EOT token: length must lie in "
                f"{self.min_length}..{full} (None: all {full} positions)."
            )
        lead = ctx.shape[:-3]
        n_cls = self.num_classes
        shape = (*lead, n_cls)
        width = self.prefix.shape[-1]
        parts = [
            self.prefix.expand(*shape, 1, width),
            ctx.to(self.prefix.dtype).expand(*shape, self.n_ctx, width),
            self.suffix[:, : length - 1 - self.n_ctx].expand(*shape, length - 1 - self.n_ctx, width),
        ]
        tokens = torch.cat(parts, dim=-2)  # (..., n_cls, length, w) in the "end" layout
        # the layouts only permute positions before "." and EOT, so the first `length` positions come from the
        # first `length` of the "end" layout
        index = self.order[:, :length].expand(*shape, -1).unsqueeze(-1).expand(*shape, -1, width)
        return torch.gather(tokens, -2, index)

    def tail(self, length: int) -> torch.Tensor:
        """``(L - length, w)``: the token embeddings after the first ``length`` (>= :attr:`min_length`) positions,
        the same for every class; ``cat([assemble(ctx, length), tail(length)])`` equals ``assemble(ctx)``."""
        if not self.min_length <= length <= self.input_ids.shape[1]:
            raise ValueError(f"tail(length={length}): length must lie in {self.min_length}..{self.input_ids.shape[1]}.")
        return self.suffix[0, length - 1 - self.n_ctx :]


class PromptLearner(nn.Module):
    """Base class of the reference learners: a frozen backbone, a class list and a config.

    Subclasses set ``learner_type`` and ``config_class`` and implement ``prompt_tokens``, ``forward`` and
    ``_build_class_state`` (what depends on the class list).
    """

    learner_type: ClassVar[str] = "base"
    config_class: ClassVar[type[LearnerConfig]] = LearnerConfig

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], config: LearnerConfig | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, ClipBackbone):
            raise TypeError(
                f"backbone must be a prompt_robust ClipBackbone (e.g. HFClipBackbone.from_pretrained(dir) or "
                f"prompt_robust.load_backbone(...)); got {type(backbone).__name__}."
            )
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}; got {type(config).__name__}.")
        self.config = config
        self.backbone = backbone
        backbone.freeze()
        self.classnames = _check_class_count(check_classnames(classnames))

    # -- contract --------------------------------------------------------------------------------------------
    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        """The learned prompt as ``{site: (n_tokens, dim)}``; empty for a learner without prompts."""
        return {}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Prompt-free, L2-normalised image features ``(batch, embed_dim)`` (what add-ons condition on)."""
        with torch.no_grad():
            return self.plain_image_features(pixel_values).detach()

    def plain_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Prompt-free, L2-normalised image features, computed once per batch while the backbone is frozen.

        An add-on conditioning on ``image_features(x)`` and the learner's own ``forward(x)`` then share one image
        pass: the last batch tensor and its features are kept (the cache is keyed by the tensor object and its
        in-place version counter). With trainable backbone tensors (e.g. LoRA) nothing is cached.
        """
        if any(p.requires_grad for p in self.backbone.parameters()):
            return F.normalize(self.backbone.encode_image(pixel_values), dim=-1)
        cached = self.__dict__.get("_image_cache")
        if cached is not None and cached[0] is pixel_values and cached[1] == pixel_values._version:
            return cached[2]
        with torch.no_grad():
            features = F.normalize(self.backbone.encode_image(pixel_values), dim=-1)
        self.__dict__["_image_cache"] = (pixel_values, pixel_values._version, features)
        return features

    def forward(
        self, pixel_values: torch.Tensor, prompt_override: Mapping[str, torch.Tensor] | None = None
    ) -> LearnerOutput:
        raise NotImplementedError

    # -- class list --------------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Predict over another class list (e.g. the new classes of base-to-new); learned prompts are kept."""
        self.classnames = _check_class_count(check_classnames(classnames))
        self._build_class_state()

    def _build_class_state(self) -> None:
        """(Re)build everything that depends on ``self.classnames``."""

    # -- helpers shared by subclasses --------------------------------------------------------------------------
    def check_override(
        self, prompt_override: Mapping[str, torch.Tensor] | None, batch: int
    ) -> Mapping[str, torch.Tensor]:
        """Validate per-sample prompts: known sites, shape ``(batch, *site_shape)``."""
        if not prompt_override:
            return {}
        sites = self.prompt_tokens()
        for site, value in prompt_override.items():
            if site not in sites:
                raise ValueError(
                    f"{type(self).__name__} has no prompt site {site!r}; sites: {sorted(sites) or 'none'}."
                )
            expected = (batch, *sites[site].shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"prompt_override[{site!r}] must have shape {expected} (batch, n_tokens, dim); got "
                    f"{tuple(value.shape)}."
                )
        return prompt_override

    def encode_prompts(
        self,
        prompts: ClassPrompts,
        ctx: torch.Tensor,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Normalised text features of every class for the given context, in memory-bounded chunks.

        Args:
            prompts: the class token layout.
            ctx: see :meth:`ClassPrompts.assemble`; leading dims ``(...)`` are kept.
            deep_prompts: ``{layer: (n, w) | (b, n, w)}``; a per-sample entry is repeated over classes (its
                ``b`` must equal the single leading dim of ``ctx``).

        Inside :func:`shared_prompt_rows`, rows of a per-sample context ``(b, ...)`` that share an owner and are
        equal (deep prompts included) are encoded once. Each chunk goes through ``backbone.encode_text``, which runs
        only up to that chunk's last EOT position (:meth:`ClipBackbone.text_length`); so the context is assembled
        into those positions only (:meth:`ClassPrompts.assemble` with ``length``), and each chunk gets the shared
        padding tail (:meth:`ClassPrompts.tail`) just before its pass.

        Without gradients (prediction), the features of a context shared by the whole batch (``ctx`` of 3 dims) are
        kept and reused while nothing they depend on changes: the same class layout, the same context and deep
        prompt tensors unmodified (their in-place version counters), every parameter of the learner unmodified.
        CoOp or MaPLe then encodes its class prompts once, not once per test batch.

        Returns:
            ``(..., n_cls, embed_dim)``.
        """
        if not torch.is_grad_enabled() and ctx.dim() == 3:
            key = self._text_cache_key(prompts, ctx, deep_prompts)
            cached = self.__dict__.get("_shared_text_features")
            if cached is not None and cached[0] == key:
                return cached[1]
            with torch.no_grad():
                features = self._encode_prompts(prompts, ctx, deep_prompts)
            self.__dict__["_shared_text_features"] = (key, features)
            return features
        return self._encode_prompts(prompts, ctx, deep_prompts)

    def _text_cache_key(
        self, prompts: ClassPrompts, ctx: torch.Tensor, deep_prompts: Mapping[int, torch.Tensor] | None
    ) -> tuple:
        """What shared-context text features depend on: identities, shapes and in-place versions."""

        def ident(t: torch.Tensor) -> tuple:
            return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

        deep = tuple(sorted((k, ident(v)) for k, v in (deep_prompts or {}).items()))
        params = tuple((id(p), p._version) for p in self.parameters())
        return (id(prompts), ident(ctx), deep, params, self.backbone.trim_text)

    def _encode_prompts(
        self,
        prompts: ClassPrompts,
        ctx: torch.Tensor,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        merged = _merge_shared_rows(ctx, deep_prompts)
        if merged is not None:
            first, inverse = merged
            deep = {k: (v[first] if v.dim() == 3 else v) for k, v in (deep_prompts or {}).items()}
            return self.encode_prompts(prompts, ctx[first], deep)[inverse]
        full = prompts.input_ids.shape[1]
        # Build only the positions the text passes read (trimming, ClipBackbone.text_length): with per-sample
        # prompts the full (b, n_cls, context_length, w) embeddings would dominate memory.
        length = full
        if self.backbone.trim_text:
            length = max(self.backbone.text_length(prompts.input_ids, deep_prompts), prompts.min_length)
        embeds = prompts.assemble(ctx, length)  # (..., n_cls, L', w)
        lead = embeds.shape[:-2]
        width = embeds.shape[-1]
        flat = embeds.reshape(-1, length, width)  # (N, L', w), N = prod(lead)
        ids = prompts.input_ids.expand(*lead, -1).reshape(-1, full)  # (N, L)
        n_cls = prompts.num_classes
        deep = {}
        for layer, value in (deep_prompts or {}).items():
            # (b, n, w) per sample -> (b * n_cls, n, w); (n, w) stays shared
            deep[layer] = value.repeat_interleave(n_cls, dim=0) if value.dim() == 3 else value
        chunk = self.config.text_chunk_size or flat.shape[0]
        outs = []
        for start in range(0, flat.shape[0], chunk):
            stop = start + chunk
            part = {k: (v[start:stop] if v.dim() == 3 else v) for k, v in deep.items()}
            chunk_embeds = flat[start:stop]  # (n, L', w)
            if length < full:  # encode_text takes whole sequences; the trimmed pass does not read the shared tail
                tail = prompts.tail(length).expand(chunk_embeds.shape[0], -1, -1)  # (n, L - L', w)
                chunk_embeds = torch.cat([chunk_embeds, tail], dim=1)  # (n, L, w)
            outs.append(self.backbone.encode_text(ids[start:stop], token_embeds=chunk_embeds, deep_prompts=part))
        features = torch.cat(outs).reshape(*lead, -1)
        return F.normalize(features, dim=-1)

    def fixed_text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised features of fixed texts ``(n, d)``, cached while the backbone is frozen."""
        trainable = any(p.requires_grad for p in self.backbone.parameters())
        key = (tuple(texts), self.backbone.device, self.backbone.dtype)
        cache = self.__dict__.setdefault("_text_cache", {})
        if not trainable and key in cache:
            return cache[key]
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            features = F.normalize(self.backbone.encode_text(self.backbone.tokenize(list(texts))), dim=-1)
        if not trainable:
            cache.clear()
            cache[key] = features
        return features

    def hyperparameters(self) -> dict[str, Any]:
        """What ``save_pretrained`` stores to rebuild this learner."""
        return self.config.to_dict()

    def extra_repr(self) -> str:
        return f"classes={len(self.classnames)}, config={self.config}"


_SHARED_ROWS: ContextVar[torch.Tensor | None] = ContextVar("shared_prompt_rows", default=None)


@contextmanager
def shared_prompt_rows(owner: torch.Tensor) -> Iterator[None]:
    """Declare that rows of the per-sample prompts passed in this block are copies of one prompt per ``owner``.

    Several inputs that use one prompt copy (e.g. augmented views of an image, each given
    ``prompt_override = copies[owner]``) then cost one text pass per copy instead of one per input: the
    reference learners' text encoding merges rows with the same owner when they are equal (deep prompts
    included), which is exact, gradients included, because those rows are the same tensor rows indexed
    repeatedly. Rows that differ (CoCoOp adds an image-conditioned shift to every row) are encoded one by one.

    Args:
        owner: ``(b,)`` the prompt copy of each input of the batch.
    """
    token = _SHARED_ROWS.set(owner)
    try:
        yield
    finally:
        _SHARED_ROWS.reset(token)


def _merge_shared_rows(
    ctx: torch.Tensor, deep_prompts: Mapping[int, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, inverse)`` with ``ctx == ctx[first][inverse]`` when :func:`shared_prompt_rows` is active and every
    row equals its owner's first row; else None."""
    owner = _SHARED_ROWS.get()
    if owner is None or ctx.dim() != 4 or ctx.shape[0] != owner.shape[0]:
        return None
    _, inverse = torch.unique(owner.to(ctx.device), return_inverse=True)
    n_owners, batch = int(inverse.max()) + 1, ctx.shape[0]
    if n_owners == batch:
        return None
    first = torch.full((n_owners,), batch, dtype=torch.long, device=ctx.device)
    first = first.scatter_reduce(0, inverse, torch.arange(batch, device=ctx.device), reduce="amin")
    per_sample = [v for v in (deep_prompts or {}).values() if v.dim() == 3]
    if not all(torch.equal(v[first][inverse], v) for v in (ctx, *per_sample)):
        return None
    return first, inverse


@torch.no_grad()
def image_features_in_batches(learner: nn.Module, pixel_values: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """``learner.image_features`` of many images, ``batch_size`` at a time: ``(n, embed_dim)``."""
    return torch.cat(
        [learner.image_features(pixel_values[i : i + batch_size]) for i in range(0, len(pixel_values), batch_size)]
    )


def init_context(
    backbone: ClipBackbone,
    n_ctx: int,
    ctx_init: str | None,
    width: int,
    std: float = 0.02,
    *,
    first_tokens: bool = False,
) -> tuple[torch.Tensor, int]:
    """Context vectors: the token embeddings of ``ctx_init`` (then ``n_ctx`` is its token count) or N(0, std²).

    With ``first_tokens`` only the first ``n_ctx`` tokens of ``ctx_init`` become the context (MaPLe's reference
    layout, where the rest of the words stay fixed text: :class:`ClassPrompts` with ``prefix=ctx_init``).

    Returns:
        ``(n_ctx, width)`` tensor and the resulting ``n_ctx``.
    """
    if ctx_init:
        ids = backbone.tokenize([ctx_init])
        n_tokens = int(backbone.eot_positions(ids)[0]) - 1
        if n_tokens < 1:
            raise ValueError(f"ctx_init {ctx_init!r} tokenizes to no token.")
        if first_tokens:
            _check(
                1 <= n_ctx <= n_tokens,
                f"n_ctx={n_ctx} learned tokens must lie in 1..{n_tokens}, the tokens of ctx_init {ctx_init!r}.",
            )
            n_tokens = n_ctx
        with torch.no_grad():
            ctx = backbone.token_embedding(ids)[0, 1 : 1 + n_tokens].clone().float()
        return ctx, n_tokens
    _check(n_ctx >= 1, f"n_ctx must be >= 1 when ctx_init is not given; got {n_ctx!r}.")
    return torch.randn(n_ctx, width) * std, n_ctx
