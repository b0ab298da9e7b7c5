"""Joins: how a typed prompt goes into a backbone, one per (prompt kind, backbone kind), looked up here.

``PromptedModel`` is backbone + method + join and branches on neither: it asks ``get_join(method.prompt_kind,
backbone.kind)`` and hands the work over. A new join is one class and one ``@register`` line.

| prompt kind | backbone kind | join | what it does |
|---|---|---|---|
| embeddings | causal_lm | ``EmbeddingsIntoCausalLM`` | the prompt runs once (batch 1); its keys/values are the rows' prefix |
| kv | causal_lm | ``KVIntoCausalLM`` | the per-layer keys/values are the rows' prefix |
| embeddings | encoder | ``EmbeddingsIntoEncoder`` | virtual tokens before each row's [CLS]; a task head on pooled states, or the masked-LM head at ``{mask}`` |
| kv | encoder | ``KVIntoEncoder`` | the per-layer keys/values every row's tokens attend to; the same two ways of scoring |
| embeddings | seq2seq | ``EmbeddingsIntoSeq2Seq`` | virtual tokens before the encoder input; label words and targets through the decoder |
| embeddings | module | ``EmbeddingsIntoModule`` | the prompt is concatenated in front of the input embeddings |
| patch_tokens | vit | ``PatchTokensIntoViT`` | tokens after CLS (first layer, or every layer: VPT-deep); the prompt's head |
| pixels | image, vit | ``PixelsIntoImage``, ``PixelsIntoViT`` | a learned image added to the input; the prompt's head |
| context | clip | ``ContextIntoCLIP`` | context tokens before each class name in CLIP's text encoder (CoOp, CoCoOp) |
"""

from __future__ import annotations

from ..errors import SoftPromptError
from .base import JOINS, Join, register
from .causal import (
    CausalJoin,
    EmbeddingsIntoCausalLM,
    KVIntoCausalLM,
    Prefix,
    check_mask,
    input_positions,
    run_rows,
    stack_prefixes,
    truncate_to_fit,
)
from .clip import ContextIntoCLIP
from .encoder import EmbeddingsIntoEncoder, EncoderJoin, KVIntoEncoder
from .module import EmbeddingsIntoModule, prefix_join
from .seq2seq import EmbeddingsIntoSeq2Seq
from .vision import (
    ImageJoin,
    PatchTokensIntoViT,
    PixelsIntoImage,
    PixelsIntoViT,
    classify_mixed,
    detect_mixed,
)

__all__ = ["JOINS", "CausalJoin", "ContextIntoCLIP", "EmbeddingsIntoCausalLM", "EmbeddingsIntoEncoder", "EmbeddingsIntoModule", "EmbeddingsIntoSeq2Seq", "EncoderJoin", "ImageJoin", "Join",
           "KVIntoCausalLM", "KVIntoEncoder", "PatchTokensIntoViT", "PixelsIntoImage", "PixelsIntoViT", "Prefix", "check_mask",
           "classify_mixed", "detect_mixed", "get_join", "input_positions", "prefix_join", "register", "run_rows", "stack_prefixes",
           "truncate_to_fit"]


def get_join(prompt_kind: str, backbone_kind: str) -> Join:
    join = JOINS.get((prompt_kind, backbone_kind))
    if join is None:
        fits = sorted(b for p, b in JOINS if p == prompt_kind)
        raise SoftPromptError(
            f"a {prompt_kind!r} prompt cannot go into a {backbone_kind!r} backbone (it goes into: "
            f"{', '.join(fits) or 'none'}); use a method whose prompt fits this backbone")
    return join
