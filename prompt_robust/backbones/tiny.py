"""Small transformers CLIP models and BPE tokenizers built in-process (no downloads).

Used for the embedded mini-CLIP (pretrained by ``prompt-robust pretrain-backbone``) and by the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch

from .hf_clip import HFClipBackbone

__all__ = ["build_clip_tokenizer", "tiny_clip_backbone"]

# CLIP's own pre-tokenisation: special tokens, contractions, letter runs, single digits, punctuation runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOT = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def build_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 2048):
    """Learn byte-level BPE merges with CLIP's conventions on ``corpus`` and return a ``CLIPTokenizer``.

    The merges are learned here, deterministically (the most frequent pair first, ties broken by the pair's
    text), because a library trainer breaks ties in hash order and would give a different vocabulary on every
    run. Like OpenAI's vocabulary, the ids are the 256 byte symbols, their end-of-word forms, the merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id; also the padding token).

    Args:
        corpus: texts to learn merges from (every word of the vocabulary should occur).
        vocab_size: upper bound on the vocabulary size.

    Example:
        >>> tok = build_clip_tokenizer(["a photo of a cat"])
        >>> tok.convert_ids_to_tokens(tok("a cat")["input_ids"])
        ['<|startoftext|>', 'a</w>', 'cat</w>', '<|endoftext|>']
    """
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[tuple[str, str]] = []
    budget = vocab_size - len(vocab) - 2
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    vocab += [BOS, EOT]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(vocab)}, merges=merges)


def tiny_clip_backbone(
    tokenizer=None,
    *,
    embed_dim: int = 32,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    context_length: int = 24,
    text_width: int | None = None,
    text_layers: int | None = None,
    logit_scale: float | None = None,
    seed: int = 0,
    initializer_factor: float = 1.0,
    name: str = "tiny-clip",
) -> HFClipBackbone:
    """A randomly initialised small transformers ``CLIPModel`` with a matching tokenizer.

    Args:
        tokenizer: a ``CLIPTokenizer``; by default one trained on a few generic prompt words.
        embed_dim / width / layers / heads: joint space size, tower width, depth and heads of both towers.
        text_width / text_layers: the text tower's own width and depth (None: ``width`` / ``layers``).
        logit_scale: initial scale of the similarities (None: transformers' default, CLIP's 1 / 0.07).
        image_size / patch_size: the vision tower's input resolution and patch size.
        context_length: text positions (every prompt must fit, EOT included).
        seed: initialisation seed.
        initializer_factor: scales the initialisation std (transformers' ``initializer_factor``); > 1 gives
            sharper attention, closer to a pretrained model's than the near-uniform attention of a default init.

    Example:
        >>> backbone = tiny_clip_backbone(layers=1)
        >>> backbone.encode_text(backbone.tokenize(["a photo of a cat."])).shape
        torch.Size([1, 32])
    """
    from transformers import CLIPConfig, CLIPModel

    if tokenizer is None:
        tokenizer = build_clip_tokenizer(
            ["a photo of a cat dog bird fish car tree house boat plane the an itap of one small large picture"]
        )
    text_width = width if text_width is None else text_width
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": layers if text_layers is None else text_layers,
        "num_attention_heads": heads,
        "max_position_embeddings": context_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = CLIPConfig(
        text_config={**text_config, "initializer_factor": initializer_factor},
        vision_config={**vision_config, "initializer_factor": initializer_factor},
        projection_dim=embed_dim,
        initializer_factor=initializer_factor,
        **({} if logit_scale is None else {"logit_scale_init_value": math.log(logit_scale)}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return HFClipBackbone(model.eval(), tokenizer, name=name)
