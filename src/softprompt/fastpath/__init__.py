"""The fast path: speed-ups for a frozen backbone, installed per architecture, reversible, self-checked.

``FastPath(backbone, config).install()`` does, for a model type in ``ARCHITECTURES``:

- gives each decoder MLP and each ``nn.Linear`` of the decoder a forward that follows the *plan of the current
  forward* (unpadded / last-column MLPs, a lean gated MLP while training, bf16 weights cast once) and otherwise
  runs the module's own forward: a forward outside ``engaged()`` (another thread, the user's own call, a server)
  runs the plain modules;
- registers an attention function through transformers' ``AttentionInterface`` (its extension point; nothing of
  transformers is replaced) and switches the model to it: it delegates to transformers' SDPA, except inside an
  engaged forward on CPU, where it attends on the key/value heads (GQA, no repeated copies) and, for bf16
  training, picks SDPA's math kernel per call;
- checks itself: the final hidden states through ``head()`` must equal the model's own logits on a probe batch
  (logit soft-capping and scaling included), and an engaged forward must equal the plain one. If not, it
  uninstalls and the plain path runs, with one line saying why.

``uninstall()`` restores every module and the attention implementation. The plan of a forward lives in a context
variable, so it belongs to the thread (and task) that runs that forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ARCHITECTURES, Architecture, architecture
from .casts import WeightCasts
from .checkpointing import checkpointed_layers, decoder_layers
from .config import SWITCHES, FastPathConfig
from .decode import Fresh, LeanDecode, Step
from .decode import unsupported as decode_unsupported
from .mlp import MLPPlan, gated_parts, planned_mlp
from .packed import AVAILABLE as PACKING_AVAILABLE
from .packed import BUCKETS as PACKING_BUCKETS
from .packed import DNNL_AVAILABLE, PackedWeights, bucket
from .packed import MAX_BYTES as PACKING_MAX_BYTES

__all__ = ["ARCHITECTURES", "SWITCHES", "Architecture", "FastPath", "FastPathConfig", "checkpointed_layers"]

ATTENTION = "softprompt_sdpa"  # our name in transformers' AttentionInterface


@dataclass
class Engaged:
    """What the current forward asks of the installed modules."""

    fastpath: FastPath
    mlp: MLPPlan | None = None
    casts: WeightCasts | None = None
    gqa: bool = False
    math: bool = False
    packed: PackedWeights | None = None  # float32 CPU inference: decode-shaped products through packed weights
    dnnl: PackedWeights | None = None  # float32 CPU inference: decode-shaped products through oneDNN (before packed)


_ACTIVE: contextvars.ContextVar[Engaged | None] = contextvars.ContextVar("softprompt_fastpath", default=None)
_OWNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # installed module -> its FastPath


def _mlp_forward(self, x, *args, **kwargs):
    plan = _ACTIVE.get()
    fp = _OWNER.get(self)
    if (plan is not None and plan.mlp is not None and fp is plan.fastpath and not args and not kwargs
            and x.dim() == 3 and tuple(x.shape[:2]) == plan.mlp.shape):
        return planned_mlp(self, x, plan.mlp, fp.gated.get(self))
    return type(self).forward(self, x, *args, **kwargs)


def _linear_forward(self, x):
    plan = _ACTIVE.get()
    if plan is not None and _OWNER.get(self) is plan.fastpath:
        # as one (N, in) x (in, out) product: on a (B, 1, in) slice (the LM head on a prefill's last positions,
        # logits_to_keep=1) matmul would expand the weight to (B, in, out) for a bmm, which bf16 on a CPU copies
        # whole (45 ms a row for SmolLM2's 49,152 x 576 head)
        flat = x.reshape(-1, x.shape[-1])
        if plan.casts is not None:
            out = nn.functional.linear(flat, plan.casts.weight(self), self.bias)
        elif plan.dnnl is not None and x.dtype == torch.float32 and flat.shape[0] == x.shape[0]:
            out = plan.dnnl.dnnl((self,), flat)  # one position per row: a decode step
        elif plan.packed is not None and x.dtype == torch.float32 and flat.shape[0] == x.shape[0] \
                and bucket(x.shape[0]) is not None:  # one position per row: a decode step
            out = plan.packed.linear(self, flat, x.shape[0])
        else:
            out = type(self).forward(self, flat)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return type(self).forward(self, x)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except inside an engaged forward on CPU: key/value heads attended directly
    (enable_gqa) and, for bf16 training, the math kernel in float32."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    plan = _ACTIVE.get()
    if (plan is None or not (plan.gqa or plan.math) or (attention_mask is None and not plan.math)
            or query.device.type != "cpu" or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = groups > 1 and plan.gqa
    if groups > 1 and not gqa:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if plan.math:
        # the math op adds its mask to the scores (SDPA's front end converts a boolean mask first): masked = the
        # dtype's lowest value, finite, so that a row with nothing to attend to (padding) stays finite
        mask, causal = attention_mask, False
        if mask is None:  # no padding (a prompt's own run): transformers left the causal mask out (then q = k long)
            causal = query.shape[2] > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        elif mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(query.dtype).min)
        # the math kernel there too: SDPA's default (flash) kernel costs ~20x more at a prompt's few tokens in bf16
        out = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, mask, dropout, causal,
                                                                 scale=scaling, enable_gqa=gqa)[0]
    else:
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                         dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA takes


_GQA_OK = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


class FastPath:
    """The speed-ups of one backbone. ``lean`` says whether hidden states + ``head()`` may stand in for logits."""

    def __init__(self, backbone, config: FastPathConfig | None = None):
        self.backbone = backbone
        self.config = config or FastPathConfig()
        self.arch: Architecture | None = architecture(backbone.model)
        self.installed = False
        self.head_ok = False
        self.notice: str | None = None  # why the plain path runs, when it does
        self.gated: dict[nn.Module, tuple | None] = {}  # decoder MLP -> its gated parts (None: not gated)
        self.mlps: list[nn.Module] = []
        self.linears: list[nn.Module] = []
        self._attention_before: str | None = None
        self.casts: dict[torch.dtype, WeightCasts] = {}  # autocast dtype -> the weights cast once
        self.packed = PackedWeights()
        self._decode: LeanDecode | bool | None = None  # the lean decode step: None before its self-check

    # --- install / uninstall ---------------------------------------------------------------------------------
    def install(self) -> bool:
        """Install for a known architecture and self-check; True when the fast path is on."""
        if self.installed:
            return True
        model = self.backbone.model
        model_type = getattr(model.config.get_text_config(), "model_type", "?")
        if not self.config.enabled:
            return False
        if self.arch is None:
            self.notice = f"model type {model_type!r} is not in the fast path's table; running the plain path"
            return False
        base = self.backbone.base
        layers = decoder_layers(base)
        mlps = [getattr(layer, "mlp", None) for layer in layers] if layers is not None else []
        if not mlps or not all(isinstance(m, nn.Module) for m in mlps):
            self.notice = f"model type {model_type!r}: no decoder MLPs where expected; running the plain path"
            return False
        linears = [m for m in base.modules() if type(m) is nn.Linear]
        head = model.get_output_embeddings()
        if type(head) is nn.Linear and head not in linears:
            linears.append(head)  # a decode step's largest product
        patched = [m for m in mlps + linears if "forward" in vars(m) and _OWNER.get(m) is None
                   and getattr(vars(m)["forward"], "__func__", None) not in (_mlp_forward, _linear_forward)]
        if patched:
            self.notice = (f"{len(patched)} module(s) of {model_type!r} carry another forward patch; running the "
                           "plain path")
            return False
        for m in mlps:
            m.forward = types.MethodType(_mlp_forward, m)
            _OWNER[m] = self
            self.gated[m] = gated_parts(m) if self.arch.gated_mlp else None
        for m in linears:
            m.forward = types.MethodType(_linear_forward, m)
            _OWNER[m] = self
        self.mlps, self.linears = mlps, linears
        impl = getattr(model.config, "_attn_implementation", None)
        if impl in ("sdpa", ATTENTION):  # ATTENTION already: a deep copy of an installed model
            _register_attention()
            self._attention_before = "sdpa"
            model.set_attn_implementation(ATTENTION)
        self.installed = True
        why = self._self_check()
        if why:
            self.uninstall()
            self.notice = f"model type {model_type!r}: {why}; running the plain path"
            return False
        return True

    def uninstall(self) -> None:
        """Every module back to its own forward, the attention implementation back to what it was."""
        for m in self.mlps + self.linears:
            if _OWNER.get(m) is self:
                del _OWNER[m]
                vars(m).pop("forward", None)
        if self._attention_before is not None:
            self.backbone.model.set_attn_implementation(self._attention_before)
            self._attention_before = None
        self.mlps, self.linears, self.gated = [], [], {}
        self._decode = None
        self.casts.clear()
        self.packed.clear()
        self.installed = self.head_ok = False

    def _self_check(self) -> str | None:
        bb = self.backbone
        dev = bb.device
        ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]], device=dev) % bb.config.vocab_size
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        real = mask.bool()
        with torch.no_grad():
            logits = bb.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
            hidden = bb.base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            with self.engaged(mask):
                fast = bb.base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        tol = (1e-4 if bb.dtype == torch.float32 else 2e-2) * max(1.0, float(logits.abs().max()))
        self.head_ok = True
        if (self.head(hidden).float() - logits)[real].abs().max() > tol:
            self.head_ok = False
            return "its final hidden states through the LM head do not give its logits"
        if (fast.float() - hidden.float())[real].abs().max() > tol:
            return "a forward with the speed-ups differs from the plain one"
        return None

    def _check_decode(self) -> LeanDecode | None:
        """The lean decode step if the model has that layout and, on a probe batch (left padding, after a cached
        two-token prefix), its decode step, its prefill alone and its prefill beside a decode step give the model's
        own logits and leave the model's own keys in the cache; else None (with a notice if the check failed: a
        layout in the table that does not behave as listed)."""
        bb = self.backbone
        if decode_unsupported(bb.model) is not None:
            return None
        lean = LeanDecode(bb)
        dev = bb.device
        ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13], [14, 15, 16, 17, 18], [0, 19, 20, 21, 22]],
                           device=dev) % bb.config.vocab_size
        mask = (ids != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        B, P = ids.shape[0], 2  # a two-token prefix (a prompt's cached keys/values) before each row
        nxt = torch.tensor([[23], [24], [25], [26]], device=dev) % bb.config.vocab_size
        pre = torch.tensor([[3, 4]], device=dev) % bb.config.vocab_size
        full = torch.cat([torch.ones(B, P, dtype=mask.dtype, device=dev), mask], dim=1)
        positions = positions + P
        step_mask = torch.cat([full, torch.ones_like(nxt)], dim=1)
        step_pos = positions[:, -1:] + 1
        with torch.no_grad():
            def prefilled():
                return bb.model(input_ids=torch.cat([pre.expand(B, P), ids], dim=1), attention_mask=full,
                                position_ids=torch.cat([torch.arange(P, device=dev).expand(B, P), positions], dim=1),
                                cache=bb.new_cache(), use_cache=True)

            def prefix():
                layers = bb.model(input_ids=pre, cache=bb.new_cache(), use_cache=True).cache.layers
                return bb.new_cache([(la.keys.expand(B, -1, -1, -1), la.values.expand(B, -1, -1, -1))
                                     for la in layers])

            own = prefilled()  # its cache stays as the prefill left it
            step = bb.model(input_ids=nxt, attention_mask=step_mask, position_ids=step_pos,
                            cache=prefilled().cache, use_cache=True).logits[:, -1].float()
            # the lean step on the model's own prefill cache; then a prefill alone, and one beside a step; in both
            # layouts (rows, and feature-major with weight-first products: `transposed_products`)
            got = []
            for flipped in (False, True):
                caches = [prefilled().cache for _ in range(2)]
                fresh = [Fresh(ids, mask, positions, full, prefix()) for _ in range(2)]
                with self.engaged():
                    packed, dnnl = self._step_products()
                    lean_step = lean.step(nxt, step_mask, step_pos, caches[0], packed, flipped, dnnl)
                with self.engaged(mask):
                    head = self._dnnl("dnnl_decode")
                    alone = lean.run(None, fresh[0], None, self._dnnl(), flipped, head)[1]
                    beside, joined = lean.run(Step(nxt, step_mask, step_pos, caches[1]), fresh[1], None,
                                              self._dnnl(), flipped, head)
                got.append((lean_step, beside, alone, joined, fresh))
            self.packed.clear()  # the probe's packed weights: made again on first use, if the rows layout runs
        tol = (1e-4 if bb.dtype == torch.float32 else 2e-2) * max(1.0, float(step.abs().max()))
        prefill = own.logits[:, -1].float()
        real = full.bool()
        pairs = []
        for lean_step, beside, alone, joined, fresh in got:
            pairs += [(lean_step, step), (beside, step), (alone, prefill), (joined, prefill)]
            pairs += [(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real])
                      for f in fresh for a, b in zip(f.cache.layers, own.cache.layers, strict=True)]
        if max(float((a.float() - b.float()).abs().max()) for a, b in pairs) > tol:
            model_type = getattr(bb.model.config.get_text_config(), "model_type", "?")
            print(f"softprompt: model type {model_type!r}: the lean decode step differs from the model's own; "
                  "decoding through the model's forward", file=sys.stderr, flush=True)
            return None
        return lean

    # --- what callers use ------------------------------------------------------------------------------------
    def decode_step(self):
        """``step(ids, mask, positions, cache)`` -> next-token logits (B, V) through the lean decode step
        (fastpath/decode.py), or None where it is off, does not apply, or failed its self-check. Call inside
        ``engaged()``."""
        lean = self._lean_decode()
        if lean is None:
            return None

        def step(ids, mask, positions, cache):
            packed, dnnl = self._step_products()
            return lean.step(ids, mask, positions, cache, packed, self._flipped(), dnnl)
        return step

    def _step_products(self) -> tuple[PackedWeights | None, PackedWeights | None]:
        """A lean decode step's (packed weights, oneDNN weights) from the engaged plan: oneDNN's where `dnnl_decode`
        applies, else the packed weights, if any."""
        plan = _ACTIVE.get()
        if plan is None:
            return None, None
        return (plan.packed if plan.dnnl is None else None), plan.dnnl

    def joint_forward(self):
        """``run(step, fresh)`` -> (step logits, fresh logits): a decode step and/or a new batch's prefill in one
        lean forward (``LeanDecode.run``; ``Step`` and ``Fresh`` from fastpath/decode.py), or None where the lean
        step is off, does not apply, or failed its self-check. Call inside ``engaged(fresh.mask)``."""
        lean = self._lean_decode()
        if lean is None:
            return None

        def run(step, fresh):
            return lean.run(step, fresh, None, self._dnnl(), self._flipped(), self._dnnl("dnnl_decode"))
        return run

    def _lean_decode(self) -> LeanDecode | None:
        if not (self.installed and self.config.lean_decode):
            return None
        if self._decode is None:
            outer = _ACTIVE.set(None)  # the check's own forwards: never under the caller's plan (its rows' shapes)
            try:
                self._decode = self._check_decode() or False
            finally:
                _ACTIVE.reset(outer)
        return self._decode or None

    @property
    def lean(self) -> bool:
        return self.installed and self.config.enabled and self.config.lean_head and self.head_ok

    def head(self, hidden: torch.Tensor, rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """The model's logits from final hidden states (..., H): over the vocabulary, or over `rows` only
        (..., len(rows)) when only some tokens' logits are needed (a verbalizer's label words)."""
        lin = self.backbone.model.get_output_embeddings()
        w, b = lin.weight, getattr(lin, "bias", None)
        if rows is not None:
            rows = torch.as_tensor(rows, device=w.device)
            w, b = w[rows], None if b is None else b[rows]
        # one (N, H) x (H, V) product: on a strided (B, K, H) slice matmul would expand the weight per row (bf16 on
        # a CPU copies it whole)
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), w, b).unflatten(0, hidden.shape[:-1])
        if self.arch is not None and self.arch.logits is not None:
            logits = self.arch.logits(self.backbone.model.config.get_text_config(), logits)
        return logits

    @contextlib.contextmanager
    def engaged(self, mask: torch.Tensor | None = None, last_only: bool = False):
        """The plan for the forward(s) in this block: `mask` (B, T) of the rows' forward (None: a prompt's own
        batch-1 run, which gets the weight casts and attention choices but no MLP plan)."""
        if not self.installed:
            yield
            return
        cfg = self.config
        dev = self.backbone.device
        auto = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        bf16 = auto == torch.bfloat16 or self.backbone.dtype == torch.bfloat16
        plan = Engaged(self, casts=self._weight_casts(auto),
                       gqa=dev.type == "cpu" and cfg.sdpa_gqa and _GQA_OK,
                       math=dev.type == "cpu" and cfg.bf16_math_attention and bf16 and torch.is_grad_enabled(),
                       packed=self._packing(auto) if mask is None else None,  # rows' forward: never a decode step
                       dnnl=self._dnnl("dnnl_decode") if mask is None else None)
        if mask is not None:
            real = None
            if cfg.unpadded_mlp and not bool(mask.all()):
                real = mask.reshape(-1).nonzero().squeeze(1)
            plan.mlp = MLPPlan(last=self.mlps[-1] if last_only and cfg.last_column_mlp else None, real=real,
                               shape=tuple(mask.shape), gated=cfg.gated_mlp_memory)
        token = _ACTIVE.set(plan)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def _weight_casts(self, autocast_dtype: torch.dtype | None) -> WeightCasts | None:
        if not self.config.cached_weight_casts or autocast_dtype not in (torch.bfloat16, torch.float16):
            return None
        if any(m.weight.dtype != torch.float32 or m.weight.requires_grad for m in self.linears):
            return None  # half weights need no cast; trained weights (fine-tuning) must not be cached
        if autocast_dtype not in self.casts:
            self.casts[autocast_dtype] = WeightCasts(autocast_dtype)
        return self.casts[autocast_dtype]

    def _packing(self, autocast_dtype: torch.dtype | None) -> PackedWeights | None:
        if (not self.config.packed_decode or not PACKING_AVAILABLE or autocast_dtype is not None
                or torch.is_grad_enabled() or self.backbone.device.type != "cpu"):
            return None
        if any(m.weight.dtype != torch.float32 or m.weight.requires_grad for m in self.linears):
            return None
        if sum(m.weight.numel() for m in self.linears) * 4 * len(PACKING_BUCKETS) > PACKING_MAX_BYTES:
            return None  # a packed copy per bucket would cost too much memory
        return self.packed

    def _dnnl(self, switch: str = "dnnl_prefill") -> PackedWeights | None:
        """The store of oneDNN weights for the products `switch` governs (`dnnl_prefill`: a prefill's layer
        products; `dnnl_decode`: a decode step's, and the LM head's): float32 inference on CPU, one copy of the
        layers' weights at most PACKING_MAX_BYTES; else None (the modules' own products)."""
        dev = self.backbone.device
        if (not getattr(self.config, switch) or not DNNL_AVAILABLE or dev.type != "cpu" or torch.is_grad_enabled()
                or torch.is_autocast_enabled(dev.type)):
            return None
        if any(m.weight.dtype != torch.float32 or m.weight.requires_grad for m in self.linears):
            return None
        if sum(m.weight.numel() for m in self.linears) * 4 > PACKING_MAX_BYTES:
            return None
        return self.packed

    def _flipped(self) -> bool:
        """Whether the lean forward's products run as weight @ x^T (`transposed_products`): float32 inference on
        CPU."""
        dev = self.backbone.device
        return (self.config.transposed_products and dev.type == "cpu" and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled(dev.type)
                and all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for m in self.linears))

    def clear(self) -> None:
        """Drop the cached weight casts and packed weights (memory back; the next forward makes them again)."""
        self.casts.clear()
        self.packed.clear()

    def say_notice(self) -> None:
        if self.notice:
            print(f"softprompt: {self.notice}", file=sys.stderr, flush=True)
