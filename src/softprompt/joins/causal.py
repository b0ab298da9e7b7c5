"""Joins into a causal LM. Every prompt kind becomes a *prefix*: per-layer keys and values at positions 0..P-1
that the input rows attend to, and the final state of the last prefix position (which predicts each row's first
token). An embedding prompt runs through the model once (batch 1) to get its prefix; a key/value prompt is one.

Rows then run on top in one forward: the prefix expanded to the batch (a view, no copy; gradients sum back
through the expand), the attention mask extended, and position ids counted from the mask, so that the prompt sits
right before each row's first real token under left and right padding (a padded batch gives each row's outputs
alone). Without gradient, a prompt's prefix is computed once per content and kept in the runtime's prompt cache.
Rows with different prompts (serving, mixed batches) get their prefixes left-padded to the longest
(``stack_prefixes``); prompt-tuned and prefix-tuned tasks share a batch that way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SoftPromptError
from ..fastpath import checkpointed_layers
from ..prompts import EmbeddingPrompt, KVPrompt, Prompt
from .base import Join, register

IGNORE_INDEX = -100


def input_positions(attention_mask: torch.Tensor, offset) -> torch.Tensor:
    """(B, T) positions of the input tokens: `offset` (an int or (B, 1)) for each row's first real token, counting
    real tokens only."""
    return offset + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_mask(attention_mask: torch.Tensor) -> None:
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise SoftPromptError(f"empty input in row(s) {empty[:5]}: every row needs at least one token")


def truncate_to_fit(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                    labels: torch.Tensor | None = None):
    """Drop columns so that at most `keep` remain: from the left under left padding (keeps each row's end),
    from the right under right padding (keeps each row's start)."""
    if input_ids.shape[1] <= keep:
        return input_ids, attention_mask, labels
    left_padded = bool((attention_mask[:, -1] == 1).all()) and not bool((attention_mask[:, 0] == 1).all())
    sl = slice(input_ids.shape[1] - keep, None) if left_padded else slice(0, keep)
    return input_ids[:, sl], attention_mask[:, sl], None if labels is None else labels[:, sl]


@dataclass
class Prefix:
    """What input rows attend to before their own tokens."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (keys, values), (1 or B, kv_heads, P, d)
    last: torch.Tensor | None  # (1 or B, H or V): the last prefix position's hidden state (fast path) or logits
    lengths: torch.Tensor | None = None  # (B,) each row's real prefix length (rows left-padded); None: all P
    _joined: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return 0 if self.layers is None else self.layers[0][0].shape[2]

    def joined(self) -> torch.Tensor:
        """A batch-1 prefix's keys and values of every layer in one tensor, (2 * layers, kv_heads, P, d): keys of
        layer i at 2i, values at 2i + 1. Made once (the layers become views of it): a decoding batch copies a row's
        prefix into its key/value store in one operation (generation.py `KVStore`)."""
        if self._joined is None:
            self._joined = torch.stack([x[0] for kv in self.layers for x in kv])
            self.layers = [(self._joined[2 * i].unsqueeze(0), self._joined[2 * i + 1].unsqueeze(0))
                           for i in range(len(self.layers))]
        return self._joined

    def batch(self, B: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layers for B rows (a batch-1 prefix expanded: a view, gradients sum back)."""
        return [(k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])) for k, v in self.layers]

    def mask(self, B: int, like: torch.Tensor) -> torch.Tensor:
        P = self.length
        if self.lengths is None:
            return torch.ones(B, P, dtype=like.dtype, device=like.device)
        return prefix_mask(self.lengths, P, like)

    def offsets(self, B: int):
        return self.length if self.lengths is None else self.lengths[:, None]

    def last_for(self, B: int) -> torch.Tensor | None:
        return None if self.last is None else self.last.expand(B, -1)


EMPTY = Prefix(None, None)


def prefix_mask(lengths: torch.Tensor, P: int, like: torch.Tensor) -> torch.Tensor:
    """(B, P) mask of prefixes of the given lengths left-padded to P, in `like`'s dtype and device."""
    return (torch.arange(P, device=like.device) >= (P - lengths)[:, None]).to(like.dtype)


def stack_prefixes(prefixes: list[Prefix]) -> Prefix:
    """One prefix for rows with different prompts (or none): each row's layers left-padded to the longest."""
    lengths = [p.length for p in prefixes]
    P = max(lengths)
    if P == 0:
        return EMPTY
    first = next(p for p in prefixes if p.length)
    dev = first.layers[0][0].device
    B = len(prefixes)
    layers = []
    for li, (k0, v0) in enumerate(first.layers):
        keys = k0.new_zeros(B, k0.shape[1], P, k0.shape[3])  # (B, kv_heads, P, d)
        values = v0.new_zeros(B, v0.shape[1], P, v0.shape[3])
        for i, p in enumerate(prefixes):
            if p.length:
                k, v = p.layers[li]
                keys[i, :, P - lengths[i]:] = k[0]
                values[i, :, P - lengths[i]:] = v[0]
        layers.append((keys, values))
    last = None
    if any(p.last is not None for p in prefixes):
        like = next(p.last for p in prefixes if p.last is not None)
        last = torch.stack([p.last[0] if p.last is not None else like.new_zeros(like.shape[-1]) for p in prefixes])
    return Prefix(layers, last, torch.tensor(lengths, device=dev))


