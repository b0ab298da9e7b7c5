"""The demo's recipe, measured: the prompt-tuning row of `softprompt demo` under a few budgets, in float32 (what a CPU
without native bf16 computes in), on the demo's 400-review test sample.

    python benchmarks/demo_recipe.py                      # -> benchmarks/results/demo_recipe.json
    python benchmarks/demo_recipe.py A,150,1e-2,20,50     # name,steps,lr,tokens,eval_every

Each variant: AdamW at lr decaying linearly, batch 8, class-label init, validation on 200 reviews every
eval_every steps, the best prompt kept. About 5 minutes per variant on 2 cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from softprompt.backbones import load_backbone
from softprompt.compare import compare
from softprompt.precision import cpu_flags, cpu_model
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.spec import load_task
from softprompt.train.config import load_config

VARIANTS = ("A,150,1e-2,20,50", "B,150,3e-2,20,50", "C,150,3e-2,10,50", "D,200,2e-2,10,100")


def main() -> None:
    specs = sys.argv[1:] or VARIANTS
    bb = splits = None
    rows = []
    for spec in specs:
        name, steps, lr, tokens, every = spec.split(",")
        out = f"runs/demo_recipe/{name}"
        cfg = load_config(None, ["--model", "smollm2-135m", "--task", "rotten_tomatoes", "--out_dir", out,
                                 "--train.steps", steps, "--train.batch_size", "8", "--train.lr", lr,
                                 "--train.schedule", "linear", "--train.precision", "float32",
                                 "--train.eval_every", every, "--train.eval_examples", "200",
                                 "--method.num_virtual_tokens", tokens, "--method.init", "labels"])
        if bb is None:
            bb = load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
            splits = load_splits(load_task(cfg.task).data, seed=cfg.seed)
        t0 = time.perf_counter()
        r = compare(cfg, baselines=("prompt_tuning",), test_examples=400, backbone=bb, splits=splits, out=out,
                    overwrite=True, search_steps=0, say=lambda *a: None)
        row = r["rows"][0]
        rows.append({"name": name, "steps": int(steps), "lr": float(lr), "tokens": int(tokens),
                     "eval_every": int(every), "accuracy": row["accuracy"], "macro_f1": row["macro_f1"],
                     "train_seconds": row["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path("benchmarks/results/demo_recipe.json")
    out.write_text(json.dumps({"command": "python benchmarks/demo_recipe.py " + " ".join(specs),
                               "machine": {"cpu": cpu_model(), "cpu_flags": sorted(cpu_flags())},
                               "precision": "float32", "test_rows": 400, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
