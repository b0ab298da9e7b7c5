"""The memory a float32 CPU decode costs on top of the model, per product route of the lean forward: each route in a
fresh process (one route's memory never hides another's), SmolLM2 loaded, then greedy generation at 8, 16 and 28
rows (the packed weights' three row buckets), and the process's resident memory (RSS, Linux's /proc) read after the load and after
the decoding. Routes: feature-major with weight-first products (`transposed_products`), rows through oneDNN
(`dnnl_prefill` and `dnnl_decode`: one reordered copy of the weights), rows with packed weights (`packed_decode`: a
packed copy of the weights per row bucket used), rows with none of them.

    python benchmarks/decode_memory.py [--model smollm2-135m]  -> benchmarks/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROUTES = {
    "feature-major, weight-first products": dict(transposed_products=True),
    "rows, oneDNN (prefills, decode steps, LM head)": dict(transposed_products=False, dnnl_prefill=True,
                                                             dnnl_decode=True),
    "rows, packed weights": dict(transposed_products=False, dnnl_prefill=False, dnnl_decode=False),
    "rows, neither": dict(transposed_products=False, packed_decode=False, dnnl_prefill=False, dnnl_decode=False),
}

CHILD = """
import json, sys
import softprompt as sp
from softprompt.fastpath import FastPathConfig
bb = sp.load_backbone(sys.argv[1])
rt = sp.runtime(bb)
rt.configure(FastPathConfig(**json.loads(sys.argv[2])))
def rss():  # resident memory, bytes (Linux)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
loaded = rss()
texts = ["Review: A moving, beautifully acted film about grief and love.\\nSentiment:",
         "Review: Two hours of my life I will never get back.\\nSentiment:",
         "Review: Dull.\\nSentiment:", "Once upon a time"] * 7
for n in (8, 16, 28):
    sp.generate(bb, None, texts[:n], max_new_tokens=4)
print(json.dumps({"rss_loaded_mb": loaded / 1e6, "rss_after_decoding_mb": rss() / 1e6,
                  "packed_copies": len(rt.fastpath.packed.store)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/results/decode_memory.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from serving import cpu_flags

    rows = []
    for route, switches in ROUTES.items():
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, json.dumps(switches)], check=True,
                             capture_output=True, text=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        rows.append({"route": route, "switches": switches, **got,
                     "added_mb": got["rss_after_decoding_mb"] - got["rss_loaded_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    command = " ".join(["python benchmarks/decode_memory.py", *sys.argv[1:]])
    result = {"model": args.model, "rows_decoded": [8, 16, 28], "cpu_flags": cpu_flags(), "rows": rows,
              "command": command}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
