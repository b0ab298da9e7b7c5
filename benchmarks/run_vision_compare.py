"""Every image row (linear probe, VPT-shallow, VPT-deep, pixel prompt, LoRA, full fine-tuning) on Fashion-MNIST
with DINOv2 ViT-S/14, at k training images per class and on the whole training set, through `softprompt compare`
as a user runs it; each setting resumable (a stopped setting keeps its finished rows).

    python benchmarks/run_vision_compare.py [--shots 1,4,16,full] [--full-steps 200]
        -> benchmarks/results/compare_fashion_mnist.json (one entry per setting, merged as they finish)

A pixel prompt on a CNN against a linear probe and full fine-tuning (EfficientNet-Lite0, 224 px):

    python benchmarks/run_vision_compare.py --config configs/compare_fashion_mnist_efficientnet.yaml \
        --rows linear_probe,pixel_prompt,fine_tune --shots 16 --out benchmarks/results/compare_fashion_mnist_efficientnet.json

Every setting tests on the full test split (10,000 images). Beside a results file, its *_random_head.json (the heads
started random: `--head-init random`; for DINOv2 measured before train.head_init existed) or *_probe_head.json (the
heads started as the probe: `--head-init probe`, where the default start is random, as on a CNN) holds the same
settings with the other start, for the docs' tables of what the probe start changes. `--head-init` runs in its own
folder (runs/<config>_<shots>_<start>).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from run_demo import PROBE

ROWS = "linear_probe,vpt,vpt_deep,pixel_prompt,lora,fine_tune"
CONFIG = "configs/compare_fashion_mnist.yaml"
CLASSES, BATCH = 10, 16  # Fashion-MNIST's classes; the configs' batch size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", default="1,4,16,full")
    ap.add_argument("--full-steps", type=int, default=200, help="step budget on the whole training set (the few-shot settings' budget)")
    ap.add_argument("--out", default="benchmarks/results/compare_fashion_mnist.json")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--head-init", default=None, help="train.head_init for every trained row (default: the config's, auto)")
    args = ap.parse_args()
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {"settings": {}}
    merged["machine"] = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                                  check=True).stdout.strip().splitlines()[-1])
    cli = Path(sys.executable).with_name("softprompt")
    for shots in args.shots.split(","):
        folder = Path("runs") / ((f"compare_fashion_{shots}" if args.config == CONFIG else
                                  f"{Path(args.config).stem}_{shots}") + (f"_{args.head_init}" if args.head_init else ""))
        extra = ["--task.shots", "null", "--train.steps", str(args.full_steps)] if shots == "full" else \
            ["--task.shots", shots]
        if shots != "full" and int(shots) * CLASSES < BATCH:  # 1 image per class: one batch holds the whole train split
            extra += ["--train.batch_size", str(int(shots) * CLASSES)]
        if args.head_init:
            extra += ["--train.head_init", args.head_init]
        cmd = ["softprompt", "compare", args.config, "--baselines", args.rows, "--out", str(folder), "--resume",
               "--out_dir", str(folder / "runs"), *extra]
        subprocess.run([str(cli), *cmd[1:]], check=True)
        result = json.loads((folder / "compare.json").read_text())
        result["command"] = " ".join(cmd)
        result["head_init"] = args.head_init or "auto"  # auto: the heads start as a linear probe
        result["machine"] = merged["machine"]  # each setting's own: settings run at other times may differ
        merged["settings"][shots] = result
        out.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"wrote {out} ({shots})")


if __name__ == "__main__":
    main()
