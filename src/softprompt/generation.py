"""Generation with soft prompts, whose key/values are computed once per (backbone, prompt) and reused.

A causal LM's prompt sits at positions 0..P-1 and attends only to itself, so its key/values (its prefix) depend on
the backbone and the prompt alone, never on the input: the runtime's prompt cache keeps them, keyed by the prompt's
content, and every batch expands them. The decode loop is ours: left-padded batch, positions from the mask,
transformers Cache objects, greedy or sampling, stop at EOS or stop strings, rows with different prompts (or none)
in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .backbones import CausalLMBackbone
from .errors import SoftPromptError
from .fastpath.decode import Fresh, Step
from .joins import check_mask, input_positions, stack_prefixes
from .joins.causal import prefix_mask
from .model import MixedPromptedModel
from .prompts import Prompt, as_prompt, content_hash
from .runtime import runtime

__all__ = ["Decoding", "GenerationOutput", "Row", "Sampling", "content_hash", "encode", "generate", "prompt_of"]


def prompt_of(value: Any) -> Prompt | None:
    """A typed prompt from a method module, a PromptFile, a typed prompt, a (P, H) tensor, or None."""
    if value is not None and hasattr(value, "metadata") and hasattr(value, "tensors"):  # a PromptFile
        from .methods import from_file

        value = from_file(value)
    return as_prompt(value)


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
    _prefix: int = field(default=0, repr=False)  # incremental detokenisation: tokens[_prefix:_read] were decoded
    _read: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int, tokenizer: Any) -> None:
        """Append a token and extend `text` by what it adds. Only the last few tokens are decoded (the
        incremental detokenisation of TGI and vLLM), so a row of n tokens costs O(n), not O(n^2); a token that
        ends in the middle of a multi-byte character adds nothing until the character completes."""
        self.tokens.append(token)
        if tokenizer is None:
            return
        before = tokenizer.decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            look = max(0, start - max((len(s) for s in self.sampling.stop), default=1) + 1)
            hits = [self.text.index(s, look) for s in self.sampling.stop if s in self.text[look:]]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"

    def settle(self, tokenizer: Any) -> None:
        """A row that ends with tokens not yet in `text` (an unfinished multi-byte character): its text becomes the
        whole decode, as a one-shot decode of the same tokens gives it."""
        if tokenizer is not None and self._read < len(self.tokens) and self.finish_reason != "stop":
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            self._prefix = self._read = len(self.tokens)


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

    Rows may have different prompts (any kind, or none), inputs, sampling settings and lengths. The prefill is one
    forward (each row attending to its own prompt's cached prefix; with ``reuse_prompt_cache`` off each prompt's
    prefix is recomputed for the batch); each step is one forward over the batch's slots. Each row lives in a slot
    (a batch position of the key/value buffers). A row that finishes (EOS, a stop string, its max_new_tokens, or
    cancelled) frees its slot without a copy; rows merged in later (continuous batching) are written into free
    slots, so a merge writes only the new rows. Free slots still ride along in the steps (their outputs are
    ignored) until they are reused, or until more than half the slots are free: then the live rows are gathered
    into a smaller batch. Iterating yields, after each step, the indices of the rows that got a token or finished.
    ``capacity`` is the number of rows the batch may grow to by merges: buffers get room for twice the rows they
    hold, up to it (a merge that does not fit makes new buffers).
    """

    def __init__(self, backbone: CausalLMBackbone, prompts: list[Any], input_ids: torch.Tensor,
                 mask: torch.Tensor, rows: list[Row], reuse_prompt_cache: bool = True, capacity: int = 0,
                 prefill: bool = True):
        B = input_ids.shape[0]
        if len(prompts) != B or len(rows) != B:
            raise SoftPromptError(f"{len(prompts)} prompts and {len(rows)} rows for {B} inputs; give one per input")
        check_mask(mask)
        self.backbone, self.rows = backbone, rows
        self.eos = set(backbone.eos_token_ids or [])
        self.rt = runtime(backbone)
        prefixes = MixedPromptedModel(backbone, prompts, reuse_prompt_cache).prefixes()
        P = max(p.length for p in prefixes)
        lengths = torch.tensor([p.length for p in prefixes], device=mask.device)
        full_mask = torch.cat([prefix_mask(lengths, P, mask), mask], dim=1)
        positions = input_positions(mask, lengths[:, None])
        self.capacity = max(B, capacity)
        self.mask = full_mask
        self.position = positions[:, -1:]  # (B, 1); a free slot's stays 0 (never past the model's positions)
        self.alive = torch.ones(B, 1, dtype=positions.dtype, device=positions.device)  # 1: the slot holds a row
        self.slots: list[int | None] = list(range(B))  # batch position -> row index (None: a free slot)
        self.steps = 0
        self._feed: list[int] = []  # the tokens pick() chose, one per slot, for advance()
        # the prefill to run: now, or (prefill=False) in another batch's next step (`advance(joining=self)`)
        self._fresh: Fresh | None = Fresh(input_ids, mask, positions, full_mask,
                                          _new_cache(backbone, prefixes, P, input_ids.shape[1],
                                                     self._room(B) if prefill else 0))
        if prefill:
            self._prefill()

    def _prefill(self) -> None:
        """The batch's own prefill forward: through the fast path's lean forward where the model has one, else the
        model's forward (its MLPs on real tokens only, the last layer's on the last column)."""
        f, rt = self._fresh, self.rt
        with rt.engaged(f.mask, last_only=True):
            lean = rt.joint_forward()
            if lean is not None:
                logits = lean(None, f)[1]
                cache = f.cache
            else:
                out = self.backbone.forward(self.backbone.embed(f.ids), attention_mask=f.full_mask,
                                            position_ids=f.positions, cache=f.cache, use_cache=True,
                                            logits_to_keep=1)
                cache, logits = out.cache, out.logits[:, -1]
        self._prefilled(cache, logits)

    def _prefilled(self, cache, logits: torch.Tensor) -> None:
        self.cache = cache
        self.logits = logits.float()  # (B, V): the next token's logits of each slot
        self.prefill_logits = self.logits
        self._fresh = None

    @property
    def running(self) -> list[int]:
        """The indices of the rows still decoding, in slot order."""
        return [i for i in self.slots if i is not None]

    def __iter__(self):
        while self.running:
            changed = self.pick()
            yield changed
            if not self.running:
                break
            self.advance()

    def pick(self) -> list[int]:
        """Pick each running row's next token from the current logits; rows that finish free their slots. Returns
        the indices of the rows that got a token or finished. `advance()` then runs the step."""
        tok = self.backbone.tokenizer
        changed, feed, freed = [], [0] * len(self.slots), []  # a free slot is fed token 0 (its output is never read)
        # one op for every greedy row; max's indices (the first maximum, like argmax) cost a quarter of argmax's
        # on a CPU at (8, 49152)
        greedy = self.logits.max(-1).indices.tolist()
        for b, i in enumerate(self.slots):
            if i is None:
                continue
            row = self.rows[i]
            changed.append(i)
            if row.cancelled:
                row.finish_reason = "cancelled"
            else:
                t = greedy[b] if row.sampling.temperature == 0 else _pick(self.logits[b], row.sampling, row.generator)
                feed[b] = t
                if t in self.eos and not row.sampling.ignore_eos:
                    row.finish_reason = "stop"
                else:
                    row.add_token(t, tok)
                    if not row.done and len(row.tokens) >= row.sampling.max_new_tokens:
                        row.finish_reason = "length"
            if row.done:
                row.settle(tok)
                self.slots[b] = None
                freed.append(b)
        self.steps += 1
        live = [b for b, i in enumerate(self.slots) if i is not None]
        if not live:
            self._feed = []
            return changed
        if freed:  # a free slot's position stays 0 from now on
            idx = torch.tensor(freed, device=self.position.device)
            self.position = self.position.index_fill(0, idx, 0)
            self.alive = self.alive.index_fill(0, idx, 0)
        # more than half the slots free, or more than half the columns padding no live row attends to (the batch
        # grows a column per step while new rows keep joining it): gather the live rows, from their first column
        if freed and (2 * len(live) < len(self.slots) or 2 * self._lead(live) > self.mask.shape[1]):
            self._select(live)
            feed = [feed[b] for b in live]
            self.slots = [self.slots[b] for b in live]
        self._feed = feed
        return changed

    def advance(self, joining: Decoding | None = None) -> None:
        """One forward over the batch's slots with the tokens `pick()` chose: the next logits. `joining`, a batch
        made with ``prefill=False`` (continuous batching's new rows), is prefilled in the same forward where the
        fast path has a lean forward (its tokens ride in the step's products: one pass over the weights for both),
        else in its own forward first."""
        if joining is not None and joining._fresh is None:
            raise SoftPromptError("the joining batch was prefilled already; make it with prefill=False")
        tokens = self._feed
        dev = self.mask.device
        B = len(tokens)
        mask = torch.cat([self.mask, torch.ones(B, 1, dtype=self.mask.dtype, device=dev)], dim=1)
        position = self.position + self.alive
        ids = torch.tensor(tokens, device=dev).unsqueeze(1)
        joint = self.rt.joint_forward() if joining is not None else None
        if joining is not None and joint is None:
            joining._prefill()
        if joint is not None:
            f = joining._fresh
            with self.rt.engaged(f.mask):
                logits, theirs = joint(Step(ids, mask, position, self.cache), f)
            joining._prefilled(f.cache, theirs)
        else:
            with self.rt.engaged():  # the fast path's attention and weight casts in every step, as in the prefill
                lean = self.rt.decode_step()
                if lean is not None:
                    logits = lean(ids, mask, position, self.cache)
                else:
                    out = self.backbone.forward(self.backbone.embed(ids), attention_mask=mask,
                                                position_ids=position, cache=self.cache, use_cache=True)
                    self.cache = out.cache
                    logits = out.logits[:, -1]
        self.mask, self.position, self.logits = mask, position, logits.float()
        self._feed = []

    def merge(self, other: Decoding) -> None:
        """Take in another batch that was just prefilled (continuous batching): its rows join this one and decode
        with it. Both must be at the same point of a step: holding fresh logits (after a prefill or `advance()`,
        before `pick()`), or picked (before `advance()`: each row's chosen token is carried over, so a server sends
        the new rows' first tokens before they join). The new rows' keys/values are written into free slots (and
        slots after the last, within the buffers' room), left-padded (masked) to this batch's width (or this batch's
        rows moved right in place, when the new rows are wider), so every row attends to what it attended to alone;
        positions stay per row. When the new rows do not fit in the buffers' room, both batches' live rows are
        gathered into new buffers."""
        if not other.running:
            return
        if not self.running:
            self.__dict__.update({k: v for k, v in other.__dict__.items() if k not in ("steps", "capacity")})
            return
        picked = bool(self._feed)
        if picked != bool(other._feed):
            raise SoftPromptError("merge batches at the same point of a step: both before pick() or both after it")
        if _store(self.cache) is None or _store(other.cache) is None:
            raise SoftPromptError("continuous batching merges only caches of full-attention layers (not "
                                  "sliding-window ones)")
        offset = len(self.rows)
        theirs = [b for b, i in enumerate(other.slots) if i is not None]
        new = [offset + other.slots[b] for b in theirs]
        free = [b for b, i in enumerate(self.slots) if i is None][:len(theirs)]
        slots = free + list(range(len(self.slots), len(self.slots) + len(theirs) - len(free)))
        L, W = self.mask.shape[1], other.mask.shape[1]
        store = _store(self.cache)
        if store.buf.shape[1] >= slots[-1] + 1 and store.buf.shape[-2] > W:
            if W > L:  # the new rows are wider: this batch's rows move right in place, its mask padded on the left
                store.widen(len(self.slots), W - L)
                self.mask = _pad_left(self.mask, W, dim=1)
                L = W
            self._write(other, theirs, slots, L)
            feed = self._feed + [0] * (slots[-1] + 1 - len(self._feed)) if picked else []
            for b, i, src in zip(slots, new, theirs, strict=True):
                if b < len(self.slots):
                    self.slots[b] = i
                else:
                    self.slots.append(i)
                if picked:
                    feed[b] = other._feed[src]
            self._feed = feed
        else:  # both batches' live rows gathered once into new buffers with room (no padded copies, no cat)
            mine = [b for b, i in enumerate(self.slots) if i is not None]
            L = max(L, other.mask.shape[1])
            self.capacity = max(self.capacity, len(mine) + len(theirs))
            room = self._room(len(mine) + len(theirs))
            store = KVStore.holding([(_store(self.cache), mine), (_store(other.cache), theirs)], L, room)
            mask = torch.cat([_pad_left(self.mask[mine], L, dim=1), _pad_left(other.mask[theirs], L, dim=1)])
            position = torch.cat([self.position[mine], other.position[theirs]])
            alive = torch.cat([self.alive[mine], other.alive[theirs]])
            logits = torch.cat([self.logits[mine], other.logits[theirs]])
            cache = self.backbone.new_cache()
            # nothing of this batch changed before this point (a failed merge leaves it whole)
            cache.layers = store.layers
            self.cache, self.mask, self.position, self.alive, self.logits = cache, mask, position, alive, logits
            self.slots = [self.slots[b] for b in mine] + new
            if picked:
                self._feed = [self._feed[b] for b in mine] + [other._feed[b] for b in theirs]
        self.rows = self.rows + other.rows

    def _room(self, rows: int) -> int:
        """Rows a new buffer makes room for: twice those it holds, up to the batch's capacity."""
        return min(self.capacity, max(2 * rows, rows + 4))

    def _write(self, other: Decoding, theirs: list[int], slots: list[int], L: int) -> None:
        """`other`'s rows `theirs` into this batch's `slots` (free ones, or new ones at the end within the buffers'
        room), left-padded to width `L`: only the new rows are written."""
        dev = self.mask.device
        src = torch.tensor(theirs, device=dev)
        dst = torch.tensor(slots, device=dev)
        B = max(len(self.slots), slots[-1] + 1)
        pad = L - other.mask.shape[1]
        grow = B - len(self.slots)
        mask, position, alive, logits = self.mask, self.position, self.alive, self.logits
        if grow:  # new tensors first: an allocation that fails leaves this batch whole
            mask = torch.cat([mask, mask.new_zeros(grow, L)])
            position = torch.cat([position, position.new_zeros(grow, 1)])
            alive = torch.cat([alive, alive.new_zeros(grow, 1)])
            logits = torch.cat([logits, logits.new_zeros(grow, logits.shape[1])])
        mask[dst] = _pad_left(other.mask[src], L, dim=1)
        position[dst] = other.position[src]
        alive[dst] = 1
        logits[dst] = other.logits[src]
        store, theirs_store = _store(self.cache), _store(other.cache)
        part = theirs_store.buf[:, :, :, :other.mask.shape[1]]
        part = part[:, :len(theirs)] if theirs == list(range(len(theirs))) else part.index_select(1, src)
        view = store.buf[:, :, :, :L]
        if pad:
            view[:, :, :, :pad].index_fill_(1, dst, 0)
        view[:, :, :, pad:].index_copy_(1, dst, part)
        store.view(B, L)
        self.mask, self.position, self.alive, self.logits = mask, position, alive, logits

    @property
    def width(self) -> int:
        """Key/value positions each step attends to (padding included)."""
        return self.mask.shape[1]

    def forget_finished(self) -> list[int]:
        """Renumber the running rows 0..n-1 and forget the finished ones (so `rows` stays short in a server that
        runs for days). Returns the old indices of the rows kept, in their new order."""
        keep = self.running
        new = {old: n for n, old in enumerate(keep)}
        self.rows = [self.rows[i] for i in keep]
        self.slots = [None if i is None else new[i] for i in self.slots]
        return keep

    def _lead(self, rows: list[int]) -> int:
        """The first column any of these slots attends to (the columns before it are padding for all of them)."""
        return int((self.mask[rows].sum(0) > 0).to(torch.int8).argmax())

    def _select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.mask.device)
        lead = self._lead(keep)
        self.mask, self.position, self.logits = self.mask[idx], self.position[idx], self.logits[idx]
        self.alive = self.alive[idx]
        self.mask = self.mask[:, lead:]
        store = _store(self.cache)
        if store is not None:
            # the kept rows, from the first column any of them attends to, moved to the front of the same buffer
            # (its room stays: a batch under steady load fills it again, no rebuild)
            store.select(idx, lead)
            return
        self.cache.batch_select_indices(idx)
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]


