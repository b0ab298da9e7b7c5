"""The fast path's switches: one object, every switch public, all on by default. What each buys is measured in
benchmarks/speedups.py (before/after of each switch, same process)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _without_avx512() -> bool:
    from ..precision import cpu_flags

    return "avx512f" not in cpu_flags()


@dataclass(frozen=True)
class FastPathConfig:
    """Speed-ups for a frozen backbone; each keeps every real position's values and the prompt's gradient."""

    enabled: bool = True  # False: the plain path (the model's own forward, full logits), nothing installed
    lean_head: bool = True  # final hidden states out; the LM head only where a loss or a score needs it
    last_column_mlp: bool = True  # classification: the last decoder layer's MLP at the answer column only
    unpadded_mlp: bool = True  # every decoder MLP runs on the real tokens only, never on padding
    gated_mlp_memory: bool = True  # training: a gated MLP keeps its two projections for backward, not three tensors
    shared_prefix: bool = True  # classification: the rows' common first tokens run once, after the prompt
    cached_weight_casts: bool = True  # bf16/fp16 autocast: the frozen weights cast once, not at every forward
    sdpa_gqa: bool = True  # CPU: SDPA on the key/value heads (enable_gqa), not on repeated copies of them
    # bf16 training on CPU: SDPA's math kernel, whose backward is faster there than the flash kernel's (measured
    # 6.1 vs 10.8 ms per layer, batch 8 x 72 tokens); as close to float32 as the default kernel (tests)
    bf16_math_attention: bool = True
    # float32 inference on CPU: decode steps (3-32 rows, one token each) through Linear weights packed once for
    # MKL's small-batch GEMM, rows padded to 8, 16 or 32 (fastpath/packed.py); a packed copy per bucket used
    packed_decode: bool = True
    # float32 inference on CPU: the lean forward's prefill products (a new batch's tokens, alone or beside a decode
    # step) through oneDNN with the layer weights reordered once (fastpath/packed.py): one copy of them. On by
    # default where the CPU has AVX-512: 1.13-1.19x faster prefills there than MKL's products (1.15x beside a decode
    # step, what the continuous serving engine runs; benchmarks/serving_profile.py, results/serving_profile_avx512.json);
    # about even with AVX2 only (measured before oneDNN's products ran on dense tensors)
    dnnl_prefill: bool = field(default_factory=lambda: not _without_avx512())
    # float32 inference on CPU: the lean forward's decode steps (a few rows, one token each) and its LM head (in every
    # lean forward) through oneDNN as well, the same reordered layer weights and one of the LM head's (and a decode
    # step's Linears through the model's own forward); taken before packed_decode (no packed copy per row bucket). On
    # by default where the CPU has AVX-512: on an AMD EPYC the SmolLM2 decode step at 8 rows took 41.0 ms this way
    # against 89.8 on packed weights (benchmarks/generation.py --decode, results/decode_speed_avx512.json); on an
    # Intel one about as fast as packed weights (44.8 against 44.5 ms, results/decode_speed.json), with one copy of
    # the weights instead of one per row bucket
    dnnl_decode: bool = field(default_factory=lambda: not _without_avx512())
    # float32 inference on CPU: the lean forward feature-major, its products (decode steps and prefills) weight @ h,
    # so that MKL packs the few token columns rather than the whole weight at every call (fastpath/packed.py
    # `weight_first`): no copy of any weight; taken before packed_decode and dnnl_prefill. On by default where the
    # CPU has no AVX-512, where it was measured faster than both (benchmarks/generation.py --decode); with AVX-512
    # those two were measured and this was not
    transposed_products: bool = field(default_factory=_without_avx512)
    # inference: decode steps of Llama-shaped models (Llama, SmolLM2, Mistral, Qwen2) through a few ops per layer
    # instead of the model's forward, q/k/v and gate/up in one product each (fastpath/decode.py); self-checked
    lean_decode: bool = True

    @classmethod
    def off(cls) -> FastPathConfig:
        return cls(**{f.name: False for f in fields(cls)})

    def without(self, *names: str) -> FastPathConfig:
        """This config with the named switches off (benchmarks: what one switch buys)."""
        from dataclasses import replace

        return replace(self, **dict.fromkeys(names, False))


SWITCHES = tuple(f.name for f in fields(FastPathConfig) if f.name != "enabled")
