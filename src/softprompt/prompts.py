"""Typed prompts: what a method produces and what a join puts into a backbone.

A method returns one of these; a join, chosen by (prompt kind, backbone kind), puts it in. Neither looks at the
other's type. The kinds so far:

- ``EmbeddingPrompt``: virtual-token embeddings (P, H) that enter the model where token embeddings do (prompt
  tuning, P-tuning, residual prompt tuning).
- ``KVPrompt``: keys and values for every attention layer, (L, 2, kv_heads, P, head_dim), that the input attends to
  as if P earlier tokens had produced them (prefix tuning, P-tuning v2 / deep prompts).

Both may carry a task ``Head``: on a text encoder a classification task is a linear head on pooled final states
that trains with the prompt (unless the task is scored through the masked-LM head).

- ``PatchPrompt``: tokens (D, P, H) inserted after a vision transformer's CLS token: D = 1 in the first layer only
  (VPT-shallow), D = layers for a fresh set before every layer (VPT-deep); with the task's classification head.
- ``PixelPrompt``: a learned image (C, S, S) added to the normalised input where a mask (S, S) is on (a border or a
  patch: visual prompting in pixel space, for any image model); with the task's classification head.

- ``ContextPrompt``: context tokens (M, H), or (K, M, H) one set per class, that replace "a photo of a" in front of
  each class name inside CLIP's text encoder (CoOp); with a meta-network, a per-image shift of them (CoCoOp).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Head:
    """A task's linear classification head on a model's features (an image model's, or a text encoder's pooled
    states): logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (K, F)
    bias: torch.Tensor  # (K,)
    pooling: str = "cls"  # text encoders: the features are the [CLS] state ("cls") or the real tokens' mean ("mean")

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.bias, torch.tensor(list(self.pooling.encode()), dtype=torch.uint8))


@dataclass(frozen=True)
class EmbeddingPrompt:
    kind: ClassVar[str] = "embeddings"
    embeddings: torch.Tensor  # (P, H)
    head: Head | None = None  # a text encoder's task head (classification through pooled states)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.embeddings, *(self.head.tensors if self.head is not None else ()))


@dataclass(frozen=True)
class KVPrompt:
    kind: ClassVar[str] = "kv"
    kv: torch.Tensor  # (L, 2, kv_heads, P, head_dim): layer, keys/values, heads, position, channel
    head: Head | None = None  # a text encoder's task head (classification through pooled states)

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kv, *(self.head.tensors if self.head is not None else ()))


@dataclass(frozen=True)
class PatchPrompt:
    kind: ClassVar[str] = "patch_tokens"
    tokens: torch.Tensor  # (D, P, H), or (B, D, P, H): a prompt per row
    head: Head

    @property
    def num_virtual_tokens(self) -> int:
        return self.tokens.shape[-2]

    @property
    def depth(self) -> int:
        return self.tokens.shape[-3]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.head.weight, self.head.bias)


@dataclass(frozen=True)
class PixelPrompt:
    kind: ClassVar[str] = "pixels"
    pixels: torch.Tensor  # (C, S, S) in normalised units, zero outside the mask
    mask: torch.Tensor  # (S, S) bool: where the prompt is added
    head: Head

    @property
    def num_virtual_tokens(self) -> int:
        return 0  # no tokens: the prompt is in the image

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.pixels, self.mask, self.head.weight, self.head.bias)


@dataclass(frozen=True)
class ContextPrompt:
    kind: ClassVar[str] = "context"
    ctx: torch.Tensor  # (M, H) shared by every class, or (K, M, H) one set per class
    class_names: tuple[str, ...]
    meta: tuple[torch.Tensor, ...] | None = None  # CoCoOp: (W1, b1, W2, b2) of image features -> a shift (H,)

    @property
    def num_virtual_tokens(self) -> int:
        return self.ctx.shape[-2]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        names = torch.tensor(list("\n".join(self.class_names).encode()), dtype=torch.uint8)
        return (self.ctx, *(self.meta or ()), names)


Prompt = EmbeddingPrompt | KVPrompt | PatchPrompt | PixelPrompt | ContextPrompt
PROMPT_KINDS = {cls.kind: cls for cls in (EmbeddingPrompt, KVPrompt, PatchPrompt, PixelPrompt, ContextPrompt)}


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
    elif not isinstance(value, tuple(PROMPT_KINDS.values())):
        value = value()  # a method module
    headed = getattr(value, "head", None) is not None  # an image prompt carries its task's head: never "none"
    return value if value.num_virtual_tokens > 0 or headed else None
