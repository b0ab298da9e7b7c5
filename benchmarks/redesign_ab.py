"""Before/after of a code change, softprompt's side of benchmarks/train_vs_peft.py, interleaved: for every case,
fresh processes alternate between the two source trees, so that the machine's drift (it moves by 10-40% over
minutes here) falls on both alike.

    git worktree add /tmp/before <commit before the change>
    python benchmarks/redesign_ab.py --before /tmp/before/src --after src [--rounds 3] [--repeats 3]

Each process loads the backbone and times softprompt alone (train_vs_peft.py's --child mode, the same batches).
Writes benchmarks/results/redesign_ab.json: per case and precision, every run of each side, the medians, and
after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ["train_cls", "train_gen", "score", "generate"]


def child(src: str, spec: str, args) -> dict:
    cmd = [sys.executable, str(HERE / "train_vs_peft.py"), "--child", spec, "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the src folder of the code before")
    ap.add_argument("--after", default="src", help="the src folder of the code after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="float32,bf16")
    ap.add_argument("--cases", default="train_cls,train_gen,score,generate")
    ap.add_argument("--out", default="benchmarks/results/redesign_ab.json")
    ap.add_argument("--keep", default=None,
                    help="a results JSON whose rows for the (case, precision) pairs not run now are kept")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.after).resolve()))
    from train_vs_peft import machine

    res = {"args": vars(args), "machine": machine(), "rows": []}
    for precision in args.precisions.split(","):
        for case in args.cases.split(","):
            runs: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                for side, src in (("before", args.before), ("after", args.after)):
                    runs[side] += child(src, f"softprompt:{case}:{precision}", args)["times_s"]
            med = {k: statistics.median(v) for k, v in runs.items()}
            row = {"case": case, "precision": precision, "median_s": med, "runs_s": runs,
                   "after_over_before": med["after"] / med["before"], "rounds": args.rounds,
                   "repeats": args.repeats}
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
    if args.keep:
        done = {(r["case"], r["precision"]) for r in res["rows"]}
        kept = [r for r in json.loads(Path(args.keep).read_text())["rows"] if (r["case"], r["precision"]) not in done]
        res["rows"] = sorted(res["rows"] + kept, key=lambda r: (r["precision"] != "float32", CASES.index(r["case"])))
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
