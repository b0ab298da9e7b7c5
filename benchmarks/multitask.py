"""The wall time of N tasks trained in one multi-task run against the same N tasks trained one after another, on
the same loaded model, in one process, the two orders alternating; and whether each task's prompt is the same.

    python benchmarks/multitask.py                       # SmolLM2-135M, 4 tasks, 40 steps x 8 each
    python benchmarks/multitask.py --steps 20 --repeats 1

The tasks: Rotten Tomatoes and Reuters R8 (two verbalizers each: the built-in one and a plainer one), each its own
prompt of 20 tokens, seed and run folder. Validation only at the last step (the same work in both ways).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import PROBE  # noqa: E402

TASKS = [
    "rotten_tomatoes",
    {"builtin": "rotten_tomatoes", "name": "rt_plain", "template": "{text}\nThis review is",
     "verbalizer": {"positive": " good", "negative": " bad"}},
    "reuters_r8",
    {"builtin": "reuters_r8", "name": "r8_plain", "template": "{text}\nThe topic is"},
]


def configs(root: Path, steps: int, model: str, precision: str):
    from softprompt.train.config import build_config

    return [build_config({"model": model, "task": task, "out_dir": str(root / f"task{i}"), "seed": i,
                          "method": {"num_virtual_tokens": 20, "init": "vocab"},
                          "train": {"steps": steps, "batch_size": 8, "eval_every": steps, "eval_examples": 64,
                                    "precision": precision}})
            for i, task in enumerate(TASKS)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default="benchmarks/results/multitask.json")
    args = ap.parse_args()
    import subprocess

    import softprompt as sp
    from softprompt.tasks.spec import load_task, load_task_splits
    from softprompt.train.loop import fit
    from softprompt.train.multi import fit_many

    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    bb = sp.load_backbone(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        splits = [load_task_splits(load_task(c.task), seed=c.seed) for c in configs(root, 1, args.model, "auto")]
        times: dict[str, list[float]] = {"one run": [], "one after another": []}
        same = []
        for rep in range(args.repeats):
            order = ["one run", "one after another"] if rep % 2 == 0 else ["one after another", "one run"]
            results = {}
            for way in order:
                cfgs = configs(root / f"{rep}-{way.replace(' ', '_')}", args.steps, args.model, args.precision)
                t0 = time.perf_counter()
                if way == "one run":
                    results[way] = fit_many(cfgs, backbone=bb, splits=splits, quiet=True)
                else:
                    results[way] = [fit(c, backbone=bb, splits=s, quiet=True) for c, s in zip(cfgs, splits,
                                                                                            strict=True)]
                times[way].append(time.perf_counter() - t0)
                print(f"repeat {rep + 1}, {way}: {times[way][-1]:.1f} s", flush=True)
            for a, b in zip(results["one run"], results["one after another"], strict=True):
                ta, tb = sp.load_prompt(a.prompt_path).tensors, sp.load_prompt(b.prompt_path).tensors
                same.append(max(float((ta[k] - tb[k]).abs().max()) for k in ta))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "tasks": [t if isinstance(t, str) else t["name"] for t in TASKS],
              "steps": args.steps, "batch_size": 8, "repeats": args.repeats, "precision": args.precision,
              "seconds": times, "median_s": med, "speedup": med["one after another"] / med["one run"],
              "max_prompt_difference": max(same), "machine": machine,
              "command": "python benchmarks/multitask.py" + "".join(
                  f" --{k} {v}" for k, v in (("steps", args.steps), ("repeats", args.repeats))
                  if v != ap.get_default(k))}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: one run {med['one run']:.1f} s, one after another {med['one after another']:.1f} s "
          f"({result['speedup']:.2f}x); prompts differ by at most {max(same):.2e}")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
