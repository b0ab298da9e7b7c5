"""Which precision to compute in: bf16 autocast where the hardware does bf16 natively, float32 elsewhere.

bf16 pays on GPUs that support it and on CPUs with native bf16 instructions (avx512_bf16 or AMX); on other CPUs
it is emulated, and far slower than float32 (a 1024^2 matmul measured 84x slower on a 2-core AVX2-only CPU). So
``auto`` (the default everywhere) picks bf16 only where it is native, and asking for bf16 explicitly on a CPU that
emulates it prints one warning with the measured matmul rates.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path

import torch

from .errors import SoftPromptError

PRECISIONS = ("auto", "float32", "bf16")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The CPU's instruction-set flags that decide precision and speed (recorded with every benchmark)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return tuple(f for f in wanted if f in have)


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively (fast) on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # the flags say what the CPU has; torch's capability says what its kernels use (ATEN_CPU_CAPABILITY=avx2
        # limits them, as on a machine without AVX-512)
        capability = torch.backends.cpu.get_cpu_capability()
        return any(f in cpu_flags() for f in _NATIVE_BF16_FLAGS) and capability not in ("DEFAULT", "AVX2")
    return False


def matmul_rates(device: torch.device | str = "cpu", size: int = 256, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a size^3 matmul in float32 and bf16 on this device (a quick probe: well under a second)."""
    device = torch.device(device)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device).to(dtype)
        a @ a  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * size**3 / max(best, 1e-9) / 1e9
    return out


_warned: set[str] = set()


def resolve_precision(precision: str | None, device: torch.device | str = "cpu") -> str:
    """'auto' -> 'bf16' where bf16 is native, else 'float32'. An explicit 'bf16' on a CPU that emulates it is
    kept (the user asked) with one warning that says how much slower it is here."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise SoftPromptError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "float32"
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device) and "bf16" not in _warned:
        _warned.add("bf16")
        r = matmul_rates(device)
        print(f"softprompt: warning: bf16 was asked for, but this CPU has no native bf16 (no avx512_bf16/amx_bf16): "
              f"a matmul runs at {r['bf16']:.1f} GFLOP/s in bf16 against {r['float32']:.1f} in float32 here; use "
              "precision auto (or float32) for speed", file=sys.stderr, flush=True)
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision ('float32': none)."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
