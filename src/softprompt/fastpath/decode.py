"""A decode step, and a prefill, in a few operations per layer, for the Llama-shaped decoders it knows.

A decode step runs one new token per row through every layer. Through the model's own forward, a SmolLM2-135M step
at 8 rows cost 90 ms where its weight products took about 48 (profiled: mask building, cache bookkeeping, module
calls; about 60 small operations per layer, several microseconds each). This step does the same arithmetic on the
model's own modules, directly. Per layer: an RMSNorm (fused, in float32), one product for q/k/v, the rotary
embeddings of q and k in one go (cos/sin from the model's own rotary module, once per step; rotate-half as a roll),
the cache layer's own ``update``, attention of the one query per row on the key/value heads in one fused SDPA call
(an additive mask), the output projection, an RMSNorm, one product for gate/up, SiLU, the down projection. With
packed weights or oneDNN (float32 on CPU, fastpath/packed.py) q/k/v and gate/up are one product each. Measured on
an Intel CPU with AVX-512: 44.8 ms against 55.3 for the model's forward on the same products, at 44-50% of the
weight-streaming floor over three runs (benchmarks/generation.py --decode). On a CPU without AVX-512 the same steps run feature-major (``flipped``: hidden
states (H, N), every product weight @ h, fastpath/packed.py `weight_first`): 75.4 ms against 92.5 with packed
weights in rows there.

``LeanDecode.run`` also prefills a new batch (``Fresh``: left-padded rows after their prompts' cached prefixes), on
its own or beside a running batch's decode step (``Step``): every product runs on the real tokens of both side by
side (no padding; the step's rows and the new rows' tokens in one pass over the weights), attention stays per batch
(the new rows causally on their prefix and own tokens, in one SDPA call on the key/value heads), and the last layer's
MLP and the LM head run on the positions whose logits are kept. Continuous batching uses it so that new requests'
prefill costs one forward less a step (serve/engine.py).

Taken only for architectures whose layers are exactly that (``LAYOUTS``), every layer full attention, and only after
a self-check (FastPath._check_decode): a decode step, a prefill alone and a prefill beside a step, on a probe batch
after a cached prefix, must give the model's own logits and leave the model's own keys in the cache. Otherwise the
model's forward runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .packed import PackedWeights, bucket, padded, weight_first


class Step(NamedTuple):
    """A decode step of a running batch: one new token per row (B, 1), the (B, L) mask over its cache and the new
    token, the (B, 1) positions, the cache (updated)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Any


class Fresh(NamedTuple):
    """A new batch's prefill: (B, T) left-padded ids and their mask, their (B, T) positions, the (B, P + T) mask
    over each row's prompt prefix and its tokens, the cache holding the prefixes (P positions; updated)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    full_mask: torch.Tensor
    cache: Any

# model types whose decoder layer is: x + attn(rmsnorm(x)); x + gated SiLU MLP(rmsnorm(x)); rotary on q and k;
# no q/k norms, no logit post-processing (Llama, SmolLM2, Mistral, Qwen2)
LAYOUTS = ("llama", "mistral", "qwen2")


def unsupported(model) -> str | None:
    """Why this model's decode steps cannot take the lean step, or None."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "model_type", None) not in LAYOUTS:
        return f"model type {getattr(cfg, 'model_type', '?')!r} has no lean decode step"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])) or \
            getattr(cfg, "sliding_window", None) is not None:
        return "sliding-window attention has no lean decode step"
    act = getattr(cfg, "hidden_act", None)
    if act != "silu":
        return f"activation {act!r} has no lean decode step"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "an LM head that is not a Linear has no lean decode step"
    return None


