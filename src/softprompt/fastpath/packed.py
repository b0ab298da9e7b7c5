"""Decode steps on a CPU in float32: the frozen Linear weights packed once for MKL's small-batch GEMM.

A decode step multiplies a few rows (one new token per running row) by every weight of the model. MKL's plain
GEMM is slow at that shape: at 8 rows a SmolLM2 projection (576 x 1,536, weights streamed from memory) took 445 us
where reading the weight takes about 200 us; the same product on a weight packed once for 8 rows took 272 us
(1.6x), 1.65x at 16 rows, 1.5x at 32, and no gain below 4 rows (benchmarks/generation.py measures the whole step).
A packed weight serves one row count, so rows are padded up to a bucket (8, 16 or 32): padding rows cost almost
nothing when the step is bound by reading the weights. Each bucket used keeps a packed copy of the weights, so the
path is taken only for models whose copies for every bucket fit `MAX_BYTES` together (SmolLM2-135M: 3 x 0.54 GB). The packed product equals the plain one
to float32 rounding (the same sums in another order).

A prefill (many tokens at once) takes another route: oneDNN, with the weights reordered once into its own layout
and every product on dense tensors (`PackedWeights.dnnl`, the `dnnl_prefill` switch), faster than MKL's float32 GEMM
at those shapes on an AMD EPYC with AVX-512 (1.13-1.19x), about even on one with AVX2 only
(benchmarks/serving_profile.py). There, decode steps and the LM head take it too (`dnnl_decode`): the decode step at 8
rows in less than half the packed weights' time (benchmarks/generation.py --decode), so no packed copy is made.

Without AVX-512 both give way to `weight_first` (the `transposed_products` switch): the lean forward kept
feature-major and every product weight @ h, so that MKL packs the few token columns rather than the weight. No copy
of any weight, and faster than either there (decode step at 8 rows 75.4 against 92.5 ms packed; prefills 1.01-1.15x).
"""

from __future__ import annotations

import torch
from torch import nn

BUCKETS = (8, 16, 32)
MIN_ROWS = 3  # below this the plain GEMM is as fast
MAX_BYTES = 2 * 2**30  # the packed copies of every bucket together: only for models where they take at most this

AVAILABLE = hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear") and torch.backends.mkl.is_available()
# products through oneDNN (prefills; decode steps with AVX-512): float32 weights reordered once into its layout
DNNL_AVAILABLE = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def bucket(rows: int) -> int | None:
    if rows < MIN_ROWS:
        return None
    return next((b for b in BUCKETS if rows <= b), None)


