"""What a second OpenMP thread pool costs the serving worker, and what handing the first one back gives.

A server loads and warms its model on one thread and decodes on another (the engine's worker). torch's CPU
operations run through OpenMP, and each thread that starts a parallel region keeps a pool of OpenMP workers; with
more pooled threads than cores, libgomp stops spinning between regions. This times, in one process, round after
round: an element-wise product and the serving worker's steps (a decode step of 28 running rows, and the same step
with 4 new requests' prefill riding in it) on the model's own thread, on a second thread while the first thread's
pool is kept, and on a second thread after the first thread handed its pool back (`Engine.start` does that:
softprompt/runtime/threads.py).

    python benchmarks/openmp_threads.py [--model smollm2-135m] [--rounds 3] --out benchmarks/results/openmp_threads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from serving import make_tasks, review_prompts
from train_vs_peft import machine

import softprompt as sp
from softprompt.generation import Decoding, Row, Sampling
from softprompt.runtime.threads import release_openmp_threads
from softprompt.serve import PromptBank
from softprompt.tasks.encode import left_pad

CASES = {"main": "the model's own thread", "kept": "a second thread, the first thread's pool kept",
         "released": "a second thread, the first thread's pool handed back"}


def workloads(bb, bank, names, texts, steps: int):
    ids = [bb.tokenizer(t)["input_ids"] for t in texts]
    prompts = [bank.get(names[i % len(names)]).prompt for i in range(len(ids))]

    def group(at: int, n: int, prefill: bool) -> Decoding:
        x, m = left_pad(ids[at:at + n], bb.pad_token_id, bb.device)
        rows = [Row(Sampling(max_new_tokens=4 * steps, ignore_eos=True)) for _ in range(n)]
        return Decoding(bb, prompts[at:at + n], x, m, rows, capacity=32, prefill=prefill)

    def elementwise() -> dict:
        x, y = torch.randn(160, 576), torch.randn(160, 576)
        for _ in range(50):
            x * y
        times = []
        for _ in range(2000):
            t = time.perf_counter()
            x * y
            times.append(time.perf_counter() - t)
        return {"elementwise_us": 1e6 * statistics.median(times)}

    def serving_steps() -> dict:
        dec = group(0, 28, True)
        dec.pick()
        for _ in range(3):
            dec.advance()
            dec.pick()
        plain, joint = [], []
        for _ in range(steps):
            t = time.perf_counter()
            dec.advance()
            dec.pick()
            plain.append(time.perf_counter() - t)
            new = group(100, 4, False)  # the same 4 requests every time: the same work in every case
            t = time.perf_counter()
            dec.advance(new)  # their prefill rides in the step (not merged: the batch stays at 28 rows)
            new.pick()
            dec.pick()
            joint.append(time.perf_counter() - t)
        return {"decode_step_ms": 1e3 * statistics.median(plain), "joint_step_ms": 1e3 * statistics.median(joint)}

    def run() -> dict:
        with torch.inference_mode():
            return {**elementwise(), **serving_steps()}
    return run


def on_thread(fn) -> dict:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(fn()))
    thread.start()
    thread.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each kind per case and round")
    ap.add_argument("--out", default="benchmarks/results/openmp_threads.json")
    args = ap.parse_args()
    bb = sp.load_backbone(args.model)
    texts = review_prompts(bb, 128)
    warm = torch.randn(1 << 20)
    rounds: dict[str, list[dict]] = {c: [] for c in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        names = make_tasks(bb, Path(tmp), 16)
        run = workloads(bb, PromptBank(bb, Path(tmp)), names, texts, args.steps)
        run()  # warm-up (the first thread's pool exists from here on)
        for r in range(args.rounds):
            for case in CASES:
                (warm * 2).sum()  # a parallel region on the first thread: its pool exists
                if case == "released":
                    if not release_openmp_threads():
                        raise SystemExit("openmp_threads: torch does not run on libgomp here; nothing to hand back")
                rounds[case].append(run() if case == "main" else on_thread(run))
                print(r, case, {k: round(v, 1) for k, v in rounds[case][-1].items()}, flush=True)
    result = {"model": args.model, "rounds": args.rounds, "steps": args.steps, "running_rows": 28, "joining": 4,
              "elementwise_shape": [160, 576], "machine": machine(), "command": " ".join(["python", *sys.argv]),
              "cases": {case: {"name": CASES[case], **{k: statistics.median(x[k] for x in rounds[case])
                                                       for k in rounds[case][0]}, "rounds": rounds[case]}
                        for case in CASES}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({c: {k: round(v, 1) for k, v in r.items() if k not in ("name", "rounds")}
                      for c, r in result["cases"].items()}))


if __name__ == "__main__":
    main()