class KVStore:
    """Every layer's keys and values of a decoding batch in one tensor, (2 * layers, rows, kv_heads, positions, d)
    (layer i's keys at 2i, its values at 2i + 1), with room for more rows and positions. Its cache layers
    (`GrowingLayer`) are views of it: a decode step writes each layer's new token into it instead of copying the
    layer (``torch.cat`` at every step and layer), and a batch's prefixes, a merge of new rows, a gather of the live
    rows and a growth are each one operation for all layers (per layer, two each: under a server's load, a merge's
    many small operations cost more than their copies)."""

    def __init__(self, buf: torch.Tensor | None, n_layers: int, rows: int = 0):
        self.buf = buf  # None until the first update when nothing was written before it (no prefix)
        self.rows = rows  # rows a buffer made at the first update has room for
        self.layers = [GrowingLayer(self, i) for i in range(n_layers)]

    @classmethod
    def make(cls, like: torch.Tensor, n_layers: int, rows: int, length: int, room: int = 0,
             reserve: int = 0, steps: bool = True) -> KVStore:
        """A store shaped like `like` (.., kv_heads, .., d) whose layers hold `rows` rows and `length` positions (to
        be filled), with room for `room` rows and for `reserve` positions and (``steps``) the steps after them."""
        positions = max(length, reserve)
        buf = like.new_empty(2 * n_layers, max(rows, room), like.shape[-3], _room(positions) if steps else positions,
                             like.shape[-1])
        store = cls(buf, n_layers)
        store.view(rows, length)
        return store

    def view(self, rows: int, length: int) -> None:
        """Every layer: the first `rows` rows and `length` positions."""
        for layer in self.layers:
            layer.point(rows, length)

    def grow(self, like: torch.Tensor, rows: int, length: int) -> None:
        """Room for `rows` rows and `length` positions: a new buffer holding what every layer holds."""
        old = self.buf
        if old is None:
            self.buf = like.new_empty(2 * len(self.layers), max(rows, self.rows), like.shape[1], _room(length),
                                      like.shape[-1])
            return
        held = [layer.keys.shape for layer in self.layers]
        top, upto = max(h[0] for h in held), max(h[-2] for h in held)
        self.buf = old.new_empty(old.shape[0], max(rows, old.shape[1]), old.shape[2],
                                 max(_room(length), old.shape[-2]), old.shape[-1])
        self.buf[:, :top, :, :upto] = old[:, :top, :, :upto]
        for layer, h in zip(self.layers, held, strict=True):
            layer.point(h[0], h[-2])

    @classmethod
    def holding(cls, parts: list[tuple[KVStore, list[int]]], length: int, room: int = 0) -> KVStore:
        """A store holding the given rows of each store, stacked, each left-padded with zeros to `length`
        positions, with room to grow."""
        first = parts[0][0]
        n_rows = sum(len(idx) for _, idx in parts)
        buf = first.buf
        out = cls.make(buf[0, :1], len(first.layers), n_rows, length, room)
        at = 0
        for store, idx in parts:
            n, L = len(idx), store.layers[0].keys.shape[-2]
            src = store.buf[:, :, :, :L]
            src = src[:, :n] if idx == list(range(n)) else src.index_select(1, torch.tensor(idx, device=buf.device))
            out.buf[:, at:at + n, :, :length - L].zero_()
            out.buf[:, at:at + n, :, length - L:length] = src
            at += n
        return out

    # The two in-place moves below go a layer's keys (or values) at a time through a temporary of that size: a
    # temporary that small comes from the allocator's free memory, where a new buffer of the store's size costs a
    # page fault per page at its first use (under a server's load, several times the copy itself).
    def select(self, rows: torch.Tensor, lead: int) -> None:
        """Keep `rows` (in that order, as rows 0..) from position `lead` on, in place."""
        n, k, buf = self.layers[0].keys.shape[-2], len(rows), self.buf
        for i in range(buf.shape[0]):
            buf[i, :k, :, :n - lead] = buf[i, :, :, lead:n].index_select(0, rows)
        self.view(k, n - lead)

    def widen(self, rows: int, by: int) -> None:
        """Move the first `rows` rows `by` positions right (zeros on their left), in place: every row attends to
        what it did, in a batch `by` columns wider. The buffer must have room for them."""
        n, buf = self.layers[0].keys.shape[-2], self.buf
        for i in range(buf.shape[0]):
            part = buf[i, :rows, :, :n].clone()
            buf[i, :rows, :, by:by + n] = part
            buf[i, :rows, :, :by].zero_()
        self.view(rows, n + by)


