"""Run `softprompt demo` as a user would (a subprocess, the CLI) and record its table, wall time and machine.

    python benchmarks/run_demo.py                 # -> benchmarks/results/demo.json
    python benchmarks/run_demo.py --avx2          # the same machine limited to AVX2 kernels -> demo_avx2.json

--avx2 sets ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2: torch's kernels and
its matmul libraries then use what an AVX2-only CPU has, so bf16 is emulated and the demo picks float32, as it does
on such a CPU (whose float32 matmuls may still be slower than this machine's: the matmul rates are recorded).
The model cache should be warm (run the demo once before): the figure is the main job, not the download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PROBE = """
import json, torch
from softprompt.precision import cpu_flags, cpu_model, matmul_rates, native_bf16
import transformers, peft
r = matmul_rates("cpu", size=1024)
print(json.dumps({"cpu": cpu_model(), "cpu_flags": list(cpu_flags()), "native_bf16": native_bf16("cpu"),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "matmul_gflops": r}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avx2", action="store_true", help="limit the kernels to AVX2 (bf16 emulated)")
    ap.add_argument("--out-dir", default="runs/demo_benchmark")
    ap.add_argument("--out", default=None)
    args, extra = ap.parse_known_args()
    env = {**os.environ, **(AVX2 if args.avx2 else {})}
    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    if args.avx2:
        machine["limited_to"] = "AVX2 kernels (" + ", ".join(f"{k}={v}" for k, v in AVX2.items()) + ")"
    cli = Path(sys.executable).with_name("softprompt")
    cmd = [str(cli), "demo", "--out", args.out_dir, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo failed:\n{proc.stderr[-3000:]}")
    result = json.loads((Path(args.out_dir) / "compare.json").read_text())
    out = Path(args.out or f"benchmarks/results/demo{'_avx2' if args.avx2 else ''}.json")
    record = {"command": " ".join(["softprompt", *cmd[1:]]), "wall_seconds": round(wall, 1), "machine": machine,
              "result": result, "stdout": proc.stdout, "stderr_tail": proc.stderr[-4000:]}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(proc.stdout)
    print(f"wrote {out} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
