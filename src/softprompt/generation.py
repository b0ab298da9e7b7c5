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
from .join import check_mask, expand_kv, input_positions, run_prompt

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
    hash, dtype, device and autocast state, so each prompt is computed once per backbone and precision."""
    dev = backbone.device.type
    autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    key = (content_hash(prompt), backbone.dtype, str(backbone.device), autocast)  # bf16 autocast rounds differently
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


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SoftPromptError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise SoftPromptError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise SoftPromptError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise SoftPromptError(f"top_k must be >= 0 (got {self.top_k})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SoftPromptError("stop strings must be non-empty strings")


@dataclass
class Row:
    """One row of a decoding batch: what it generated so far and why it stopped."""

    sampling: Sampling
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # EOS is not kept
    text: str = ""  # decoded, cut before the first stop string
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    cancelled: bool = False  # set by another thread (a client went away): the row is dropped at the next step

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


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


def mixed_join(prompts: list[torch.Tensor | None], embeds: torch.Tensor, mask: torch.Tensor):
    """Rows with different prompts, each prompt prepended (no cached key/values): (embeds, mask, positions),
    each row laid out as [pad][its prompt][pad][its input], positions counting real tokens only."""
    B, _, H = embeds.shape
    lengths = [0 if p is None else p.shape[0] for p in prompts]
    P = max(lengths)
    virtual = embeds.new_zeros(B, P, H)
    for i, p in enumerate(prompts):
        if p is not None:
            virtual[i, P - lengths[i]:] = p.to(embeds.dtype)
    n = torch.tensor(lengths, device=embeds.device)
    prompt_mask = (torch.arange(P, device=embeds.device).unsqueeze(0) >= (P - n).unsqueeze(1)).to(mask.dtype)
    full_mask = torch.cat([prompt_mask, mask], dim=1)
    return torch.cat([virtual, embeds], dim=1), full_mask, input_positions(full_mask, 0)


def _pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """(V,) float32 logits of one row -> its next token."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(s.top_k).values[-1], float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest set whose mass reaches top_p
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class Decoding:
    """A batch being decoded one token per step: iterate it, and after each step read ``rows``.

    Rows may have different prompts (or none), inputs, sampling settings and lengths. The prefill is one forward
    (each row attending to its own prompt's cached key/values, or with the prompts prepended when
    ``reuse_prompt_cache`` is off); each step is one forward over the rows still running: a row that finishes
    (EOS, a stop string, its max_new_tokens, or cancelled) is dropped from the batch and its cache.
    Iterating yields, after each step, the indices of the rows that got a token or finished in it.
    """

    def __init__(self, backbone: CausalLMBackbone, prompts: list[torch.Tensor | None], input_ids: torch.Tensor,
                 mask: torch.Tensor, rows: list[Row], reuse_prompt_cache: bool = True):
        B = input_ids.shape[0]
        if len(prompts) != B or len(rows) != B:
            raise SoftPromptError(f"{len(prompts)} prompts and {len(rows)} rows for {B} inputs; give one per input")
        check_mask(mask)
        self.backbone, self.rows = backbone, rows
        self.eos = set(backbone.eos_token_ids or [])
        dev = backbone.device
        embeds = backbone.embed(input_ids)
        first = prompts[0]
        if all(p is None for p in prompts):
            full_mask, positions = mask, input_positions(mask, 0)
            out = backbone.forward(embeds, attention_mask=mask, position_ids=positions, cache=backbone.new_cache(),
                                   use_cache=True, logits_to_keep=1)
        elif not reuse_prompt_cache:
            embeds, full_mask, positions = mixed_join(prompts, embeds, mask)
            out = backbone.forward(embeds, attention_mask=full_mask, position_ids=positions,
                                   cache=backbone.new_cache(), use_cache=True, logits_to_keep=1)
        elif all(p is first for p in prompts):  # one prompt for every row: its cached key/values, expanded
            P = first.shape[0]
            full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=dev), mask], dim=1)
            positions = input_positions(mask, P)
            out = backbone.forward(embeds, attention_mask=full_mask, position_ids=positions,
                                   cache=backbone.new_cache(expand_kv(prompt_kv(backbone, first)[0], B)),
                                   use_cache=True, logits_to_keep=1)
        else:
            out, full_mask, offsets = forward_mixed(backbone, prompts, embeds, mask, logits_to_keep=1)
            positions = input_positions(mask, offsets)
        self.cache = out.cache
        self.logits = out.logits[:, -1].float()  # (B, V): the next token's logits of each running row
        self.prefill_logits = self.logits
        self.mask = full_mask
        self.position = positions[:, -1:]  # (B, 1)
        self.running = list(range(B))  # batch position -> row index
        self.steps = 0

    def __iter__(self):
        tok = self.backbone.tokenizer
        while self.running:
            changed, nxt = [], {}  # batch position -> picked token
            greedy = self.logits.argmax(-1).tolist()  # one op for every greedy row
            for b, i in enumerate(self.running):
                row = self.rows[i]
                if row.cancelled:
                    row.finish_reason = "cancelled"
                    changed.append(i)
                    continue
                t = greedy[b] if row.sampling.temperature == 0 else _pick(self.logits[b], row.sampling, row.generator)
                nxt[b] = t
                changed.append(i)
                if t in self.eos and not row.sampling.ignore_eos:
                    row.finish_reason = "stop"
                    continue
                row.tokens.append(t)
                if tok is not None:
                    row.text = tok.decode(row.tokens, skip_special_tokens=True)
                    hits = [row.text.index(s) for s in row.sampling.stop if s in row.text]
                    if hits:
                        row.text = row.text[: min(hits)]
                        row.finish_reason = "stop"
                        continue
                if len(row.tokens) >= row.sampling.max_new_tokens:
                    row.finish_reason = "length"
            self.steps += 1
            keep = [b for b, i in enumerate(self.running) if not self.rows[i].done]
            if keep and len(keep) < len(self.running):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=self.mask.device)
                self.cache.batch_select_indices(idx)
                self.mask, self.position = self.mask[idx], self.position[idx]
            feed = [nxt[b] for b in keep]
            self.running = [self.running[b] for b in keep]
            yield changed
            if not self.running:
                break
            self._step(feed)

    def _step(self, tokens: list[int]) -> None:
        dev = self.mask.device
        B = len(tokens)
        self.mask = torch.cat([self.mask, torch.ones(B, 1, dtype=self.mask.dtype, device=dev)], dim=1)
        self.position = self.position + 1
        ids = torch.tensor(tokens, device=dev).unsqueeze(1)
        out = self.backbone.forward(self.backbone.embed(ids), attention_mask=self.mask, position_ids=self.position,
                                    cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.logits = out.logits[:, -1].float()


def check_prompt_tensor(backbone: CausalLMBackbone, soft: torch.Tensor | None) -> None:
    if soft is not None and soft.shape[-1] != backbone.hidden_size:
        raise SoftPromptError(f"prompt width {soft.shape[-1]} does not match backbone {backbone.name!r} hidden "
                              f"size {backbone.hidden_size}")
    if soft is not None and not torch.isfinite(soft).all():
        raise SoftPromptError("the prompt contains NaN/Inf values; it cannot be used")


@torch.no_grad()
def generate(backbone: CausalLMBackbone, prompt: Any = None, inputs: Any = None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
             reuse_prompt_cache: bool = True, truncate: bool = False) -> GenerationOutput:
    """Continue each input after its soft prompt.

    `prompt` is one prompt for every row (a method module, PromptFile, (P, H) tensor or None), or a list with one
    prompt (or None) per row: a mixed-task batch, each row attending to its own prompt's cached key/values.
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                        top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop or ()))
    input_ids, mask = encode(backbone, inputs, chat=chat)
    B, T = input_ids.shape
    per_row = isinstance(prompt, (list, tuple))
    if per_row and len(prompt) != B:
        raise SoftPromptError(f"{len(prompt)} prompts for {B} inputs; give one prompt (or None) per input")
    softs = [prompt_tensor(p) for p in prompt] if per_row else [prompt_tensor(prompt)] * B
    for soft in softs:
        check_prompt_tensor(backbone, soft)
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
    generator = torch.Generator(device=backbone.device).manual_seed(seed) if seed is not None else None
    rows = [Row(sampling, generator) for _ in range(B)]  # one generator: rows draw in turn, seeded as a batch
    dec = Decoding(backbone, softs, input_ids, mask, rows, reuse_prompt_cache=reuse_prompt_cache)
    for _ in dec:
        pass
    return GenerationOutput(texts=[r.text for r in rows], tokens=[r.tokens for r in rows],
                            prefill_logits=dec.prefill_logits.clone(),
                            stats={"batch": B, "input_tokens": T, "virtual_tokens": P, "steps": dec.steps})
