"""Prompt ensembles (Lester et al. 2021, section 7), measured as a user would run them: N prompts trained with the
same config and different seeds (`softprompt train --seed S`), then `softprompt eval` of all of them: each prompt
alone and their ensemble (mean probability and majority vote) on the test split.

    python benchmarks/ensemble.py configs/compare_minilm_rotten_tomatoes.yaml benchmarks/results/ensemble_minilm_rt.json \
        --seeds 0,1,2,3,4

Runs already trained in runs/<out stem>/seed<S> are kept (delete the folder to retrain).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from run_demo import PROBE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args()
    cli = str(Path(sys.executable).with_name("softprompt"))
    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    folder = Path("runs") / Path(args.out).stem
    seeds = [int(s) for s in args.seeds.split(",")]
    prompts, train_s = [], {}
    for seed in seeds:
        run = folder / f"seed{seed}"
        if not (run / "prompt.safetensors").exists():
            t0 = time.perf_counter()
            subprocess.run([cli, "train", args.config, "--seed", str(seed), "--out_dir", str(run), "--overwrite"],
                           check=True)
            train_s[seed] = time.perf_counter() - t0
        prompts.append(str(run / "prompt.safetensors"))
    result = {"config": args.config, "seeds": seeds, "prompts": prompts, "machine": machine,
              "command": f"python benchmarks/ensemble.py {args.config} {args.out} --seeds {args.seeds}"}
    for combine in ("mean", "vote"):
        out = subprocess.run([cli, "eval", *prompts, "--ensemble", combine, "--json"], check=True,
                             capture_output=True, text=True).stdout
        result[combine] = json.loads(out)
    m = result["mean"]
    result.update(task=(m.get("task") or ""), n=m["n"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    best = max(one["accuracy"] for one in m["members"])
    print(f"wrote {args.out}: best single {best:.1%}, ensemble mean {m['accuracy']:.1%}, "
          f"vote {result['vote']['accuracy']:.1%}")


if __name__ == "__main__":
    main()
