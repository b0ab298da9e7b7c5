"""Training step and classification scoring: softprompt vs PEFT prompt tuning, same process, same everything.

    python benchmarks/train_vs_peft.py [--model smollm2-135m] [--batch 8] [--seq 128] [--prompt-len 20] [--repeats 5]

Both sides train a P-token prompt on the same frozen backbone (one loaded model; PEFT wraps it), on the same
batches of real Rotten Tomatoes reviews (left-padded / cut to --seq tokens), with the same loss: cross-entropy
over the label words " positive" / " negative" at the answer position, AdamW. Runs alternate between the two,
after a warm-up, and the median of --repeats is reported with the ratio PEFT / softprompt; float32 and bf16
autocast. Peak RSS is measured per side in its own pass (VmHWM reset before it). The losses of the two sides are
checked equal on the first batch (same prompt init) before anything is timed.
Writes benchmarks/results/train_vs_peft.json and prints a markdown table.
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
from softprompt.evaluate import evaluate_classification
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import load_task
from softprompt.train.memory import peak_rss_mb, reset_peak


def autocast(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-rows", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/train_vs_peft.json")
    args = ap.parse_args()
    import peft

    bb = sp.load_backbone(args.model, device="cpu")
    task = load_task({"builtin": "rotten_tomatoes", "max_length": args.seq})
    enc = TaskEncoder(task, bb.tokenizer, args.prompt_len, bb.max_positions, bb.pad_token_id)
    rows = load_splits("rotten_tomatoes")["train"]
    # long reviews first so that batches are near --seq tokens, as in the 8 x 128 figure
    rows = sorted(rows, key=lambda r: -len(r["text"]))[: args.batch * (args.repeats + 2)]
    batches = [enc.classification_batch(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]
    label_ids = [c[0] for c in enc.candidates]
    init = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="labels",
                                  init_labels=[" positive", " negative"]).weight.detach()

    ours_prompt = sp.PromptTuning(init.clone())
    ours = sp.PromptedModel(bb, ours_prompt)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)

    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prompt_len)
    theirs = peft.get_peft_model(bb.model, cfg)
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(init)
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    theirs_opt = torch.optim.AdamW(theirs_params, lr=1e-2)

    def ours_loss(b):
        return torch.nn.functional.cross_entropy(enc.label_scores(ours, b), b["y"])

    def theirs_loss(b):
        logits = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, P+T, V)
        return torch.nn.functional.cross_entropy(logits[:, -1, label_ids].float(), b["y"])

    def step(loss_fn, opt, b, precision):
        with autocast(precision):
            loss = loss_fn(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    # correctness first: same init, one unpadded row -> same loss. (Padded batches differ: PEFT drops position
    # ids, so under left padding its pads sit between prompt and text, PEFT issue #1093; ours follow the mask.)
    one = enc.classification_batch(rows[:1])
    with torch.no_grad():
        a, b_ = float(ours_loss(one)), float(theirs_loss(one))
    assert abs(a - b_) < 1e-4, (a, b_)
    print(f"unpadded row loss: softprompt {a:.6f}, peft {b_:.6f}")

    results = {"model": args.model, "batch": args.batch, "seq": args.seq, "prompt_len": args.prompt_len,
               "threads": torch.get_num_threads(), "peft_version": peft.__version__, "rows": []}
    for precision in ("float32", "bf16"):
        for fn, opt in ((ours_loss, ours_opt), (theirs_loss, theirs_opt)):  # warm-up
            step(fn, opt, batches[0], precision)
        times = {"softprompt": [], "peft": []}
        for i in range(args.repeats):
            b = batches[1 + i]
            for name, fn, opt in (("softprompt", ours_loss, ours_opt), ("peft", theirs_loss, theirs_opt)):
                t = time.perf_counter()
                step(fn, opt, b, precision)
                times[name].append(time.perf_counter() - t)
        mem = {}
        for name, fn, opt in (("softprompt", ours_loss, ours_opt), ("peft", theirs_loss, theirs_opt)):
            reset_peak()
            step(fn, opt, batches[1], precision)
            mem[name] = peak_rss_mb()
        # scoring a test split, forward only: softprompt as `softprompt eval` does it (length-bucketed batches,
        # cached prompt KV, LM head at the answer position); PEFT batches in split order with full logits
        test = load_splits("rotten_tomatoes")["test"][: args.score_rows]
        score_batches = [enc.classification_batch(test[i:i + 16]) for i in range(0, len(test), 16)]
        score_t = {"softprompt": [], "peft": []}
        ours.eval()
        for _ in range(3):
            t = time.perf_counter()
            evaluate_classification(ours, enc, test, batch_size=16, precision=precision)
            score_t["softprompt"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad(), autocast(precision):
                for sb in score_batches:
                    theirs_loss(sb)
            score_t["peft"].append(time.perf_counter() - t)
        ours.train()
        row = {"precision": precision,
               "train_step_s": {k: statistics.median(v) for k, v in times.items()},
               "train_runs_s": times,
               "train_speedup": statistics.median(times["peft"]) / statistics.median(times["softprompt"]),
               "peak_rss_mb": mem, "memory_ratio": mem["softprompt"] / mem["peft"],
               "score_s": {k: statistics.median(v) for k, v in score_t.items()},
               "score_speedup": statistics.median(score_t["peft"]) / statistics.median(score_t["softprompt"]),
               "score_rows": len(test)}
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "train_runs_s"}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.model}, batch {args.batch} x <= {args.seq} tokens, P={args.prompt_len}, "
          f"{torch.get_num_threads()} threads, peft {peft.__version__}; median of {args.repeats}")
    print("| precision | train step softprompt | train step PEFT | speed-up | peak RSS ratio | "
          f"scoring {args.score_rows} rows: softprompt | PEFT | speed-up |\n|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['precision']} | {r['train_step_s']['softprompt']:.2f} s | {r['train_step_s']['peft']:.2f} s | "
              f"{r['train_speedup']:.2f}x | {r['memory_ratio']:.2f} | {r['score_s']['softprompt']:.2f} s | "
              f"{r['score_s']['peft']:.2f} s | {r['score_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