def run_rows(rt: Any, prefix: Prefix, embeds: torch.Tensor, mask: torch.Tensor, *, last_only: bool = False,
             checkpointing: bool = False) -> torch.Tensor:
    """The rows' forward on a prefix: (B, T, ...) final states, or (B, 1, ...) with last_only. On the fast path
    (``rt.lean``) final hidden states, the LM head left to ``rt.head()``; otherwise the model's logits."""
    bb = rt.backbone
    B = mask.shape[0]
    P = prefix.length
    lean = rt.lean
    kwargs: dict[str, Any] = {} if lean else {"logits_to_keep": 1 if last_only else 0}
    if P:
        full_mask = torch.cat([prefix.mask(B, mask), mask], dim=1)
        kwargs.update(cache=bb.new_cache(prefix.batch(B)), use_cache=True)
    else:
        full_mask = mask
    ckpt = contextlib.nullcontext()
    if checkpointing and P and torch.is_grad_enabled():
        ckpt = checkpointed_layers(bb.base, kwargs["cache"], lambda: rt.engaged(mask, last_only))
    with rt.engaged(mask, last_only), ckpt:
        out = (bb.base if lean else bb.model)(inputs_embeds=embeds, attention_mask=full_mask,
                                                position_ids=input_positions(mask, prefix.offsets(B)), **kwargs)
    states = out.last_hidden_state if lean else out.logits
    return states[:, -1:] if last_only else states


def extend_prefix(rt: Any, prefix: Prefix, embeds: torch.Tensor) -> Prefix:
    """The prefix followed by tokens (c, H) that every row starts with: one batch-1 run of those tokens."""
    bb = rt.backbone
    P, c = prefix.length, embeds.shape[0]
    dev = bb.device
    lean = rt.lean
    kwargs: dict[str, Any] = {} if lean else {"logits_to_keep": 1}
    with rt.engaged():
        out = (bb.base if lean else bb.model)(
            inputs_embeds=embeds.unsqueeze(0), attention_mask=torch.ones(1, P + c, dtype=torch.long, device=dev),
            position_ids=torch.arange(P, P + c, device=dev).unsqueeze(0),
            cache=bb.new_cache(prefix.layers if P else None), use_cache=True, **kwargs)
    layers = [(layer.keys, layer.values) for layer in out.cache.layers]
    return Prefix(layers, out.last_hidden_state[:, -1] if lean else out.logits[:, -1])


