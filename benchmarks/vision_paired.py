"""Is VPT-deep's lead (or lag) over the linear probe more than test-set noise? A paired test on the same 10,000
Fashion-MNIST test images, at every setting of benchmarks/results/compare_fashion_mnist.json:

    python benchmarks/vision_paired.py        # -> benchmarks/results/vision_paired.json

Both rows are re-scored as `softprompt compare` scored them (the probe refitted on the same rows, VPT-deep from the
prompt file its run kept; each accuracy checked against the results file), then compared image by image: the
images one gets right and the other wrong decide it (McNemar's exact test), and the difference in accuracy gets a
95% interval from the paired standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from run_demo import PROBE

from softprompt.backbones import load_backbone
from softprompt.compare import probe_rows
from softprompt.files import load_prompt
from softprompt.methods import from_file
from softprompt.model import PromptedModel
from softprompt.precision import autocast
from softprompt.tasks.spec import load_task, load_task_splits, task_encoder
from softprompt.train.config import load_config
from softprompt.train.probe import fit_probe

RESULTS = Path("benchmarks/results")


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p: of the b + c discordant images, a split at least this uneven under a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@torch.no_grad()
def features(bb, enc, rows, precision, batch=16) -> torch.Tensor:
    out = []
    for i in range(0, len(rows), batch):
        x = enc.batch(rows[i:i + batch], bb.device)["pixel_values"]
        with autocast(precision, bb.device):
            out.append(bb.features(x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def prompt_predictions(bb, task, prompt_path, rows, precision) -> list[int]:
    method = from_file(load_prompt(prompt_path, backbone=bb), bb.device)
    model = PromptedModel(bb, method).eval()
    enc = task_encoder(task, bb, method.num_virtual_tokens)
    preds = [0] * len(rows)
    for idx, batch in enc.eval_batches(rows, 16, bb.device):
        with autocast(precision, bb.device):
            scores = enc.label_scores(model, batch, normalize=False)
        for i, p in zip(idx, scores.argmax(-1).tolist(), strict=True):
            preds[i] = p
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS / "compare_fashion_mnist.json"))
    ap.add_argument("--config", default="configs/compare_fashion_mnist.yaml")
    ap.add_argument("--row", default="vpt_deep")
    ap.add_argument("--out", default=str(RESULTS / "vision_paired.json"))
    args = ap.parse_args()
    res = json.loads(Path(args.results).read_text())
    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    out = {"results": args.results, "row": args.row, "settings": {}, "machine": machine}
    bb = test_x = None
    for shots, setting in res["settings"].items():
        cfg = load_config(args.config, ["--task.shots", "null" if shots == "full" else shots,
                                        "--train.steps", str(setting["steps"]),
                                        "--train.batch_size", str(setting["batch_size"])])
        bb = bb or load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
        task = load_task(cfg.task)
        splits = load_task_splits(task, seed=cfg.seed)
        if not task.labels:
            task.labels = sorted({str(r[task.label_field]) for r in splits["train"]})
        probe = task_encoder(task, bb, 0)
        precision = setting["precision"]
        test, _ = probe.check_rows(splits["test"], "test", False)
        gold = [probe.label_index(r) for r in test]
        # the linear probe as compare fits it: on as many training rows as the prompts see, L2 chosen on validation
        rows, val = probe_rows(splits, probe, cfg.seed, setting["steps"] * setting["batch_size"],
                               cfg.train.eval_examples)
        head, mean, std, _ = fit_probe(features(bb, probe, rows, precision), torch.tensor([probe.label_index(r) for r in rows]),
                                       features(bb, probe, val, precision),
                                       torch.tensor([probe.label_index(r) for r in val]), task.labels)
        test_x = features(bb, probe, test, precision) if test_x is None else test_x  # the frozen model's: shared
        lp = head((test_x - mean) / std).argmax(-1).tolist()
        row = next(r for r in setting["rows"] if r["key"] == args.row)
        other = prompt_predictions(bb, task, row["prompt_file"], test, precision)
        acc = {k: sum(p == g for p, g in zip(v, gold, strict=True)) / len(gold) for k, v in (("lp", lp), ("row", other))}
        recorded = {"lp": next(r for r in setting["rows"] if r["key"] == "linear_probe")["accuracy"],
                    "row": row["accuracy"]}
        for k in acc:  # the same models as the table's, or the test says nothing about the table
            if abs(acc[k] - recorded[k]) > 1.5e-4:
                raise SystemExit(f"{shots}: re-scored {k} accuracy {acc[k]:.4f} differs from the results file's "
                                 f"{recorded[k]:.4f}")
        b = sum(p == g and q != g for p, q, g in zip(lp, other, gold, strict=True))  # only the probe right
        c = sum(q == g and p != g for p, q, g in zip(lp, other, gold, strict=True))  # only the row right
        d = (c - b) / len(gold)
        se = math.sqrt(max(0.0, (b + c) / len(gold) - d * d) / len(gold))
        out["settings"][shots] = {"n": len(gold), "linear_probe": acc["lp"], args.row: acc["row"],
                                  "only_probe_right": b, "only_row_right": c, "difference": d,
                                  "ci95": [d - 1.96 * se, d + 1.96 * se], "mcnemar_p": mcnemar(b, c)}
        print(f"{shots}: probe {acc['lp']:.4f}, {args.row} {acc['row']:.4f}, only probe right {b}, only "
              f"{args.row} right {c}, p {mcnemar(b, c):.3g}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
