"""PromptedModel: a frozen backbone plus a method, joined. Its parameters are the method's, nothing else."""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import Backbone
from .errors import SoftPromptError
from .join import (
    check_mask,
    expand_kv,
    input_positions,
    prefix_join,
    run_prompt,
    strip_virtual,
    truncate_to_fit,
)


class PromptedModel(nn.Module):
    """Runs ``backbone(prefix_join(method(), embed(input_ids)))`` and returns outputs aligned with input_ids.

    The backbone is held as a plain attribute, not a submodule: ``parameters()``, ``state_dict()``, ``train()``,
    ``.to()`` and DDP see the prompt only, and the frozen model stays in eval mode while the prompt trains.
    """

    def __init__(self, backbone: Backbone, method: nn.Module, prompt_cache: bool = True,
                 activation_checkpointing: bool = False):
        super().__init__()
        if method.hidden_size != backbone.hidden_size:
            raise SoftPromptError(
                f"prompt width {method.hidden_size} does not match backbone {backbone.name!r} hidden size "
                f"{backbone.hidden_size}; create the prompt for this backbone")
        self.backbone = backbone
        self.method = method
        # Causal LMs: run the prompt once per batch (batch 1) and give its key/values to every row as a cache,
        # instead of computing the same P positions B times. Same loss and gradient as the plain prefix join.
        self.prompt_cache = prompt_cache and backbone.kind == "causal_lm"
        # hidden_states() while training: keep only each decoder layer's input and recompute the layer in backward
        self.activation_checkpointing = activation_checkpointing

    @property
    def num_virtual_tokens(self) -> int:
        return self.method.num_virtual_tokens

    def check_length(self, num_tokens: int, extra: int = 0) -> None:
        limit = self.backbone.max_positions
        total = self.num_virtual_tokens + num_tokens + extra
        if limit is not None and total > limit:
            more = f" + {extra} new" if extra else ""
            raise SoftPromptError(
                f"input of {num_tokens} tokens{more} + {self.num_virtual_tokens} virtual tokens = {total} exceeds the "
                f"model's {limit} positions; shorten the input or pass truncate=True")

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                truncate: bool = False, **kwargs: Any):
        if (input_ids is None) == (inputs_embeds is None):
            raise SoftPromptError("pass exactly one of input_ids or inputs_embeds")
        T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if T == 0:
            raise SoftPromptError("empty input: every row needs at least one token")
        limit = self.backbone.max_positions
        if truncate and limit is not None and self.num_virtual_tokens + T > limit:
            if input_ids is None:
                raise SoftPromptError("truncate=True needs input_ids (embeddings cannot be re-padded)")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            input_ids, attention_mask, labels = truncate_to_fit(
                input_ids, attention_mask, limit - self.num_virtual_tokens, labels)
            T = input_ids.shape[1]
        self.check_length(T)
        if inputs_embeds is None:
            inputs_embeds = self.backbone.embed(input_ids)
        soft = self.method()  # (P, H)
        if self.prompt_cache and soft.shape[0] > 0:
            return self._forward_with_prompt_cache(soft, inputs_embeds, attention_mask, labels, **kwargs)
        joined = prefix_join(soft, inputs_embeds, attention_mask, labels)
        if self.backbone.kind == "module":
            out = self.backbone.forward(joined.inputs_embeds)
        else:
            out = self.backbone.forward(joined.inputs_embeds, attention_mask=joined.attention_mask,
                                        position_ids=joined.position_ids, labels=joined.labels, **kwargs)
        return strip_virtual(out, self.num_virtual_tokens, joined.inputs_embeds.shape[1])

    # --- the lean path: hidden states, and the LM head only where a loss or a score needs it ----------------
    @property
    def lean(self) -> bool:
        """Whether final hidden states and a row-sliced LM head are available (a causal LM whose logits are
        lm_head(last_hidden_state), nothing more; other heads go through forward())."""
        bb = self.backbone
        if bb.kind != "causal_lm":
            return False
        cfg = bb.model.config.get_text_config()
        # heads that scale or cap logits after lm_head: keep them on the full forward
        return not any(getattr(cfg, k, None) for k in _LOGIT_POSTPROCESSING)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states (after the last norm), aligned with input_ids: (B, T, H), and the last virtual
        position's (1, H) (None without a prompt), which predicts each row's first token. No logits at all: apply
        `head` to the positions that need them.

        last_only=True (classification: only the answer column is scored): hidden is (B, 1, H), the last column
        only, and less is computed for it: the last decoder layer's MLP runs at that column only, and with a prompt
        cache the first tokens that every left-padded row shares (a template's start, "Review:") join the prompt's
        batch-1 run instead of being computed B times. `last` is then not the prompt's last position."""
        T = input_ids.shape[1]
        if T == 0:
            raise SoftPromptError("empty input: every row needs at least one token")
        self.check_length(T)
        bb = self.backbone
        base = bb.model.base_model
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        check_mask(attention_mask)
        embeds = bb.embed(input_ids)  # (B, T, H)
        soft = self.method()  # (P, H)
        P = soft.shape[0]

        cols = slice(-1, None) if last_only else slice(None)

        casts = _weight_casts(bb, base)  # resolved once per call; kernels() only switches them on for this thread

        def kernels(mask, plan=None):  # around the rows' forward, and again around each recompute (checkpointing)
            stack = contextlib.ExitStack()
            stack.enter_context(_attention_backend(bb, embeds))
            stack.enter_context(_thread_state(casts=casts, mlp=plan or _mlp_plan(base, mask, last_only)))
            return stack

        if P == 0:
            with kernels(attention_mask):
                out = base(inputs_embeds=embeds, attention_mask=attention_mask,
                           position_ids=input_positions(attention_mask, 0))
            return out.last_hidden_state[:, cols], None
        if not self.prompt_cache:
            j = prefix_join(soft, embeds, attention_mask)
            with kernels(j.attention_mask):
                out = base(inputs_embeds=j.inputs_embeds, attention_mask=j.attention_mask, position_ids=j.position_ids)
            h = out.last_hidden_state  # (B, P+T, H)
            return h[:, P:][:, cols], h[:1, P - 1]
        c = _shared_prefix(input_ids, attention_mask) if last_only and SPEEDUPS["shared_prefix"] else 0
        if c:  # rows' common first c tokens: computed once after the prompt; each row keeps what follows them
            start = T - int(attention_mask[0].sum())
            soft = torch.cat([soft.to(embeds.dtype), embeds[0, start:start + c]])  # (P + c, H)
            attention_mask = attention_mask[:, :T - c]  # (B, T - c): each row c real tokens shorter
            embeds = torch.where(attention_mask[..., None].bool(), embeds[:, c:], embeds[:, :T - c])
            P += c
        with _attention_backend(bb, embeds), _thread_state(casts=casts):
            layers, last = self._prompt_states(soft)
        full_mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device),
                               attention_mask], dim=1)
        cache = bb.new_cache(expand_kv(layers, B))
        plan = _mlp_plan(base, attention_mask, last_only)
        checkpointing = contextlib.nullcontext()
        if self.activation_checkpointing and torch.is_grad_enabled() and soft.requires_grad:
            checkpointing = _checkpointed_layers(base, cache, lambda: kernels(attention_mask, plan))
        with kernels(attention_mask, plan), checkpointing:
            out = base(inputs_embeds=embeds, attention_mask=full_mask,
                       position_ids=input_positions(attention_mask, P), cache=cache, use_cache=True)
        return out.last_hidden_state[:, cols], last

    def _prompt_states(self, soft: torch.Tensor):
        """Per-layer prompt (keys, values), each (1, heads, P, d), and the last prompt position's hidden state
        (1, H): with grad while training; without, computed once per prompt content (and autocast state)."""
        bb = self.backbone
        if torch.is_grad_enabled() and soft.requires_grad:
            return _run_prompt_hidden(bb, soft)
        from .generation import content_hash

        autocast = torch.get_autocast_dtype(bb.device.type) if torch.is_autocast_enabled(bb.device.type) else None
        key = (content_hash(soft), bb.dtype, str(bb.device), autocast)
        store = bb.__dict__.setdefault("_prompt_states", {})
        if key not in store:
            with torch.no_grad():
                value = _run_prompt_hidden(bb, soft.detach())
            store.clear()  # one prompt at a time is what evaluation needs (generation keeps its own store)
            store[key] = value
        return store[key]

    def head(self, hidden: torch.Tensor, rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The LM head on hidden states (..., H): logits over the vocabulary, or over `rows` only (..., len(rows))
        when only some tokens' logits are needed (a verbalizer's label words)."""
        lin = self.backbone.model.get_output_embeddings()
        w, b = lin.weight, getattr(lin, "bias", None)
        if rows is not None:
            rows = torch.as_tensor(rows, device=w.device)
            w, b = w[rows], None if b is None else b[rows]
        return nn.functional.linear(hidden, w, b)

    def target_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    reduction: str = "sum") -> torch.Tensor:
        """Causal LM cross-entropy of labels (B, T) (-100: no loss) with full-vocabulary logits at the target
        positions only, never at every position. Equal to forward(..., labels=labels).loss with reduction="mean"."""
        if not self.lean:
            loss = self(input_ids, attention_mask, labels=labels).loss  # mean over the counted targets
            counted = labels != -100
            if self.num_virtual_tokens == 0:
                counted = counted[:, 1:]  # no prompt: nothing predicts the first token
            return loss * counted.sum() if reduction == "sum" else loss
        hidden, last = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        B = hidden.shape[0]
        # the hidden state at position t predicts the token at t + 1; the last virtual position predicts token 0
        pred = torch.cat([hidden.new_zeros(B, 1, hidden.shape[-1]) if last is None
                          else last.to(hidden.dtype).unsqueeze(0).expand(B, 1, -1), hidden[:, :-1]], dim=1)
        where = labels != -100  # (B, T)
        if last is None:
            where[:, 0] = False  # no prompt: nothing predicts the first token
        logits = self.head(pred[where]).float()  # (N, V), N target tokens
        return nn.functional.cross_entropy(logits, labels[where], reduction=reduction)

    def _forward_with_prompt_cache(self, soft, inputs_embeds, attention_mask, labels, **kwargs):
        from .generation import prompt_kv

        bb = self.backbone
        B, T, _ = inputs_embeds.shape
        P = soft.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
        check_mask(attention_mask)
        if torch.is_grad_enabled() and soft.requires_grad:
            layers, last = run_prompt(bb, soft)  # (1, heads, P, d) per layer, with grad
        else:
            layers, last = prompt_kv(bb, soft)  # computed once per prompt content, reused
        full_mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device),
                               attention_mask], dim=1)
        out = bb.forward(inputs_embeds, attention_mask=full_mask, position_ids=input_positions(attention_mask, P),
                         cache=bb.new_cache(expand_kv(layers, B)), use_cache=True, **kwargs)
        if labels is not None:  # causal LM loss, the last virtual position predicting the first token too
            logits = torch.cat([last.unsqueeze(1).expand(B, 1, -1), out.logits[:, :-1]], dim=1).float()
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=-100)
        return out


# config keys of heads whose logits are not plain lm_head(hidden): Gemma 2/3 soft-capping, Cohere and Granite scales
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _run_prompt_hidden(backbone: Backbone, soft: torch.Tensor):
    """The prompt alone (batch 1, positions 0..P-1) through the base model: per-layer (keys, values), each
    (1, heads, P, d), and the last position's final hidden state (1, H). No LM head."""
    P = soft.shape[0]
    dev = backbone.device
    out = backbone.model.base_model(inputs_embeds=soft.to(device=dev, dtype=backbone.dtype).unsqueeze(0),
                                    attention_mask=torch.ones(1, P, dtype=torch.long, device=dev),
                                    position_ids=torch.arange(P, device=dev).unsqueeze(0),
                                    cache=backbone.new_cache(), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers], out.last_hidden_state[:, -1]


