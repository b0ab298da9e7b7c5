"""Each fast-path switch on and off, in one process, through the public switches (softprompt.FastPathConfig).

    python benchmarks/speedups.py [--repeats 5] [--precisions auto] [--cases train_cls,train_gen,score]

Variants, alternating after a warm-up, median of --repeats: `on` (every switch: the default), `-<switch>` (that
switch off, the others on: what it buys), `off` (the plain path: the model's own forward, full logits). The data,
cases and losses are benchmarks/train_vs_peft.py's (softprompt's side). For the training cases the bytes autograd
keeps for backward (distinct storages, parameters excepted) are counted too: deterministic, unlike peak RSS.
Before timing, every variant's loss on one batch is asserted equal to `on`'s (float32: 1e-5). Writes
benchmarks/results/speedups.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from train_vs_peft import Data, SoftpromptSide, autocast, load, machine, timed

import softprompt as sp
from softprompt.fastpath import SWITCHES, FastPathConfig


def variants() -> dict[str, FastPathConfig]:
    on = FastPathConfig()
    out = {"on": on}
    for s in SWITCHES:
        if getattr(on, s):  # a switch that is on by default: what it buys
            out[f"-{s}"] = on.without(s)
    out["off"] = FastPathConfig(enabled=False)
    return out


def kept_mb(fn) -> float:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-rows", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--precisions", default="auto")
    ap.add_argument("--cases", default="train_cls,train_gen,score")
    ap.add_argument("--out", default="benchmarks/results/speedups.json")
    args = ap.parse_args()
    from softprompt.precision import native_bf16

    precisions = args.precisions.split(",")
    if precisions == ["auto"]:
        precisions = ["float32"] + (["bf16"] if native_bf16("cpu") else [])
    dev = torch.device(args.device)
    bb, init = load(args, dev)
    data = Data(args, bb, dev)
    side = SoftpromptSide(args, bb, init, data, dev)
    rt = sp.runtime(bb)
    table = variants()
    res = {"args": vars(args), "machine": machine(), "repeats": args.repeats, "variants": list(table), "rows": []}
    for precision in precisions:
        for case in args.cases.split(","):
            times: dict[str, list[float]] = {v: [] for v in table}
            row: dict = {"case": case, "precision": precision}
            if case == "score":
                row["rows"] = len(data.test)
                run = {v: (lambda p=precision: side.score(p)) for v in table}
            else:
                bs = data.batches[case]
                run = {v: (lambda c=case, b=bs[1], p=precision: side.step(c, b, p)) for v in table}
                with torch.no_grad():
                    losses = {}
                    for v, cfg in table.items():
                        rt.configure(cfg)
                        losses[v] = float(side.loss(case, bs[1]))
                    tol = 1e-5 if precision == "float32" else 2e-2
                    assert all(abs(x - losses["on"]) <= tol * max(1.0, abs(losses["on"])) for x in losses.values()), \
                        losses
                row["kept_mb"] = {}
                for v, cfg in table.items():
                    rt.configure(cfg)
                    with autocast(precision, dev):
                        row["kept_mb"][v] = kept_mb(lambda c=case, b=bs[1]: side.loss(c, b).backward())
                    side.opt.zero_grad(set_to_none=True)
            for v, cfg in table.items():  # warm-up
                rt.configure(cfg)
                run[v]()
            for _ in range(args.repeats):
                for v, cfg in table.items():
                    reinstalled = not rt.fastpath.installed and cfg.enabled
                    rt.configure(cfg)
                    if reinstalled:  # back from `off`: the fast path's state (bf16 weight casts) is made again
                        run[v]()
                    times[v].append(timed(run[v], dev))
            row["median_s"] = {v: statistics.median(t) for v, t in times.items()}
            row["runs_s"] = times
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
    rt.configure(FastPathConfig())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}; tables: python benchmarks/report.py")


if __name__ == "__main__":
    main()
