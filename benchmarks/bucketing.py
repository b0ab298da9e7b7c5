"""Length-bucketed training batches (train.length_buckets) vs plain shuffling, on the real training data order.

    python benchmarks/bucketing.py [--model smollm2-135m] [--batch 8] [--pool 50] [--steps 8] [--precision float32]

Over one epoch of rotten_tomatoes' train split (the loop's own example_order): tokens computed per step (rows x
longest row + P) against real tokens, with and without buckets. Then the median time of a classification training
step over the first --steps steps of each order, alternating, after a warm-up. Writes
benchmarks/results/bucketing.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import load_task
from softprompt.train.loop import classification_loss, example_order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pool", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--out", default="benchmarks/results/bucketing.json")
    args = ap.parse_args()
    bb = sp.load_backbone(args.model)
    enc = TaskEncoder(load_task("rotten_tomatoes"), bb.tokenizer, args.prompt_len, bb.max_positions, bb.pad_token_id)
    rows = load_splits("rotten_tomatoes")["train"]
    t = time.perf_counter()
    lengths = [len(enc.encode_input(r)) for r in rows]
    length_s = time.perf_counter() - t
    n_steps = len(rows) // args.batch
    orders = {"plain": [example_order(len(rows), args.batch, 0, s) for s in range(n_steps)],
              "buckets": [example_order(len(rows), args.batch, 0, s, lengths, args.pool) for s in range(n_steps)]}
    real = sum(lengths[i] for b in orders["plain"] for i in b)
    stats = {}
    for name, order in orders.items():
        padded = sum(len(b) * max(lengths[i] for i in b) for b in order)
        stats[name] = {"padded_tokens_per_epoch": padded, "real_tokens_per_epoch": real, "padding_share": 1 - real / padded}
    print(json.dumps(stats))
    model = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="vocab"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    amp = torch.autocast(bb.device.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def step(idx):
        batch = enc.classification_batch([rows[i] for i in idx], bb.device)
        with amp:
            loss = classification_loss(enc, model, batch, "options") / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name in orders:
        step(orders[name][0])
    times = {name: [] for name in orders}
    for s in range(1, args.steps + 1):
        for name, order in orders.items():
            t = time.perf_counter()
            step(order[s])
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"args": vars(args), "threads": torch.get_num_threads(), "length_seconds": length_s, "epoch": stats,
           "step_s": med, "runs_s": times, "speedup": med["plain"] / med["buckets"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = [f"{args.model}, rotten_tomatoes train split ({len(rows)} rows), batch {args.batch}, P = {args.prompt_len}, "
          f"{args.precision}, pool {args.pool} batches; lengths of all rows computed in {length_s:.1f} s", "",
          "| order | padding share of computed input tokens (one epoch) | median step (first "
          f"{args.steps} steps) |", "|---|---|---|"]
    md += [f"| {k} | {100 * stats[k]['padding_share']:.1f}% | {med[k]:.2f} s |" for k in orders]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