class PackedWeights:
    """Packed copies of Linear weights, per (module or group of modules, bucket), made on first use and remade if
    a weight changes."""

    def __init__(self):
        self.store: dict[tuple, tuple] = {}

    def linear(self, module: nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x (rows, 1, in) or (rows, in) float32 -> module(x), through the packed weight of rows' bucket."""
        return self.product((module,), x, rows)

    def product(self, modules: tuple[nn.Linear, ...], x: torch.Tensor, rows: int) -> torch.Tensor:
        """x (rows, ..., in) -> the outputs of `modules` (Linears on the same input) side by side, one product
        through their weights concatenated and packed once per bucket (a decode step's q/k/v, gate/up)."""
        b = bucket(rows)
        stamp = tuple((m.weight.data_ptr(), m.weight._version) for m in modules)
        got = self.store.get((modules, b))
        if got is None or got[0] != stamp:
            got = (stamp, *self._pack(modules, b))
            self.store[(modules, b)] = got
        _, packed, shape, bias = got
        flat = x.reshape(rows, x.shape[-1])
        if rows < b:
            flat = torch.cat([flat, flat.new_zeros(b - rows, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat, packed, shape, bias, b)[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _pack(modules: tuple[nn.Linear, ...], b: int):
        if len(modules) == 1:
            w = modules[0].weight.detach()
            return torch.ops.mkl._mkl_reorder_linear_weight(w, b), w, modules[0].bias
        w, bias = _side_by_side(modules)
        # the op reads only the (out, in) sizes of its plain weight when the rows equal the packed row count,
        # which they always do here (padded to the bucket): a stand-in of that shape, not a second copy
        return torch.ops.mkl._mkl_reorder_linear_weight(w, b), w.new_empty(1).expand(w.shape), bias

    def dnnl(self, modules: tuple[nn.Linear, ...], x: torch.Tensor) -> torch.Tensor:
        """x (N, in) float32 (a prefill's tokens, or a decode step's rows) -> the outputs of `modules` side by side,
        one oneDNN product through their weights concatenated and reordered once. On an AMD EPYC with AVX-512 MKL's float32 GEMM
        is the slower of the two at these shapes (prefills 1.13-1.19x faster this way); with AVX2 only they are about
        even (0.98-1.07x; benchmarks/serving_profile.py)."""
        stamp = tuple((m.weight.data_ptr(), m.weight._version) for m in modules)
        got = self.store.get((modules, "dnnl"))
        if got is None or got[0] != stamp:
            w, bias = _side_by_side(modules)
            # oneDNN's own blocked layout for any row count, and a product on plain (dense) tensors: faster than the
            # weight as a plain oneDNN tensor with the input and output converted at every call, the most at a
            # decode step's few rows (SmolLM2's products, AMD EPYC with AVX-512)
            got = (stamp, torch.ops.mkldnn._reorder_linear_weight(w, None), bias)
            self.store[(modules, "dnnl")] = got
        _, weight, bias = got
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

    def clear(self) -> None:
        self.store.clear()


def padded(n: int) -> int:
    """The column count `weight_first` runs n tokens at: n up to 8, else n rounded up to a multiple of 16."""
    return n if n <= 8 else -(-n // 16) * 16


def weight_first(modules: tuple[nn.Linear, ...], h: torch.Tensor) -> torch.Tensor:
    """Feature-major products: h (in, N) -> the outputs of `modules` (Linears on the same input) stacked, (sum of
    outs, N), as weight @ h. The weight is GEMM's first operand, read in place, and the few token columns are what
    MKL packs; as `F.linear` (x @ weight^T on (N, in) rows) MKL packs the whole weight at every call, which at a
    decode step's few rows costs more than the product. h is padded with zero columns to `padded(N)`: MKL's kernel
    was much slower at other counts (30 SmolLM2 layers: 83 ms at 28 columns, 64 at 32; 296 at 159, 234 at 160).
    Measured on an AMD EPYC with AVX2 only, 30 layers against `F.linear` on the same tokens: 36 against 56 ms at
    8 tokens, 42 against 68 at 16, 64 against 93 at 32, 234 against 285 at 160, 561 against 614 at 400, about even
    at 800 (benchmarks/generation.py --decode measures the whole step). No copy of any weight; equal to
    `F.linear`'s to float32 rounding."""
    n = h.shape[1]
    to = padded(n)
    if to != n:
        h = torch.cat([h, h.new_zeros(h.shape[0], to - n)], dim=1)
    elif n <= 8 and h.stride(0) != 1:  # up to 8 tokens, columns of a row-major (N, in): 36 against 70 ms at 8
        h = h.t().contiguous().t()
    out = h.new_empty(sum(m.out_features for m in modules), to)
    at = 0
    for m in modules:  # each module's rows of the output written in place: no cat
        part = out[at:at + m.out_features]
        if m.bias is None:
            torch.mm(m.weight, h, out=part)
        else:
            torch.addmm(m.bias[:, None], m.weight, h, out=part)
        at += m.out_features
    return out if to == n else out[:, :n]


def _side_by_side(modules: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' weights stacked over their outputs, and their biases (zeros for a module without one; None when
    none has one): one Linear whose output is theirs side by side."""
    w = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None if all(t is None for t in biases) else torch.cat(
        [t.detach() if t is not None else w.new_zeros(m.out_features) for t, m in zip(biases, modules, strict=True)])
    return w, bias