def _prefix_update(self, key_states, value_states, *args, **kwargs):
    """A cache layer that holds the prompt's key/values and never grows: (prompt ++ new) is returned, not
    stored, so a checkpointed layer recomputed in backward sees the same cache as in forward."""
    return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


@contextlib.contextmanager
def _checkpointed_layers(base: nn.Module, cache, backend=contextlib.nullcontext):
    """Activation checkpointing for one forward: each decoder layer keeps only its input and is recomputed in
    backward (torch.utils.checkpoint, non-reentrant), the prompt cache made non-growing for the recompute. The
    layers' forward is patched on the instances for the duration of the call and restored after."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import DynamicLayer

    n = base.config.get_text_config().num_hidden_layers
    stacks = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks or not all(type(layer) is DynamicLayer for layer in cache.layers):
        yield  # an unknown layout or a sliding-window cache: no checkpointing, same results
        return
    for layer in cache.layers:
        layer.update = partial(_prefix_update, layer)
    patched = []
    def run(forward, *args, **kwargs):  # the recompute in backward picks the forward's attention kernel again
        with backend():
            return forward(*args, **kwargs)

    for layer in stacks[0]:
        layer.forward = partial(checkpoint, partial(run, layer.forward), use_reentrant=False)
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def _shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
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


# The frozen-backbone speed-ups below, each switchable (benchmarks measure before/after in one process; tests
# compare every combination against the plain path). All on by default; what each buys is in SPEED.md.
SPEEDUPS = {
    "last_column_mlp": True,  # classification: the last decoder layer's MLP at the answer column only
    "unpadded_mlp": True,  # every decoder MLP runs on the real tokens only, never on padding
    "gated_mlp_memory": True,  # training: a gated MLP keeps its two projections for backward, not three tensors
    "shared_prefix": True,  # classification: the rows' common first tokens run once, with the prompt
    "cached_weight_casts": True,  # bf16/fp16 autocast: the frozen weights cast once, not at every forward
    "sdpa_gqa": True,  # CPU: SDPA on the key/value heads (enable_gqa), not on repeated copies of them
}

# What this thread's forward asks of the patched modules: `mlp` (an _MLPPlan), `casts` (a _WeightCasts), `gqa`.
# Modules get a bound-method wrapper once (a deepcopy rebinds it to the copy) that consults this state, so a forward
# of the same backbone in another thread (a server) runs the plain modules.
_THREAD = threading.local()


@contextlib.contextmanager
def _thread_state(**values):
    """Set this thread's state for the block, then restore what was there."""
    before = {k: getattr(_THREAD, k, None) for k in values}
    for k, v in values.items():
        setattr(_THREAD, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(_THREAD, k, v)


def _install(modules: list[nn.Module], wrapper) -> bool:
    """Give each module the `wrapper` forward (a bound method) unless it has it; False, changing nothing, where one
    already carries someone else's patch."""
    if any(vars(m).get("forward") is not None and getattr(vars(m)["forward"], "__func__", None) is not wrapper
           for m in modules):
        return False
    for m in modules:
        if vars(m).get("forward") is None:
            m.forward = types.MethodType(wrapper, m)
    return True


@dataclass
class _MLPPlan:
    last: nn.Module | None  # the MLP that computes the last column only (classification), or None
    real: torch.Tensor | None  # flat indices of the real (non-padding) positions of the (B, T) rows, or None
    shape: tuple[int, int]  # (B, T) of the rows' forward; other inputs (the prompt's batch-1 run) run plain
    gated: bool  # training: keep the gate's and up projections' outputs only, recompute the activation


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up, keeping only gate and up for backward (the activation is recomputed there): one
    (tokens, intermediate) tensor less per layer than autograd's silu + mul, same values and gradients."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        if _is_silu(ctx.act):  # SwiGLU (Llama, Qwen, SmolLM): fused kernels
            grad_up = grad * nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
            return grad_gate, grad_up, None
        with torch.enable_grad():
            g = gate.detach().requires_grad_(gate.requires_grad)
            a = ctx.act(g)
        grad_up = grad * a.detach() if ctx.needs_input_grad[1] else None
        grad_gate = torch.autograd.grad(a, g, grad * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None


class _Scatter(torch.autograd.Function):
    """Rows (N, H) into zeros (n, H) at `index`; backward gathers. Keeps only the index (index_copy keeps the rows)."""

    @staticmethod
    def forward(ctx, rows, index, n):
        ctx.save_for_backward(index)
        return rows.new_zeros(n, rows.shape[-1]).index_copy_(0, index, rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def _is_silu(act: nn.Module) -> bool:
    """torch's nn.SiLU or transformers' SiLUActivation (not a subclass of it)."""
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _gated_parts(mlp: nn.Module):
    """(gate, up, down, act) of a Llama-style gated MLP (Llama, Qwen2/3, Mistral, Gemma, SmolLM), else None."""
    parts = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    return parts if all(isinstance(m, nn.Module) for m in parts) else None


def _planned_rows(run, x: torch.Tensor, plan: _MLPPlan, last: bool) -> torch.Tensor:
    """A position-wise `run` (B, T, H) -> (B, T, H') on the positions the plan needs: the last column only, or the
    real tokens only (padding positions get zeros: no real position attends to them), or all."""
    B, T, H = x.shape
    if last:  # the answer column only; nothing after the last MLP mixes positions
        y = run(x[:, -1:])  # (B, 1, H')
        return torch.cat([y.new_zeros(B, T - 1, y.shape[-1]), y], dim=1)
    if plan.real is None:
        return run(x)
    y = run(x.reshape(B * T, H).index_select(0, plan.real))  # (N, H') real tokens only
    return _Scatter.apply(y, plan.real, B * T).view(B, T, -1)


def _planned_mlp(mlp: nn.Module, x: torch.Tensor, plan: _MLPPlan) -> torch.Tensor:
    parts = _gated_parts(mlp) if plan.gated and torch.is_grad_enabled() else None
    if parts is None:
        run = type(mlp).forward.__get__(mlp)
    else:
        gate, up, down, act = parts

        def run(h):
            return down(_GatedActivation.apply(gate(h), up(h), act))

    return _planned_rows(run, x, plan, mlp is plan.last)


def _switchable_mlp_forward(self, x, *args, **kwargs):
    plan = getattr(_THREAD, "mlp", None)
    if plan is not None and not args and not kwargs and x.dim() == 3 and tuple(x.shape[:2]) == plan.shape:
        return _planned_mlp(self, x, plan)
    return type(self).forward.__get__(self)(x, *args, **kwargs)


def _decoder_mlps(base: nn.Module) -> list[nn.Module]:
    n = base.config.get_text_config().num_hidden_layers
    stacks = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n]
    mlps = [getattr(layer, "mlp", None) for layer in stacks[0]] if stacks else []
    return mlps if mlps and all(isinstance(m, nn.Module) for m in mlps) else []


def _mlp_plan(base: nn.Module, attention_mask: torch.Tensor, last_only: bool = False) -> _MLPPlan | None:
    """The plan the decoder MLPs follow while the rows' forward runs (set with _thread_state(mlp=...)): with
    padding, each MLP runs on the real tokens only (an MLP acts on each position alone); with last_only
    (classification), the last layer's MLP runs on the answer column only; while training, a gated MLP keeps two
    tensors for backward instead of three. Same values and gradients at every real position. None (nothing
    changes) for an unknown layout or an MLP someone else patched."""
    mlps = _decoder_mlps(base)
    if not mlps or not _install(mlps, _switchable_mlp_forward):
        return None
    real = None
    if SPEEDUPS["unpadded_mlp"] and not bool(attention_mask.all()):
        real = attention_mask.reshape(-1).nonzero().squeeze(1)
    return _MLPPlan(last=mlps[-1] if last_only and SPEEDUPS["last_column_mlp"] else None, real=real,
                    shape=tuple(attention_mask.shape), gated=SPEEDUPS["gated_mlp_memory"])


def _switchable_linear_forward(self, x):
    casts = getattr(_THREAD, "casts", None)
    if casts is not None:
        return nn.functional.linear(x, casts.weight(self), self.bias)
    return type(self).forward.__get__(self)(x)


class _WeightCasts:
    """Low-precision copies of a frozen backbone's Linear weights, made once and reused while the weights are
    unchanged. Autocast casts a weight that does not require grad again at every use and keeps each copy for
    backward: a training step (the prompt's run, then the rows') held two bf16 copies of the backbone, and scoring
    cast it again for every batch. Same numbers: autocast casts these weights to the same dtype with the same
    rounding."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.store: dict[nn.Module, tuple[tuple, torch.Tensor]] = {}

    def weight(self, linear: nn.Module) -> torch.Tensor:
        w = linear.weight
        stamp = (w.data_ptr(), w.device, w._version)  # moved, replaced or changed in place: cast again
        got = self.store.get(linear)
        if got is None or got[0] != stamp:
            got = (stamp, w.detach().to(self.dtype))
            self.store[linear] = got
        return got[1]


def _weight_casts(backbone: Backbone, base: nn.Module) -> _WeightCasts | None:
    """Under bf16/fp16 autocast: the backbone's cache of low-precision copies of `base`'s frozen float32 Linear
    weights (one per autocast dtype, kept on the backbone; `backbone.clear_caches()` drops them), which this
    thread's forwards use while _thread_state(casts=...) holds it. None otherwise (nothing changes)."""
    dev = backbone.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if not SPEEDUPS["cached_weight_casts"] or dtype not in (torch.bfloat16, torch.float16):
        return None
    linears = [m for m in base.modules() if type(m) is nn.Linear]
    if (not linears or any(m.weight.dtype != torch.float32 or m.weight.requires_grad for m in linears)
            or not _install(linears, _switchable_linear_forward)):
        return None
    casts = backbone.__dict__.setdefault("_weight_casts", {})
    if dtype not in casts:
        casts[dtype] = _WeightCasts(dtype)
    return casts[dtype]


@contextlib.contextmanager
def _attention_backend(backbone: Backbone, embeds: torch.Tensor):
    """Attention kernels while a forward runs in this thread, on CPU:
    - bf16 training: SDPA's math kernel; torch 2.13's CPU flash-attention backward is ~3x slower than the math one
      at these shapes in bf16 (measured: 10.8 ms vs 6.1 ms per layer, batch 8 x 72 tokens). Process-wide switch.
    - grouped-query attention (SmolLM2: 9 query heads on 3 key/value heads): SDPA attends on the key/value heads
      themselves (enable_gqa) instead of on copies repeated to every query head, which transformers makes whenever
      a mask is passed; training keeps 1/3 of the keys and values for backward. Thread-local."""
    with contextlib.ExitStack() as stack:
        if backbone.device.type == "cpu":
            bf16 = embeds.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                                       and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            if bf16 and torch.is_grad_enabled():
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            if SPEEDUPS["sdpa_gqa"] and _install_gqa_switch():
                stack.enter_context(_thread_state(gqa=True))
        yield


@functools.cache
def _install_gqa_switch() -> bool:
    """Wrap transformers' choice of SDPA's enable_gqa once, so that it also says yes where this thread asks for it
    (torch >= 2.5 has enable_gqa). False where transformers has no such choice (nothing changes)."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return False
    choice = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if choice is None or tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        return False
    if not getattr(choice, "_softprompt", False):
        def use_gqa_in_sdpa(attention_mask, key, value, _choice=choice):
            return getattr(_THREAD, "gqa", False) or _choice(attention_mask, key, value)

        use_gqa_in_sdpa._softprompt = True
        sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa
    return True
