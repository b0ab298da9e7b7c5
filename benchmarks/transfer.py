"""Prompt transfer (SPoT) measured: does a target task's prompt, started from a prompt trained on another task,
reach the same validation accuracy in fewer steps than one started from the vocabulary? And does the library's
retrieval pick the prompt of the same task when it has one?

    python benchmarks/transfer.py                      # MiniLM (minilm-l6): Rotten Tomatoes <-> Reuters R8
    python benchmarks/transfer.py --pairs "food<-rt,food<-r8" --library-target food \
        --out benchmarks/results/transfer_minilm_food.json   # Amazon Fine Food from a sentiment / a topic prompt
    python benchmarks/transfer.py --model smollm2-135m --steps 150

Sources: a prompt trained on each source task (seed 0). Targets (--pairs "target<-source,..."): the target task
(seed 1) from the vocabulary and from each source's prompt, validation every --every steps. Retrieval: the
--library-target (seed 2) with a library holding every source prompt (the target's own one too, when it is a
source).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import PROBE  # noqa: E402

TASKS = {"rt": "rotten_tomatoes", "r8": "reuters_r8", "food": "fine_food"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pairs", default="r8<-rt,rt<-r8", help="target<-source, comma-separated; tasks: "
                    + ", ".join(f"{k} ({v})" for k, v in TASKS.items()))
    ap.add_argument("--library-target", default="r8")
    ap.add_argument("--out", default="benchmarks/results/transfer_minilm.json")
    args = ap.parse_args()

    import softprompt as sp
    from softprompt.tasks.spec import load_task, load_task_splits
    from softprompt.train.config import build_config
    from softprompt.train.loop import fit

    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    root = Path("runs") / Path(args.out).stem
    bb = sp.load_backbone(args.model)
    pairs = [tuple(p.split("<-")) for p in args.pairs.split(",")]
    if any(len(p) != 2 or not set(p) <= set(TASKS) for p in pairs) or args.library_target not in TASKS:
        raise SystemExit(f"--pairs: target<-source with tasks from {', '.join(TASKS)}")
    used = {t for p in pairs for t in p} | {args.library_target}
    splits = {k: load_task_splits(load_task(TASKS[k]), seed=0) for k in used}

    def run(name, task, seed, init="vocab", init_file=None, steps=args.steps, every=args.every):
        cfg = build_config({"model": args.model, "task": TASKS[task], "out_dir": str(root / name), "seed": seed,
                            "method": {"num_virtual_tokens": 20, "init": init, "init_file": init_file},
                            "train": {"steps": steps, "batch_size": args.batch_size, "eval_every": every,
                                      "eval_examples": 300}})
        res = fit(cfg, backbone=bb, splits=splits[task], overwrite=True, quiet=True)
        curve = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        return res, [(m["step"], m["val_accuracy"]) for m in curve if "val_accuracy" in m]

    sources = {}
    for task in dict.fromkeys(src for _, src in pairs):
        res, _ = run(f"source_{task}", task, 0, steps=300, every=300)
        sources[task] = str(res.prompt_path)
        print(f"source {task}: validation accuracy {res.best['accuracy']:.3f}", flush=True)
    curves = {}
    for target in dict.fromkeys(t for t, _ in pairs):
        starts = [("vocabulary", "vocab", None)] + [(f"from {src}", "file", sources[src]) for t, src in pairs
                                                     if t == target]
        for how, init, f in starts:
            _, curve = run(f"{target}_{how.replace(' ', '_')}", target, 1, init, f)
            curves[f"{target} {how}"] = curve
            print(f"{target} {how}: {curve}", flush=True)
    lib = root / "library"
    lib.mkdir(parents=True, exist_ok=True)
    for task, path in sources.items():
        (lib / f"{task}.safetensors").write_bytes(Path(path).read_bytes())
    target = args.library_target
    res, _ = run(f"{target}_library", target, 2, "library", str(lib), every=args.steps)
    choice = json.loads((root / f"{target}_library" / "transfer.json").read_text())
    result = {"model": args.model, "steps": args.steps, "every": args.every, "batch_size": args.batch_size,
              "curves": curves, "library": {"target": target, "chosen": Path(choice["source"]).stem,
                                            "scores": {Path(k).stem: v for k, v in choice["scores"].items()},
                                            "probe_steps": choice["probe_steps"]},
              "machine": machine, "command": "python benchmarks/transfer.py" + "".join(
                  f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
                  if v != ap.get_default(k))}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
