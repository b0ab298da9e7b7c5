"""A decode step in a few operations per layer, for the Llama-shaped decoders it knows.

A decode step runs one new token per row through every layer. Through the model's own forward, a SmolLM2-135M step
at 8 rows cost 90 ms where its weight products took about 48 (profiled: mask building, cache bookkeeping, module
calls; about 60 small operations per layer, several microseconds each). This step does the same arithmetic on the
model's own modules, directly. Per layer: an RMSNorm, one product for q/k/v, the rotary embeddings of q and k in one
go (cos/sin from the model's own rotary module, once per step), the cache layer's own ``update``, attention of the
one query per row as two products on the key/value heads, the output projection, an RMSNorm, one product for
gate/up, SiLU, the down projection. With packed weights (float32 on CPU, fastpath/packed.py) q/k/v and gate/up are
packed side by side. Measured: 77 ms against 90 for the model's forward with packed weights
(benchmarks/generation.py --decode).

Taken only for architectures whose layers are exactly that (``LAYOUTS``), every layer full attention, and only after
a self-check (FastPath.decode_step): a decode step on a probe batch must give the model's own next-token logits.
Otherwise the model's forward runs.
"""

from __future__ import annotations

import torch
from torch import nn

from .packed import PackedWeights, bucket

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
             packed: PackedWeights | None = None) -> torch.Tensor:
        B = ids.shape[0]
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        rows = B if packed is not None and bucket(B) is not None else None

        def product(modules, h):
            if rows is not None:
                return packed.product(modules, h, rows)
            out = [m(h) for m in modules]
            return out[0] if len(out) == 1 else torch.cat(out, dim=-1)

        x = self.base.embed_tokens(ids)  # (B, 1, H)
        cos, sin = self.base.rotary_emb(x, positions)  # (B, 1, d)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, d): over the heads
        x = x.view(B, -1)
        masked = ~mask.bool()[:, None, None, :]  # (B, 1, 1, L): the keys a row does not attend to
        groups = nh // nkv
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = product(self.qkv[i], _rms(x, layer.input_layernorm))
            qk = _rotate(qkv[:, :(nh + nkv) * d].view(B, nh + nkv, 1, d), cos, sin)  # q and k heads in one go
            keys, values = cache.layers[i].update(qk[:, nh:], qkv[:, (nh + nkv) * d:].reshape(B, nkv, 1, d))
            # one query per row: attention as two products on the key/value heads, the query heads of a group
            # side by side (B, kv_heads, group, d)
            scores = torch.matmul(qk[:, :nh].reshape(B, nkv, groups, d), keys.transpose(-1, -2))
            weights = scores.mul_(attn.scaling).masked_fill_(masked, float("-inf")).softmax(-1)
            o = torch.matmul(weights, values)  # (B, kv_heads, group, d)
            x = x + product((attn.o_proj,), o.reshape(B, nh * d))
            gate, up = product(self.gate_up[i], _rms(x, layer.post_attention_layernorm)).chunk(2, dim=-1)
            x = x + product((layer.mlp.down_proj,), nn.functional.silu(gate) * up)
        return product((self.lm_head,), _rms(x, self.base.norm))


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm (Llama's: normalise in float32, back to the input dtype, times the weight), in few ops:
    the row norms of (B, H) rows, then one scale per row."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:  # one fused op: same sums, float32 throughout
        return nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    x32 = x.float()
    scale = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return norm.weight * (x32 * scale).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
