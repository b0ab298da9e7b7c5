"""The LM head on strided slices of hidden states: the model's own `nn.Linear` call against softprompt's fast-path
head (one (N, H) x (H, V) product), in one process, in float32 and bfloat16.

    python benchmarks/lm_head_products.py [--model smollm2-135m] [--repeats 7]
        -> benchmarks/results/lm_head_products.json

Two slices that the library takes: a prefill's last positions (B, 1, H) out of (B, T, H) (`logits_to_keep=1`, every
prefill of a decoding batch) and the positions before a label's words (B, K, H) out of (B, T, H) (scoring
multi-token verbalizers). On such a slice `torch.matmul` expands the weight to (B, H, V) for a batched product,
which bf16 on a CPU copies whole. Outputs are checked equal (to the precision's rounding) before timing; the
variants alternate, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from train_vs_peft import machine

import softprompt as sp

CASES = {"prefill_last_positions": (8, 47, slice(-1, None)), "label_words": (16, 12, slice(-4, -1))}


def once(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/lm_head_products.json")
    args = ap.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        bb = sp.load_backbone(args.model, dtype=dtype)
        rt = sp.runtime(bb)
        head = bb.model.get_output_embeddings()
        for case, (B, T, cols) in CASES.items():
            states = torch.randn(B, T, bb.hidden_size, dtype=bb.dtype, generator=torch.Generator().manual_seed(0))
            h = states[:, cols]
            with torch.inference_mode():
                plain, fast = head(h), rt.head(h)
                tol = 1e-4 if dtype == "float32" else 2e-2
                torch.testing.assert_close(fast.float(), plain.float(), atol=tol * float(plain.abs().max()), rtol=0)
                runs = {"plain": [], "softprompt": []}
                for _ in range(2):  # warm-up
                    head(h), rt.head(h)
                for _ in range(args.repeats):  # alternating
                    runs["plain"].append(once(head, h))
                    runs["softprompt"].append(once(rt.head, h))
            med = {k: statistics.median(v) for k, v in runs.items()}
            row = {"dtype": dtype, "case": case, "shape": list(h.shape), "plain_ms": round(1000 * med["plain"], 2),
                   "softprompt_ms": round(1000 * med["softprompt"], 2),
                   "speedup": round(med["plain"] / med["softprompt"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"model": args.model, "repeats": args.repeats, "rows": rows, "machine": machine(),
           "command": " ".join(["python benchmarks/lm_head_products.py", *sys.argv[1:]])}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