class GrowingLayer(DynamicLayer):
    """A cache layer whose keys and values are views of its batch's `KVStore` (inference only: decoding). Code that
    replaces them (transformers' row selection, trimming) makes the layer a plain dynamic one from then on."""

    def __init__(self, store: KVStore, index: int):
        super().__init__()
        self.store, self.index = store, index
        self._views: tuple | None = None  # the views it set (others: replaced from outside)

    def point(self, rows: int, length: int) -> None:
        buf = self.store.buf
        self.keys, self.values = buf[2 * self.index, :rows, :, :length], buf[2 * self.index + 1, :rows, :, :length]
        self.device, self.is_initialized = buf.device, True
        self._views = (self.keys, self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._views is None and self.store.buf is None:  # the first write (no prefix): the store's buffer now
            self.store.grow(key_states, key_states.shape[0], key_states.shape[-2])
            self.store.view(key_states.shape[0], 0)
        if self._views is None or self._views[0] is not self.keys or self._views[1] is not self.values:
            return super().update(key_states, value_states, *args, **kwargs)  # replaced from outside: plain
        B, n, add = key_states.shape[0], self.keys.shape[-2], key_states.shape[-2]
        buf = self.store.buf
        if n + add > buf.shape[-2] or B > buf.shape[1]:
            self.store.grow(key_states, B, n + add)
            buf = self.store.buf
        buf[2 * self.index, :B, :, n:n + add] = key_states
        buf[2 * self.index + 1, :B, :, n:n + add] = value_states
        self.point(B, n + add)
        return self.keys, self.values


def _new_cache(backbone: CausalLMBackbone, prefixes: list, P: int, T: int, rows: int):
    """A decoding batch's cache holding each row's prefix, left-padded to P: a `KVStore` with room for `rows` rows
    and the batch's T input tokens and its steps, where every layer is a full-attention one; else transformers'
    cache (sliding-window layers) with the prefixes stacked. ``rows=0``: exactly the batch's rows and P + T
    positions, no room (a batch prefilled to be merged into another: its buffer is read once, and a small one is
    reused from the allocator's free memory where a large one costs fresh pages every time)."""
    cache = backbone.new_cache()
    full = bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers) and all(
        p.layers is None or len(p.layers) == len(cache.layers) for p in prefixes)
    B = len(prefixes)
    if not full:
        if P:
            stacked = stack_prefixes(prefixes)
            for layer, (k, v) in zip(cache.layers, stacked.layers, strict=True):
                layer.update(k, v)
        return cache
    if not P:
        store = KVStore(None, len(cache.layers), rows)
    else:
        joined = {id(p): p.joined() for p in prefixes if p.length}
        like = next(iter(joined.values()))
        store = KVStore.make(like, len(cache.layers), B, P, rows, reserve=P + T,  # the prefill writes T more
                             steps=rows > 0)
        store.buf[:, :B, :, :P].zero_()
        for b, p in enumerate(prefixes):
            if p.length:
                store.buf[:, b, :, P - p.length:P] = joined[id(p)]
    cache.layers = store.layers
    return cache


