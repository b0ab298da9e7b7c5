"""Before/after of each frozen-backbone speed-up switch (softprompt.model.SPEEDUPS), with PEFT, in one process.

    python benchmarks/speedups.py [--repeats 5] [--precisions float32,bf16] [--cases train_cls,train_gen,score]
    python benchmarks/speedups.py --compile --cases score      # + a torch.compile'd MLP for scoring (measured, not kept)

Variants of softprompt, alternating with PEFT after a warm-up, median of --repeats:
  on                     every switch on (the default)
  -<switch>              that switch off, the others on: what the switch buys
  off                    unpadded_mlp, gated_mlp_memory, cached_weight_casts and sdpa_gqa all off (the path before them)
  compiled_mlp           (--compile, scoring) the decoder MLPs through one torch.compile'd gated-MLP function
Switches: unpadded_mlp (each decoder MLP on the real tokens only), gated_mlp_memory (a gated MLP keeps its two
projections for backward, not three tensors), cached_weight_casts (bf16 autocast: frozen weights cast once, not at
every forward), sdpa_gqa (SDPA on the key/value heads, not on repeated copies).
Besides time, the training cases count the bytes autograd keeps for backward (distinct storages, parameters
excepted; deterministic, unlike peak RSS). Cases and data are benchmarks/train_vs_peft.py's. Before timing, every
variant's loss on one batch is asserted equal to `on`. Writes benchmarks/results/speedups.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from train_vs_peft import Bench, autocast, bench_args, timed

import softprompt as sp
import softprompt.model as model_module

SWITCHES = ["unpadded_mlp", "gated_mlp_memory", "cached_weight_casts", "sdpa_gqa"]
_DEFAULTS = dict(model_module.SPEEDUPS)
_PLANNED_MLP = model_module._planned_mlp


def variants(compile_mlp: bool) -> dict[str, dict]:
    out = {"on": {}, **{f"-{k}": {k: False} for k in SWITCHES}, "off": dict.fromkeys(SWITCHES, False)}
    if compile_mlp:
        out["compiled_mlp"] = {"compiled_mlp": True}
    return out


def compiled_mlp():
    """A torch.compile'd gated MLP (act(gate(h)) * up(h) -> down) used in place of the eager one where no
    gradient is needed; weights are arguments, so one compiled graph serves every layer."""
    F = torch.nn.functional

    @torch.compile(dynamic=True)
    def fused(h, wg, wu, wd):
        return F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)

    def planned(mlp, x, plan):
        parts = model_module._gated_parts(mlp)
        if torch.is_grad_enabled() or parts is None or not model_module._is_silu(parts[3]):
            return _PLANNED_MLP(mlp, x, plan)
        casts = getattr(model_module._THREAD, "casts", None)
        w = [casts.weight(m) if casts else m.weight for m in parts[:3]]
        planned.used += 1
        return model_module._planned_rows(lambda h: fused(h, *w), x, plan, mlp is plan.last)

    planned.used = 0  # calls that took the compiled path (asserted > 0 after the warm-up)
    return planned


def use(name: str, table: dict, compiled=None) -> None:
    model_module.SPEEDUPS.update(_DEFAULTS)
    switches = dict(table[name])
    model_module._planned_mlp = compiled if switches.pop("compiled_mlp", False) else _PLANNED_MLP
    model_module.SPEEDUPS.update(switches)


def reset() -> None:
    model_module.SPEEDUPS.update(_DEFAULTS)
    model_module._planned_mlp = _PLANNED_MLP


def kept_for_backward(bench: Bench, case: str, precision: str) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training step's forward, parameters
    excepted (bf16: the cast copies of the weights count)."""
    params = {p.untyped_storage().data_ptr() for p in bench.bb.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    b = bench.batches(case)[1]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, bench.device):
        loss = bench.loss("softprompt", case, b)
    del loss
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_args(ap)
    ap.add_argument("--cases", default="train_cls,train_gen,score")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd MLP (scoring only)")
    ap.add_argument("--variants", help="comma-separated subset of the variants to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/speedups.json")
    args = ap.parse_args()
    dev = sp.backbones.resolve_device(args.device)
    bench = Bench(args, dev)
    table = variants(args.compile)
    if args.variants:
        table = {k: v for k, v in table.items() if k in args.variants.split(",") or k == "on"}
    compiled = compiled_mlp() if args.compile else None
    losses = {}
    for case in ("train_cls", "train_gen"):
        with torch.no_grad():
            for v in table:
                use(v, table, compiled)
                losses[f"{case}/{v}"] = float(bench.loss("softprompt", case, bench.batches(case)[0]))
        reset()
        ref = losses[f"{case}/on"]
        assert all(abs(x - ref) < 1e-4 * max(1, abs(ref)) for k, x in losses.items() if k.startswith(case)), losses
    print("equal losses:", losses, flush=True)
    rows = []
    for precision in args.precisions.split(","):
        for case in args.cases.split(","):
            names = [v for v in table if case == "score" or v != "compiled_mlp"]
            sides = [*names, "peft"]

            def run(side, i, case=case, precision=precision):
                if side == "peft":
                    reset()
                else:
                    use(side, table, compiled)
                who = "peft" if side == "peft" else "softprompt"
                try:
                    if case == "score":
                        return bench.score(who, precision)
                    bs = bench.batches(case)
                    return bench.step(who, case, bs[1 + i % (len(bs) - 1)], precision)
                finally:
                    reset()

            for s in sides:  # warm-up (and the compile, for compiled_mlp)
                run(s, 0)
            if "compiled_mlp" in names:
                assert compiled.used > 0, "the compiled MLP never ran"
            times = {s: [] for s in sides}
            for i in range(args.repeats):
                for s in sides:
                    times[s].append(timed(lambda s=s, i=i: run(s, i), dev))
            med = {s: statistics.median(v) for s, v in times.items()}
            row = {"case": case, "precision": precision, "median_s": med, "runs_s": times,
                   "speedup_vs_peft": {s: med["peft"] / med[s] for s in names},
                   "time_vs_on": {s: med[s] / med["on"] for s in names}}
            if case != "score":
                kept = {}
                for v in names:
                    use(v, table, compiled)
                    try:
                        kept[v] = kept_for_backward(bench, case, precision)
                    finally:
                        reset()
                row["kept_for_backward_mb"] = {v: n / 2**20 for v, n in kept.items()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
    res = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "peft_version": bench.peft_version, "equal_losses": losses, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    names = {"train_cls": "train step, classification", "train_gen": "train step, generation targets",
             "score": f"scoring {args.score_rows} test rows"}
    cols = list(table)
    md = [f"{args.model}, batch {args.batch}, P = {args.prompt_len}, {res['threads']} threads, torch {res['torch']}, "
          f"peft {res['peft_version']}; median of {args.repeats}, alternating. Time (in brackets: speed-up against "
          "PEFT); for training, below it the MB autograd keeps for backward.", "",
          "| case | precision | " + " | ".join(cols) + " | PEFT |", "|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        m, x = r["median_s"], r["speedup_vs_peft"]
        md.append(f"| {names[r['case']]} | {r['precision']} | " + " | ".join(
            f"{m[v]:.2f} s ({x[v]:.2f}x)" if v in m else "" for v in cols) + f" | {m['peft']:.2f} s |")
        if "kept_for_backward_mb" in r:
            k = r["kept_for_backward_mb"]
            md.append("| kept for backward | | " + " | ".join(f"{k[v]:.0f} MB" if v in k else "" for v in cols) + " | |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
