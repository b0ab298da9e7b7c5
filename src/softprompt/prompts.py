"""Typed prompts: what a method produces and what a join puts into a backbone.

A method returns one of these; a join, chosen by (prompt kind, backbone kind), puts it in. Neither looks at the
other's type. The kinds so far:

- ``EmbeddingPrompt``: virtual-token embeddings (P, H) that enter the model where token embeddings do (prompt
  tuning, P-tuning, residual prompt tuning).
- ``KVPrompt``: keys and values for every attention layer, (L, 2, kv_heads, P, head_dim), that the input attends to
  as if P earlier tokens had produced them (prefix tuning, P-tuning v2 / deep prompts).

Kinds to come have the same shape of contract: patch tokens after a ViT's CLS, pixel-space prompts, context tokens
inside CLIP's text encoder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class EmbeddingPrompt:
    kind: ClassVar[str] = "embeddings"
    embeddings: torch.Tensor  # (P, H)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.embeddings,)


@dataclass(frozen=True)
class KVPrompt:
    kind: ClassVar[str] = "kv"
    kv: torch.Tensor  # (L, 2, kv_heads, P, head_dim): layer, keys/values, heads, position, channel

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv,)


Prompt = EmbeddingPrompt | KVPrompt
PROMPT_KINDS = {cls.kind: cls for cls in (EmbeddingPrompt, KVPrompt)}


def content_hash(prompt: Prompt | torch.Tensor) -> str:
    """A digest of a prompt's kind and values: the key under which its computed form is cached."""
    h = hashlib.sha256()
    tensors = (prompt,) if isinstance(prompt, torch.Tensor) else prompt.tensors
    if not isinstance(prompt, torch.Tensor):
        h.update(prompt.kind.encode())
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def as_prompt(value) -> Prompt | None:
    """A typed prompt from a typed prompt, a method module (called), a (P, H) tensor (embeddings), or None (no
    prompt; a 0-token prompt is none too)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = EmbeddingPrompt(value)
    elif not isinstance(value, (EmbeddingPrompt, KVPrompt)):
        value = value()  # a method module
    return value if value.num_virtual_tokens > 0 else None