def _store(cache) -> KVStore | None:
    """The store a cache's layers are views of, if all are, and current."""
    layers = getattr(cache, "layers", None)
    if not layers or type(layers[0]) is not GrowingLayer:
        return None
    store = layers[0].store
    if store.buf is None or store.layers is not layers:
        return None
    for layer in layers:
        if layer._views is None or layer._views[0] is not layer.keys or layer._views[1] is not layer.values:
            return None
    return store


def _room(length: int) -> int:
    """Positions to allocate for a cache holding `length`: room for the steps to come without a copy."""
    return max(2 * length, length + 64)


def _pad_left(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    """Zeros on the left of `dim` up to `length` (cache keys/values: dim -2; masks: dim 1)."""
    short = length - x.shape[dim]
    if short <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = short
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def check_prompt_tensor(backbone: CausalLMBackbone, prompt: Prompt | None) -> None:
    if prompt is None:
        return
    if prompt.kind == "embeddings" and prompt.embeddings.shape[-1] != backbone.hidden_size:
        raise SoftPromptError(f"prompt width {prompt.embeddings.shape[-1]} does not match backbone "
                              f"{backbone.name!r} hidden size {backbone.hidden_size}")
    if prompt.kind == "kv" and tuple(prompt.kv.shape[i] for i in (0, 2, 4)) != tuple(backbone.kv_layout()):
        L, _, h, _, d = prompt.kv.shape
        theirs = backbone.kv_layout()
        raise SoftPromptError(f"key/value prompt for {L} layers x {h} heads x {d} dims does not fit backbone "
                              f"{backbone.name!r} ({theirs[0]} layers x {theirs[1]} heads x {theirs[2]} dims)")
    if not all(torch.isfinite(t).all() for t in prompt.tensors):
        raise SoftPromptError("the prompt contains NaN/Inf values; it cannot be used")


@torch.no_grad()
def generate(backbone: CausalLMBackbone, prompt: Any = None, inputs: Any = None, *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
             reuse_prompt_cache: bool = True, truncate: bool = False) -> GenerationOutput:
    """Continue each input after its soft prompt.

    `prompt` is one prompt for every row (a method module, PromptFile, typed prompt, (P, H) tensor or None), or a
    list with one prompt (or None) per row: a mixed-task batch, each row attending to its own prompt's cached
    key/values. Prompts of any kind (embeddings, per-layer key/values) mix in one batch.
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                        top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop or ()))
    input_ids, mask = encode(backbone, inputs, chat=chat)
    B, T = input_ids.shape
    per_row = isinstance(prompt, (list, tuple))
    if per_row and len(prompt) != B:
        raise SoftPromptError(f"{len(prompt)} prompts for {B} inputs; give one prompt (or None) per input")
    softs = [prompt_of(p) for p in prompt] if per_row else [prompt_of(prompt)] * B
    for soft in softs:
        check_prompt_tensor(backbone, soft)
    P = max(0 if s is None else s.num_virtual_tokens for s in softs)
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
    if backbone.kind == "seq2seq":  # transformers' own generate on the prompted encoder input
        return _generate_seq2seq(backbone, softs, input_ids, mask, sampling, seed)
    generator = torch.Generator(device=backbone.device).manual_seed(seed) if seed is not None else None
    rows = [Row(sampling, generator) for _ in range(B)]  # one generator: rows draw in turn, seeded as a batch
    dec = Decoding(backbone, softs, input_ids, mask, rows, reuse_prompt_cache=reuse_prompt_cache)
    for _ in dec:
        pass
    return GenerationOutput(texts=[r.text for r in rows], tokens=[r.tokens for r in rows],
                            prefill_logits=dec.prefill_logits.clone(),
                            stats={"batch": B, "input_tokens": T, "virtual_tokens": P, "steps": dec.steps})


def _generate_seq2seq(backbone: Any, softs: list, input_ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling,
                      seed: int | None) -> GenerationOutput:
    """An encoder-decoder: the rows of each prompt in one ``generate`` (each row encoded once, the decoder's cache
    reused); stop strings cut the text."""
    from .joins import get_join

    tokens: list[list[int] | None] = [None] * len(softs)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(softs):
        groups.setdefault(id(s), []).append(i)
    # transformers' generate samples from torch's global generator: seeded here, inside a fork of it, so that the
    # process's own random state is as it was afterwards
    devices = [backbone.device] if backbone.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for rows in groups.values():
            soft = softs[rows[0]]
            join = get_join("embeddings" if soft is None else soft.kind, backbone.kind)
            out = join.generate(backbone, soft, input_ids[rows], mask[rows], sampling.max_new_tokens,
                                sampling.temperature, sampling.top_k, sampling.top_p)
            for i, toks in zip(rows, out, strict=True):
                tokens[i] = toks
    texts, reasons = [], []
    for toks in tokens:
        text = backbone.tokenizer.decode(toks, skip_special_tokens=True) if backbone.tokenizer is not None else ""
        hits = [text.index(x) for x in sampling.stop if x in text]
        texts.append(text[:min(hits)] if hits else text)
        reasons.append("stop" if hits or len(toks) < sampling.max_new_tokens else "length")  # EOS, or a stop string
    return GenerationOutput(texts=texts, tokens=tokens,
                            stats={"batch": len(softs), "input_tokens": input_ids.shape[1], "steps": None,
                                   "finish_reasons": reasons})
