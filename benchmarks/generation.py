"""Generation speed with a soft prompt: prompt key/values reused vs recomputed, same process, alternating runs.

    python benchmarks/generation.py [--model smollm2-135m] [--batch 8] [--new 32] [--prompt-len 20] [--repeats 5]

Reports the backbone load time, then for each mode the median wall time of a whole generate() call
(prefill + greedy decode of --new tokens, EOS ignored so every run decodes the same number of tokens) and new
tokens/s. Writes JSON to benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt as sp

TEXTS = [
    "Review: A moving, beautifully acted film about grief and love.\nSentiment:",
    "Review: Two hours of my life I will never get back.\nSentiment:",
    "Review: The plot is thin but the jokes land.\nSentiment:",
    "Review: An ambitious mess that never finds its footing.\nSentiment:",
    "Review: Charming, funny and far smarter than it looks.\nSentiment:",
    "Review: Dull.\nSentiment:",
    "Review: The best thriller of the year, tense from start to finish.\nSentiment:",
    "Review: It wants to be profound and ends up merely tedious.\nSentiment:",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/generation.json")
    args = ap.parse_args()

    sp.load_backbone(args.model, dtype=args.dtype)  # make sure the cache is filled: time the warm load below
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        bb = sp.load_backbone(args.model, dtype=args.dtype)
        loads.append(time.perf_counter() - t)
    texts = (TEXTS * (args.batch // len(TEXTS) + 1))[: args.batch]
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="vocab")
    eos_ids = bb.eos_token_ids
    modes = {
        "no prompt": dict(prompt=None),
        "prompt, KV recomputed": dict(prompt=prompt, reuse_prompt_cache=False),
        "prompt, KV reused": dict(prompt=prompt, reuse_prompt_cache=True),
    }
    orig = type(bb).eos_token_ids
    type(bb).eos_token_ids = property(lambda self: [])  # never stop early: equal work in every mode
    try:
        for kw in modes.values():  # warm-up (first passes are several times slower)
            sp.generate(bb, inputs=texts, max_new_tokens=4, **kw)
        times: dict[str, list[float]] = {m: [] for m in modes}
        outputs = {}
        for _ in range(args.repeats):
            for m, kw in modes.items():  # alternate modes so drift hits all of them alike
                t = time.perf_counter()
                out = sp.generate(bb, inputs=texts, max_new_tokens=args.new, **kw)
                times[m].append(time.perf_counter() - t)
                outputs[m] = out.tokens
    finally:
        type(bb).eos_token_ids = orig
    a, b = outputs["prompt, KV reused"], outputs["prompt, KV recomputed"]
    same_rows = sum(x == y for x, y in zip(a, b, strict=True))
    if args.dtype == "float32":  # bf16 rounds differently in a batch-1 prefill than in a joint one: report it
        assert a == b, "float32: greedy tokens must be equal with and without KV reuse"
    rows = []
    for m in modes:
        med = statistics.median(times[m])
        rows.append({"mode": m, "median_s": med, "new_tokens_per_s": args.batch * args.new / med,
                     "runs_s": times[m]})
    result = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new,
              "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
              "load_s_median": statistics.median(loads),
              "rows_equal_reused_vs_recomputed": f"{same_rows}/{len(a)}", "eos_ids_ignored": eos_ids, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} {args.dtype}, batch {args.batch}, {args.new} new tokens, prompt {args.prompt_len}, "
          f"{torch.get_num_threads()} threads; warm load {result['load_s_median']:.2f} s (median of 3)")
    print(f"greedy rows equal, KV reused vs recomputed: {same_rows}/{len(a)}")
    print("| mode | median s / generate | new tokens/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_s']:.2f} | {r['new_tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