class LeanDecode:
    """``step(ids, mask, positions, cache)`` -> next-token logits (B, V), like the model's forward on one new token
    per row with that cache, mask and positions (the cache updated the same way)."""

    def __init__(self, backbone):
        self.base = backbone.base
        cfg = backbone.model.config.get_text_config()
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = list(self.base.layers)
        self.qkv = [(la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj) for la in self.layers]
        self.gate_up = [(la.mlp.gate_proj, la.mlp.up_proj) for la in self.layers]
        self.lm_head = backbone.model.get_output_embeddings()

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
             packed: PackedWeights | None = None, flipped: bool = False,
             dnnl: PackedWeights | None = None) -> torch.Tensor:
        return self.run(Step(ids, mask, positions, cache), None, packed, dnnl, flipped, head=dnnl)[0]

    def run(self, step: Step | None, fresh: Fresh | None, packed: PackedWeights | None = None,
            dnnl: PackedWeights | None = None, flipped: bool = False, head: PackedWeights | None = None):
        """One forward of a decode `step` (one new token per row of a running batch) and/or a `fresh` batch's
        prefill, their tokens side by side in every product (the fresh rows' real tokens only: no padding).
        Attention stays per batch: each step row on its cache, each fresh row on its own prefix and tokens. Both
        caches are updated. Returns (the step's next-token logits (B, V), the fresh rows' next-token logits
        (B', V)), None for a part not given. `packed`: a step's products through weights packed for its rows'
        bucket; `dnnl`: the layers' products through oneDNN; `head`: the LM head's through oneDNN; `flipped`:
        feature-major, the hidden states (H, N) and every product weight @ h, its output (out, N) as it is (float32
        on CPU, fastpath/packed.py `weight_first`; before the others)."""
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        groups, half = nh // nkv, d // 2
        B = step.ids.shape[0] if step is not None else 0
        rows = B if packed is not None and fresh is None and bucket(B) is not None else None

        def product(modules, h, layer=True):
            if flipped:
                return weight_first(modules, h)
            if rows is not None:
                return packed.product(modules, h, rows)
            through = dnnl if layer else head
            if through is not None:
                return through.dnnl(modules, h)
            out = [m(h) for m in modules]
            return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

        def tokens(h):  # (N, F): a view
            return h.t() if flipped else h

        def rms(h, norm):
            return _rms_columns(h, norm) if flipped else _rms(h, norm)

        def rotary(like, positions):  # cos and sin over the heads (dim 1), rotate_half's sign folded into sin
            cos, sin = self.base.rotary_emb(like, positions)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

        parts = []
        if step is not None:
            x = self.base.embed_tokens(step.ids)  # (B, 1, H)
            cos, sin = rotary(x, step.positions)  # (B, 1, 1, d)
            parts.append(x.view(B, -1))
            # (B, 1, 1, L): -inf on the keys a row does not attend to (an additive mask: SDPA's fastest form here)
            bias = torch.zeros(B, 1, 1, step.mask.shape[-1], dtype=x.dtype, device=x.device).masked_fill_(
                ~step.mask.bool()[:, None, None, :], float("-inf"))
        if fresh is not None:
            Bf, T = fresh.ids.shape
            flat = fresh.mask.reshape(-1).bool()
            real = flat.nonzero().squeeze(1)  # the real tokens' places in the (Bf * T) padded layout
            x = self.base.embed_tokens(fresh.ids.reshape(-1).index_select(0, real))  # (R, H)
            parts.append(x)
            f_cos, f_sin = rotary(x, fresh.positions)  # (Bf, 1, T, d)
            # each row's last token, counted among the real tokens (the rows are left-padded)
            last = B + flat.long().cumsum(0).view(Bf, T)[:, -1] - 1
            P = fresh.full_mask.shape[1] - T
            allowed = fresh.full_mask.bool()[:, None, None, :].expand(Bf, 1, T, P + T).clone()
            allowed[..., P:] &= torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            allowed |= ~fresh.mask.bool()[:, None, :, None]  # a padding query attends anywhere (never read)
            f_bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed,
                                                                                             float("-inf"))
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        N = x.shape[0]
        if flipped:  # (H, N') with zero columns up to the count the products run fastest at
            rows_first, x = x, x.new_zeros(x.shape[1], padded(N))
            x[:, :N] = rows_first.t()
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = tokens(product(self.qkv[i], rms(x, layer.input_layernorm)))
            outs = []
            if step is not None:
                s = qkv[:B]
                qk = _rotate(s[:, :(nh + nkv) * d].view(B, nh + nkv, 1, d), cos, sin)  # q and k heads in one go
                keys, values = step.cache.layers[i].update(qk[:, nh:], s[:, (nh + nkv) * d:].reshape(B, nkv, 1, d))
                # one query per row, on the key/value heads: the query heads of a group side by side (B, kv_heads,
                # group, d), in one fused attention call (52 us against 133 for products + mask + softmax, at 8
                # rows)
                o = nn.functional.scaled_dot_product_attention(qk[:, :nh].reshape(B, nkv, groups, d), keys, values,
                                                               attn_mask=bias, scale=attn.scaling)
                outs.append(o.reshape(B, nh * d))
            if fresh is not None:
                f = qkv.new_zeros(Bf * T, qkv.shape[1]).index_copy_(0, real, qkv[B:N])
                f = f.view(Bf, T, nh + 2 * nkv, d).transpose(1, 2)  # (Bf, heads, T, d), padding zeros
                qk = _rotate(f[:, :nh + nkv], f_cos, f_sin)
                keys, values = fresh.cache.layers[i].update(qk[:, nh:], f[:, nh + nkv:])
                o = nn.functional.scaled_dot_product_attention(qk[:, :nh], keys, values, attn_mask=f_bias,
                                                               scale=attn.scaling, enable_gqa=groups > 1)
                outs.append(o.transpose(1, 2).reshape(Bf * T, nh * d).index_select(0, real))
            if flipped:
                o = x.new_zeros(x.shape[1], nh * d)  # (N', F): zero rows past the real ones
                o[:N] = torch.cat(outs) if len(outs) > 1 else outs[0]
                x = x + product((attn.o_proj,), o.t())
            else:
                x = x + product((attn.o_proj,), torch.cat(outs) if len(outs) > 1 else outs[0])
            if fresh is not None and i == len(self.layers) - 1:  # the last MLP on the positions with logits only
                x = x.index_select(1 if flipped else 0, torch.cat([torch.arange(B, device=x.device), last]))
            gate, up = product(self.gate_up[i], rms(x, layer.post_attention_layernorm)).chunk(2, dim=0 if flipped else -1)
            x = x + product((layer.mlp.down_proj,), nn.functional.silu(gate) * up)
        logits = product((self.lm_head,), rms(x, self.base.norm), layer=False)
        if flipped:
            logits = logits.t()[:B + (Bf if fresh is not None else 0)].contiguous()
        return (logits[:B] if step is not None else None), (logits[B:] if fresh is not None else None)


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm (Llama's: normalise in float32, back to the input dtype, times the weight), in few ops:
    the row norms of (B, H) rows, then one scale per row."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:  # one fused op: same sums, float32 throughout
        return nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    x32 = x.float()
    scale = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return norm.weight * (x32 * scale).to(x.dtype)


def _rms_columns(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`_rms` on feature-major float32 hidden states (H, N): the norm of each column."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    scale = h.square().mean(0, keepdim=True).add_(eps).rsqrt_()
    return h * scale * norm.weight[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings: x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is x rolled by half
    with the sign folded into sin (the same products, three operations fewer)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
