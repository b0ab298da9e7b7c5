"""Generation with a soft prompt, whose key/values are computed once per (backbone, prompt) and reused.

A causal LM's prompt sits at positions 0..P-1 and attends only to itself, so its key/value cache depends on
the backbone and the prompt alone, never on the input. ``prompt_kv`` computes it once (batch 1) and keeps it,
keyed by the prompt's content hash; each call expands it to its batch. The decode loop is ours: left-padded
batch, positions from the mask, transformers Cache objects, greedy or sampling, stop at EOS or stop strings.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .backbones import CausalLMBackbone
from .errors import SoftPromptError
from .join import check_mask, expand_kv, input_positions, prefix_join, run_prompt

_KV_CACHE_SIZE = 64  # prompts whose key/values are kept per backbone
_KV_LOCK = threading.Lock()  # the store is shared by request threads


def prompt_tensor(prompt: Any) -> torch.Tensor | None:
    """(P, H) from a method module, a PromptFile, a tensor, or None (no prompt; a 0-token prompt is none too)."""
    if prompt is None:
        return None
    if not isinstance(prompt, torch.Tensor):
        if hasattr(prompt, "build"):  # PromptFile
            prompt = prompt.build()
        prompt = prompt()
    return prompt if prompt.shape[0] > 0 else None


def content_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def forget_prompt_kv(backbone: CausalLMBackbone, digest: str) -> int:
    """Drop the cached key/values of the prompt with this content hash (every dtype/device); returns how many."""
    with _KV_LOCK:
        store: OrderedDict = backbone.__dict__.setdefault("_prompt_kv", OrderedDict())
        stale = [k for k in store if k[0] == digest]
        for k in stale:
            del store[k]
    return len(stale)


def prompt_kv(backbone: CausalLMBackbone, prompt: torch.Tensor):
    """(per-layer (keys, values), last-position logits) of the prompt alone, batch 1, no grad; cached by content
    hash, dtype and device, so each prompt is computed once per backbone."""
    key = (content_hash(prompt), backbone.dtype, str(backbone.device))
    with _KV_LOCK:
        store: OrderedDict = backbone.__dict__.setdefault("_prompt_kv", OrderedDict())
        if key in store:
            store.move_to_end(key)
            backbone.kv_hits = getattr(backbone, "kv_hits", 0) + 1
            return store[key]
        backbone.kv_misses = getattr(backbone, "kv_misses", 0) + 1
    with torch.no_grad():
        value = run_prompt(backbone, prompt.detach())
    with _KV_LOCK:
        store[key] = value
        while len(store) > _KV_CACHE_SIZE:
            store.popitem(last=False)
    return value


@dataclass
class GenerationOutput:
    texts: list[str]
    tokens: list[list[int]]  # new tokens per row, EOS and anything after it removed
    prefill_logits: torch.Tensor | None = None  # (B, V) logits at the last input position, float32
    stats: dict = field(default_factory=dict)


def encode(backbone: CausalLMBackbone, inputs: str | list[str] | list[list[int]], chat: bool = False):
    """Tokenise and left-pad: (input_ids, attention_mask), each (B, T)."""
    tok = backbone.tokenizer
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise SoftPromptError("empty input: give at least one text")
    rows: list[list[int]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if tok is None:
                raise SoftPromptError(f"backbone {backbone.name!r} has no tokenizer; pass token ids")
            if not item.strip() and not chat:
                raise SoftPromptError(f"empty input in row {i}: give some text")
            if chat:
                if not getattr(tok, "chat_template", None):
                    raise SoftPromptError(f"backbone {backbone.name!r} has no chat template; drop --chat")
                ids = tok.apply_chat_template([{"role": "user", "content": item}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tok(item)["input_ids"]
        else:
            ids = list(item)
        if not ids:
            raise SoftPromptError(f"empty input in row {i}: it has no tokens")
        rows.append(list(ids))
    T = max(len(r) for r in rows)
    pad = backbone.pad_token_id
    input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=backbone.device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=backbone.device)
    return input_ids, mask


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) token ids."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def mixed_prompt_kv(backbone: CausalLMBackbone, prompts: list[torch.Tensor | None]):
    """One cache for rows with different prompts (or none): each row's prompt key/values (cached per prompt
    content) left-padded to the longest prompt. Returns (layers, prompt_mask (B, P_max), lengths (B, 1))."""
    lengths = [0 if p is None else p.shape[0] for p in prompts]
    P = max(lengths)
    B = len(prompts)
    dev = backbone.device
    kvs = {}
    for p in prompts:
        if p is not None and id(p) not in kvs:
            kvs[id(p)] = prompt_kv(backbone, p)[0]
    template = next(iter(kvs.values()))
    layers = []
    for li, (k0, v0) in enumerate(template):
        keys = k0.new_zeros(B, k0.shape[1], P, k0.shape[3])  # (B, heads, P_max, d)
        values = v0.new_zeros(B, v0.shape[1], P, v0.shape[3])
        for i, p in enumerate(prompts):
            if p is not None:
                k, v = kvs[id(p)][li]
                keys[i, :, P - lengths[i]:] = k[0]
                values[i, :, P - lengths[i]:] = v[0]
        layers.append((keys, values))
    n = torch.tensor(lengths, device=dev)
    prompt_mask = (torch.arange(P, device=dev).unsqueeze(0) >= (P - n).unsqueeze(1)).long()  # (B, P_max)
    return layers, prompt_mask, n.unsqueeze(1)


def forward_mixed(backbone: CausalLMBackbone, prompts: list[torch.Tensor | None], embeds: torch.Tensor,
                  mask: torch.Tensor, logits_to_keep: int = 0):
    """One forward for rows with different prompts (or none), each attending to its own cached prompt KV.
    Returns (outputs, full attention mask, per-row prompt lengths (B, 1))."""
    layers, prompt_mask, offsets = mixed_prompt_kv(backbone, prompts)
    full_mask = torch.cat([prompt_mask.to(mask.dtype), mask], dim=1)
    out = backbone.forward(embeds, attention_mask=full_mask, position_ids=input_positions(mask, offsets),
                           cache=backbone.new_cache(layers), use_cache=True, logits_to_keep=logits_to_keep)
    return out, full_mask, offsets


@torch.no_grad()
def generate(backbone: CausalLMBackbone, prompt: Any = None, inputs: Any = None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
             reuse_prompt_cache: bool = True, truncate: bool = False) -> GenerationOutput:
    """Continue each input after its soft prompt.

    `prompt` is one prompt for every row (a method module, PromptFile, (P, H) tensor or None), or a list with one
    prompt (or None) per row: a mixed-task batch, each row attending to its own prompt's cached key/values.
    """
    if max_new_tokens < 1:
        raise SoftPromptError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if do_sample and temperature < 0:
        raise SoftPromptError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise SoftPromptError(f"top_p must be in (0, 1] (got {top_p})")
    input_ids, mask = encode(backbone, inputs, chat=chat)
    B, T = input_ids.shape
    per_row = isinstance(prompt, (list, tuple))
    if per_row and len(prompt) != B:
        raise SoftPromptError(f"{len(prompt)} prompts for {B} inputs; give one prompt (or None) per input")
    softs = [prompt_tensor(p) for p in prompt] if per_row else [prompt_tensor(prompt)]
    for soft in softs:
        if soft is not None and soft.shape[-1] != backbone.hidden_size:
            raise SoftPromptError(f"prompt width {soft.shape[-1]} does not match backbone {backbone.name!r} hidden "
                                  f"size {backbone.hidden_size}")
        if soft is not None and not torch.isfinite(soft).all():
            raise SoftPromptError("the prompt contains NaN/Inf values; it cannot be used")
    P = max(0 if s is None else s.shape[0] for s in softs)
    limit = backbone.max_positions
    if limit is not None and P + T + max_new_tokens > limit:
        if truncate and limit - P - max_new_tokens > 0:
            keep = limit - P - max_new_tokens
            input_ids, mask = input_ids[:, -keep:], mask[:, -keep:]
            T = keep
        else:
            raise SoftPromptError(f"input of {T} tokens + {P} virtual tokens + {max_new_tokens} new tokens exceeds "
                                  f"the model's {limit} positions; shorten the input, lower max_new_tokens or "
                                  f"pass truncate=True")
    check_mask(mask)
    dev = backbone.device
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    embeds = backbone.embed(input_ids)  # (B, T, H)
    soft = softs[0]
    if per_row and any(s is not None for s in softs):
        out, full_mask, P = forward_mixed(backbone, softs, embeds, mask, logits_to_keep=1)
        # P is (B, 1) now: each row's own prompt length sets its positions
    elif per_row or soft is None:
        full_mask = mask
        out = backbone.forward(embeds, attention_mask=mask, position_ids=input_positions(mask, 0),
                               cache=backbone.new_cache(), use_cache=True, logits_to_keep=1)
    elif reuse_prompt_cache:
        cache = backbone.new_cache(expand_kv(prompt_kv(backbone, soft)[0], B))
        full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=dev), mask], dim=1)
        out = backbone.forward(embeds, attention_mask=full_mask, position_ids=input_positions(mask, P),
                               cache=cache, use_cache=True, logits_to_keep=1)
    else:
        j = prefix_join(soft, embeds, mask)
        full_mask = j.attention_mask
        out = backbone.forward(j.inputs_embeds, attention_mask=full_mask, position_ids=j.position_ids,
                               cache=backbone.new_cache(), use_cache=True, logits_to_keep=1)
    cache = out.cache
    logits = out.logits[:, -1].float()  # (B, V)
    prefill_logits = logits.clone()
    position = input_positions(mask, P)[:, -1:]  # (B, 1) last input position of each row
    eos = torch.tensor(backbone.eos_token_ids or [-1], device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)  # new tokens kept per row
    new_tokens = []
    tok = backbone.tokenizer
    for step in range(max_new_tokens):
        nxt = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, backbone.pad_token_id), nxt)
        new_tokens.append(nxt)
        finished = torch.isin(nxt, eos) & ~done
        lengths = torch.where(finished, step, lengths)  # EOS itself is not kept
        done |= finished
        if stop and tok is not None:
            seqs = torch.stack(new_tokens, 1).tolist()
            for i in range(B):
                if not done[i] and any(s in tok.decode(seqs[i], skip_special_tokens=True) for s in stop):
                    done[i] = True
                    lengths[i] = step + 1
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        full_mask = torch.cat([full_mask, torch.ones(B, 1, dtype=full_mask.dtype, device=dev)], dim=1)
        position = position + 1
        out = backbone.forward(backbone.embed(nxt[:, None]), attention_mask=full_mask, position_ids=position,
                               cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float()
    gen = torch.stack(new_tokens, 1).tolist()
    tokens, texts = [], []
    for row, n in zip(gen, lengths.tolist(), strict=True):
        row = row[:n]
        text = tok.decode(row, skip_special_tokens=True) if tok is not None else ""
        for s in stop or []:
            if s in text:
                text = text[: text.index(s)]
        tokens.append(row)
        texts.append(text)
    return GenerationOutput(texts=texts, tokens=tokens, prefill_logits=prefill_logits,
                            stats={"batch": B, "input_tokens": T, "virtual_tokens": int(torch.as_tensor(P).max()),
                                   "steps": len(new_tokens)})
