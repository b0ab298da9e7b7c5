"""Before/after of the classification path's savings (PromptedModel.hidden_states(..., last_only=True)), with PEFT.

    python benchmarks/classification_path.py [--repeats 5] [--precisions float32,bf16] [--cases train_cls,score]

Variants of softprompt, same process, alternating with PEFT after a warm-up, median of --repeats:
  before      every column through every layer (the path before last_only)
  last_mlp    the last decoder layer's MLP at the answer column only
  shared      + the rows' shared first tokens ("Review:") run once with the prompt instead of once per row
  after       scoring: + batches cut where padding would pass 5% (evaluate.PAD_TOLERANCE; measured slower, so off)
Cases and data are benchmarks/train_vs_peft.py's: one classification training step on batches of the longest
train reviews, and scoring --score-rows test rows as `softprompt eval` does. Before timing, the variants' losses on
one batch are asserted equal. Writes benchmarks/results/classification_path.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from train_vs_peft import Bench, bench_args, timed

import softprompt as sp
import softprompt.evaluate as evaluate_module
import softprompt.model as model_module

_TOL = evaluate_module.PAD_TOLERANCE
# each variant: the switches of model.SPEEDUPS it sets (the others keep their defaults), and the padding tolerance
VARIANTS = {"before": ({"last_column_mlp": False, "shared_prefix": False}, None),
            "last_mlp": ({"last_column_mlp": True, "shared_prefix": False}, None),
            "shared": ({"last_column_mlp": True, "shared_prefix": True}, None),
            "after": ({"last_column_mlp": True, "shared_prefix": True}, 0.05)}  # scoring only (off by default)
_DEFAULTS = dict(model_module.SPEEDUPS)


def use(variant: str) -> None:
    switches, tol = VARIANTS[variant]
    model_module.SPEEDUPS.update(switches)
    evaluate_module.PAD_TOLERANCE = tol


def reset() -> None:
    model_module.SPEEDUPS.update(_DEFAULTS)
    evaluate_module.PAD_TOLERANCE = _TOL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_args(ap)
    ap.add_argument("--cases", default="train_cls,score")
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs per variant (no timing) into --out")
    ap.add_argument("--accuracy", metavar="PROMPT", help="evaluate this trained prompt file on --accuracy-rows test "
                    "rows with `before` and `shared` (no timing) into --out")
    ap.add_argument("--accuracy-rows", type=int, default=400)
    ap.add_argument("--out", default="benchmarks/results/classification_path.json")
    args = ap.parse_args()
    dev = sp.backbones.resolve_device(args.device)
    if args.accuracy:
        return compare_accuracy(args, dev)
    bench = Bench(args, dev)
    b0 = bench.cls_batches[0]
    losses = {}
    with torch.no_grad():
        for v in VARIANTS:
            use(v)
            losses[v] = float(bench.loss("softprompt", "train_cls", b0))
    reset()
    assert all(abs(x - losses["before"]) < 1e-4 for x in losses.values()), losses
    print("equal losses:", losses)
    if args.flops_only:
        return count_variant_flops(bench, args)
    rows = []
    for precision in args.precisions.split(","):
        for case in args.cases.split(","):
            variants = [v for v in VARIANTS if case == "score" or v != "after"]
            sides = [*variants, "peft"]
            def run(side, i, case=case, precision=precision):
                if side != "peft":
                    use(side)
                try:
                    if case == "train_cls":
                        bs = bench.cls_batches
                        return bench.step("peft" if side == "peft" else "softprompt", case, bs[1 + i % (len(bs) - 1)],
                                          precision)
                    return bench.score("peft" if side == "peft" else "softprompt", precision)
                finally:
                    reset()

            for s in sides:  # warm-up
                run(s, 0)
            times = {s: [] for s in sides}
            for i in range(args.repeats):
                for s in sides:
                    times[s].append(timed(lambda s=s, i=i: run(s, i), dev))
            med = {s: statistics.median(v) for s, v in times.items()}
            row = {"case": case, "precision": precision, "median_s": med, "runs_s": times,
                   "speedup_vs_peft": {s: med["peft"] / med[s] for s in variants},
                   "gain_vs_before": {s: med["before"] / med[s] for s in variants}}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
    res = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "peft_version": bench.peft_version, "equal_losses": losses, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    names = {"train_cls": "train step, classification", "score": f"scoring {args.score_rows} test rows"}
    md = [f"{args.model}, batch {args.batch}, P = {args.prompt_len}, {res['threads']} threads, torch {res['torch']}, "
          f"peft {res['peft_version']}; median of {args.repeats}, alternating (in brackets: speed-up vs PEFT)", "",
          "| case | precision | before | last layer's MLP at the answer only | + shared first tokens once | "
          "+ scoring batches cut at length jumps | PEFT |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, x = r["median_s"], r["speedup_vs_peft"]
        md.append(f"| {names[r['case']]} | {r['precision']} | " + " | ".join(
            f"{m[v]:.2f} s ({x[v]:.2f}x)" if v in m else "" for v in VARIANTS) + f" | {m['peft']:.2f} s |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def compare_accuracy(args, dev) -> None:
    """The same trained prompt scored on a seeded sample of the real test split, before and after the savings."""
    import random

    from softprompt.evaluate import evaluate_classification
    from softprompt.tasks.datasets import load_splits
    from softprompt.tasks.encode import TaskEncoder
    from softprompt.tasks.spec import load_task

    bb = sp.load_backbone(args.model, device=dev)
    method = sp.load_prompt(args.accuracy, backbone=bb).build(dev)
    model = sp.PromptedModel(bb, method).eval()
    enc = TaskEncoder(load_task("rotten_tomatoes"), bb.tokenizer, method.num_virtual_tokens, bb.max_positions,
                      bb.pad_token_id)
    test = load_splits("rotten_tomatoes")["test"]
    rows = random.Random(0).sample(test, min(args.accuracy_rows, len(test)))
    got = []
    for precision in args.precisions.split(","):
        for v in ("before", "shared"):
            use(v)
            try:
                r = evaluate_classification(model, enc, rows, 16, precision)
            finally:
                reset()
            got.append({"variant": v, "precision": precision, "accuracy": r["accuracy"], "loss": r["loss"],
                        "confusion": r["confusion"]["matrix"]})
            print(json.dumps(got[-1]), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "rows": got}, indent=2) + "\n")
    md = [f"{args.accuracy}, {len(rows)} seeded test rows of rotten_tomatoes", "",
          "| precision | variant | accuracy | loss | confusion (gold x predicted) |", "|---|---|---|---|---|"]
    md += [f"| {g['precision']} | {g['variant']} | {100 * g['accuracy']:.2f}% | {g['loss']:.6f} | {g['confusion']} |"
           for g in got]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def count_variant_flops(bench: Bench, args) -> None:
    """FLOPs of one step / one scoring pass per variant (torch's FlopCounterMode): the work each saving removes,
    free of timing noise."""
    from train_vs_peft import count_flops

    rows = []
    for case in args.cases.split(","):
        got = {}
        for v in [v for v in VARIANTS if case == "score" or v != "after"]:
            use(v)
            try:
                if case == "train_cls":
                    got[v] = count_flops(lambda: bench.step("softprompt", "train_cls", bench.cls_batches[1], "float32"))
                else:
                    got[v] = count_flops(lambda: bench.score("softprompt", "float32"))
            finally:
                reset()
        got["peft"] = count_flops(lambda case=case: bench.step("peft", case, bench.cls_batches[1], "float32")
                                  if case == "train_cls" else bench.score("peft", "float32"))
        rows.append({"case": case, "flops": got, "vs_before": {k: n / got["before"] for k, n in got.items()}})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    md = ["FLOPs counted by torch's FlopCounterMode (float32; in brackets: share of `before`)", "",
          "| case | " + " | ".join(VARIANTS) + " | PEFT |", "|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in rows:
        f, x = r["flops"], r["vs_before"]
        md.append(f"| {r['case']} | " + " | ".join(f"{f[v] / 1e9:.0f} G ({x[v]:.3f})" if v in f else ""
                                                    for v in [*VARIANTS, "peft"]) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
