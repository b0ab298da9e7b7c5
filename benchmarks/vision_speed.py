"""Image prompts' cost on the built-in DINOv2 ViT-S/14, measured in one process, alternating, median of --repeats:

1. a training step (forward, cross-entropy, backward, AdamW) of VPT-shallow, VPT-deep and a pixel prompt against
   PEFT's LoRA (r 8 on the q/v projections, PEFT's own ``get_peft_model``, with the same linear head) and full
   fine-tuning, on the same batch of Fashion-MNIST images: seconds per step and the peak RSS each adds;
2. classification throughput (images/s, no gradient) of one task against three image tasks (VPT-shallow, VPT-deep,
   pixel prompt) mixed row by row in the same batches.

    python benchmarks/vision_speed.py [--batch 16] [--size 112] [--precision auto] [--repeats 5]
        -> benchmarks/results/vision_speed.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.compare import lora_targets
from softprompt.methods import VPT, PixelPrompting
from softprompt.model import MixedPromptedModel, PromptedModel
from softprompt.precision import autocast, resolve_precision
from softprompt.tasks.images import ImageEncoder, fashion_mnist

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import PROBE  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/vision_speed.json")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    bb = sp.load_backbone("dinov2-small", device="cpu")
    precision = resolve_precision(args.precision, bb.device)
    labels = [str(i) for i in range(10)]
    rows = fashion_mnist(0)["test"][:args.batch * 8]
    enc = ImageEncoder(sp.ImageTaskSpec(labels=sorted({r["label"] for r in rows}), image_size=args.size),
                       bb.preprocessing)
    batch = enc.batch(rows[:args.batch])
    x, y = batch["pixel_values"], batch["y"]

    def prompt_step(method):
        model = PromptedModel(bb, method).train()
        opt = torch.optim.AdamW(method.parameters(), lr=1e-3)

        def step():
            with autocast(precision, bb.device):
                loss = torch.nn.functional.cross_entropy(model.classify(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in method.parameters())

    def weights_step(kind):
        net = copy.deepcopy(bb.model)
        head = torch.nn.Linear(bb.hidden_size, len(labels))
        if kind == "lora":
            net = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets(net)))
        else:
            net.requires_grad_(True)
        params = [p for p in net.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with autocast(precision, bb.device):
                feats = net(pixel_values=x).last_hidden_state[:, 0]
                loss = torch.nn.functional.cross_entropy(head(feats.float()), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in params)

    makers = {
        "vpt_shallow": lambda: prompt_step(VPT.create(bb, num_virtual_tokens=10, init_labels=labels)),
        "vpt_deep": lambda: prompt_step(VPT.create(bb, num_virtual_tokens=10, deep=True, init_labels=labels)),
        "pixel_prompt": lambda: prompt_step(PixelPrompting.create(bb, image_size=args.size, init_labels=labels)),
        "lora_peft": lambda: weights_step("lora"),
        "fine_tune": lambda: weights_step("all"),
    }
    steps, params, times, added = {}, {}, {k: [] for k in makers}, {}
    for name, make in makers.items():  # build each (and warm it twice) before any timing
        before = rss_mb()
        steps[name], params[name] = make()
        steps[name]()
        steps[name]()
        added[name] = rss_mb() - before  # peak RSS rise while building and warming (ru_maxrss only grows)
        gc.collect()
    for _ in range(args.repeats):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    train = {k: {"seconds_per_step": statistics.median(v), "trainable_params": params[k],
                 "peak_rss_added_mb": round(added[k], 1)} for k, v in times.items()}
    for k in train:
        train[k]["vs_lora"] = train[k]["seconds_per_step"] / train["lora_peft"]["seconds_per_step"]

    # serving: one task vs three tasks mixed row by row
    tasks = [VPT.create(bb, num_virtual_tokens=10, init_labels=labels, seed=1).eval(),
             VPT.create(bb, num_virtual_tokens=10, deep=True, init_labels=labels, seed=2).eval(),
             PixelPrompting.create(bb, image_size=args.size, init_labels=labels, seed=3).eval()]
    big = enc.pixels([r["image"] for r in rows])
    n = big.shape[0]

    def serve(prompts):
        with torch.no_grad(), autocast(precision, bb.device):
            for i in range(0, n, 32):
                MixedPromptedModel(bb, prompts[i:i + 32]).classify(big[i:i + 32])

    one = [tasks[0]()] * n
    mixed = [tasks[i % 3]() for i in range(n)]
    serve(one)
    serve(mixed)
    t_one, t_mixed = [], []
    for _ in range(args.repeats):
        for fn, store in ((lambda: serve(one), t_one), (lambda: serve(mixed), t_mixed)):
            t = time.perf_counter()
            fn()
            store.append(time.perf_counter() - t)
    serving = {"images": n, "batch": 32, "one_task_images_per_s": n / statistics.median(t_one),
               "three_tasks_mixed_images_per_s": n / statistics.median(t_mixed)}
    serving["mixed_vs_one"] = serving["three_tasks_mixed_images_per_s"] / serving["one_task_images_per_s"]
    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    out = {"model": "dinov2-small", "image_size": args.size, "batch": args.batch, "precision": precision,
           "repeats": args.repeats, "train": train, "serving": serving, "machine": machine,
           "command": "python benchmarks/vision_speed.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"train": train, "serving": serving}, indent=2))


if __name__ == "__main__":
    main()