def shared_start(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many first real tokens all rows share (each row keeping at least one of its own), for a left-padded
    batch of 2 or more rows; 0 otherwise."""
    B, T = input_ids.shape
    lengths = attention_mask.sum(1)  # (B,)
    n = int(lengths.min()) - 1
    if B < 2 or n <= 0:
        return 0
    left_padded = attention_mask.bool() == (torch.arange(T, device=lengths.device) >= (T - lengths)[:, None])
    if not bool(left_padded.all()):
        return 0
    cols = (T - lengths)[:, None] + torch.arange(n, device=lengths.device)  # (B, n) each row's first real tokens
    first = input_ids.gather(1, cols)
    return int((first == first[:1]).all(0).long().cumprod(0).sum())


def _trains(model: Any) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in model.method.parameters())


class CausalJoin(Join):
    """What both causal-LM joins share; a subclass says how its prompt kind becomes a prefix."""

    backbone_kind = "causal_lm"

    def compute_prefix(self, rt: Any, prompt: Prompt) -> Prefix:
        raise NotImplementedError

    def compute_prefix_then(self, rt: Any, prompt: Prompt | None, shared: torch.Tensor) -> Prefix:
        """The prompt's prefix followed by tokens (c, H) that every row starts with."""
        return extend_prefix(rt, EMPTY if prompt is None else self.compute_prefix(rt, prompt), shared)

    def prefix(self, rt: Any, prompt: Prompt | None, grad: bool = False) -> Prefix:
        """The prompt's prefix: computed with gradient while it trains, else once per content (prompt cache)."""
        if prompt is None:
            return EMPTY
        if grad:
            with rt.engaged():
                return self.compute_prefix(rt, prompt)

        def compute():
            with rt.engaged():
                return self.compute_prefix(rt, prompt)

        return rt.cache.get(rt.cache_key(prompt), compute)

    def _prefix_and_rows(self, model, input_ids, mask, last_only, host):
        """The prefix for these rows, and the rows' embeddings and mask; with last_only, the first tokens every
        row shares (a template's start) join the prefix: computed once instead of B times. `host`: the ids and
        mask on the CPU, where the shared start is found (no device-to-host sync per check on an accelerator)."""
        rt, bb = model.runtime, model.backbone
        embeds = bb.embed(input_ids)  # (B, T, H)
        prompt = _prompt(model)
        grad = _trains(model)
        fp = rt.fastpath
        c = shared_start(*host) if last_only and fp is not None and fp.installed and fp.config.shared_prefix else 0
        if not c:
            return self.prefix(rt, prompt, grad), embeds, mask
        T = input_ids.shape[1]
        start = T - int(host[1][0].sum())
        shared = embeds[0, start:start + c]  # (c, H)

        def compute():
            with rt.engaged():
                return self.compute_prefix_then(rt, prompt, shared)

        if grad:
            prefix = compute()
        else:
            key = rt.cache_key(prompt, extra=("then", tuple(host[0][0, start:start + c].tolist())))
            prefix = rt.cache.get(key, compute)
        mask = mask[:, :T - c]  # (B, T - c): each row c real tokens shorter
        embeds = torch.where(mask[..., None].bool(), embeds[:, c:], embeds[:, :T - c])
        return prefix, embeds, mask

    def hidden_states(self, model, input_ids, attention_mask=None, last_only=False):
        if input_ids.shape[1] == 0:
            raise SoftPromptError("empty input: every row needs at least one token")
        model.check_length(input_ids.shape[1])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        host = (input_ids.cpu(), attention_mask.cpu())  # one copy (no-op on CPU); the checks read it there
        check_mask(host[1])
        prefix, embeds, mask = self._prefix_and_rows(model, input_ids, attention_mask, last_only, host)
        states = run_rows(model.runtime, prefix, embeds, mask, last_only=last_only,
                          checkpointing=model.activation_checkpointing and _trains(model))
        return states, prefix.last

    def forward(self, model, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                truncate=False, **kwargs):
        """The model's own forward (all logits, aligned with the input) on the prompt's prefix; with labels, the
        causal LM loss, the last prompt position predicting the first token."""
        rt, bb = model.runtime, model.backbone
        if inputs_embeds is None:
            inputs_embeds = bb.embed(input_ids)
        B, T, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
        check_mask(attention_mask)
        prefix = self.prefix(rt, _prompt(model), _trains(model))
        P = prefix.length
        if P:
            kwargs.update(cache=bb.new_cache(prefix.batch(B)), use_cache=True)
        with rt.engaged():
            out = bb.model(inputs_embeds=inputs_embeds,
                           attention_mask=torch.cat([prefix.mask(B, attention_mask), attention_mask], dim=1),
                           position_ids=input_positions(attention_mask, prefix.offsets(B)), **kwargs)
        if labels is not None:
            logits = out.logits
            if prefix.last is not None:  # the last virtual position predicts the first token
                first = rt.head(prefix.last_for(B)).unsqueeze(1)
                pred, target = torch.cat([first.to(logits.dtype), logits[:, :-1]], dim=1), labels
            else:
                pred, target = logits[:, :-1], labels[:, 1:]
            out["loss"] = nn.functional.cross_entropy(pred.float().reshape(-1, pred.shape[-1]), target.reshape(-1),
                                                      ignore_index=IGNORE_INDEX)
        return out


def _prompt(model) -> Prompt | None:
    prompt = model.method()
    return prompt if prompt.num_virtual_tokens > 0 else None


@register
class EmbeddingsIntoCausalLM(CausalJoin):
    prompt_kind = "embeddings"

    def compute_prefix(self, rt: Any, prompt: EmbeddingPrompt) -> Prefix:
        bb = rt.backbone
        if prompt.embeddings.shape[-1] != bb.hidden_size:
            raise SoftPromptError(f"prompt width {prompt.embeddings.shape[-1]} does not match backbone "
                                  f"{bb.name!r} hidden size {bb.hidden_size}")
        layers, last = bb.prefix_states(prompt.embeddings, head=not rt.lean)
        return Prefix(layers, last)

    def compute_prefix_then(self, rt: Any, prompt: EmbeddingPrompt | None, shared: torch.Tensor) -> Prefix:
        """One batch-1 run of [prompt ; shared tokens]: a pass over the weights costs about the same for 2 tokens
        as for 20 on a CPU (each matmul streams its whole weight), so one run, not two."""
        if prompt is None:
            return super().compute_prefix_then(rt, prompt, shared)
        embeds = torch.cat([prompt.embeddings.to(device=shared.device, dtype=shared.dtype), shared])
        return self.compute_prefix(rt, EmbeddingPrompt(embeds))


@register
class KVIntoCausalLM(CausalJoin):
    prompt_kind = "kv"

    def compute_prefix(self, rt: Any, prompt: KVPrompt) -> Prefix:
        bb = rt.backbone
        dev = bb.device
        auto = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        kv = prompt.kv.to(device=dev, dtype=auto or bb.dtype)  # (L, 2, kv_heads, P, d)
        return Prefix([(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0)) for i in range(kv.shape[0])], None)
