"""Where the serving engine's time goes: the continuous engine against the engine before it (a batch runs to its
end) on the same closed-loop load, with the time spent in each part of the worker summed (prefill forwards,
decode steps, picking tokens, merging new rows into the running cache, gathering the live rows when finished
ones are dropped), a request's first token split into its wait in the queue and the step it was taken into, a
prefill alone at 4 to 24 rows (the cost per request and per forward), and, in float32, a
prefill alone and beside a decode step with its products through oneDNN, MKL, and MKL feature-major with the weight
first (the `dnnl_prefill` and `transposed_products` switches).

    python benchmarks/serving_profile.py [--max-tokens 8] [--requests 128] [--concurrency 32] [--tasks 16]
        -> benchmarks/results/serving_profile.json

The parts are timed by wrapping the engine's and the decoder's own methods in this process (nothing else changes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from serving import MODES, drive, make_tasks, review_prompts, task_mix, warm_up

import softprompt as sp
from softprompt import generation
from softprompt.serve import PromptBank
from softprompt.serve.engine import Engine
from softprompt.tasks.encode import left_pad

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import PROBE  # noqa: E402

PARTS = {"prefill": (Engine, "_prefill"), "decode_step": (generation.Decoding, "advance"),
         "pick": (generation.Decoding, "pick"), "merge": (generation.Decoding, "merge"),
         "drop_finished": (generation.Decoding, "_select")}


def timed_parts() -> tuple[dict, collections.Counter]:
    spent, calls = collections.defaultdict(float), collections.Counter()
    for part, (cls, name) in PARTS.items():
        inner = getattr(cls, name)

        def wrapper(*a, _inner=inner, _part=part, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_part] += time.perf_counter() - t
                calls[_part] += 1
        setattr(cls, name, wrapper)
    return spent, calls


def timed_requests() -> tuple[list, list]:
    """Stamps each request with the time the worker took it from the queue, and records every decode step's length
    and whether a new group's prefill rode in it: a request's first token is its wait in the queue, then the step
    (or the prefill forward) it was taken into."""
    taken: list = []
    steps: list[tuple[float, bool]] = []
    take, decode_step = Engine._take, Engine._decode_step

    def timed_take(self, block):
        jobs = take(self, block)
        now = time.perf_counter()
        for job in jobs or []:
            job.taken_at = now
            taken.append(job)
        return jobs

    def timed_step(self):
        t, joint = time.perf_counter(), self._joining is not None
        decode_step(self)
        steps.append((time.perf_counter() - t, joint))
    Engine._take, Engine._decode_step = timed_take, timed_step
    return taken, steps


def first_token_parts(taken: list, steps: list) -> dict:
    jobs = [j for j in taken if j.kind == "generate" and j.first_token is not None]
    joint = [s for s, j in steps if j]
    plain = [s for s, j in steps if not j]
    return {"queue_wait_p50_s": round(statistics.median(j.taken_at - j.created for j in jobs), 4),
            "taken_to_first_token_p50_s": round(statistics.median(j.first_token - j.taken_at for j in jobs), 4),
            "steps_with_prefill": len(joint), "step_with_prefill_mean_s": round(statistics.mean(joint), 4) if joint else None,
            "steps_without": len(plain), "step_without_mean_s": round(statistics.mean(plain), 4) if plain else None}


def dnnl_ab(bb, ids: list[list[int]], prompts: list, rounds: int = 4) -> list[dict]:
    """A prefill alone (4, 8 and 24 rows) and one beside a decode step of 28 rows, with the float32 prefill
    products through oneDNN (the `dnnl_prefill` switch), through MKL as F.linear, and feature-major through MKL with
    the weight first (the `transposed_products` switch), alternated in this process; medians."""
    rt = sp.runtime(bb)
    before = rt.fastpath.config
    on = dataclasses.replace(before, dnnl_prefill=True, transposed_products=False)
    arms = (("dnnl", on), ("mkl", on.without("dnnl_prefill")),
            ("transposed", dataclasses.replace(on, dnnl_prefill=False, transposed_products=True)))

    def rows_of(n):
        return [generation.Row(generation.Sampling(max_new_tokens=256, ignore_eos=True)) for _ in range(n)]
    x, m = left_pad(ids[:28], bb.pad_token_id, bb.device)
    with torch.inference_mode():
        running = generation.Decoding(bb, prompts[:28], x, m, rows_of(28))
        running.pick()
    cases = []
    for fresh, beside in ((4, False), (8, False), (24, False), (4, True)):
        fx, fm = left_pad(ids[28:28 + fresh], bb.pad_token_id, bb.device)

        def run(fresh=fresh, beside=beside, fx=fx, fm=fm):
            with torch.inference_mode():
                new = generation.Decoding(bb, prompts[28:28 + fresh], fx, fm, rows_of(fresh), prefill=not beside)
                if beside:
                    running.advance(joining=new)
                    running.pick()
        cases.append((fresh, beside, int(fm.sum()), run))
    times: dict = collections.defaultdict(list)
    try:
        for _ in range(rounds):
            for label, config in arms:
                rt.configure(config)
                for fresh, beside, _, run in cases:
                    run()
                    runs = []
                    for _ in range(3):
                        t = time.perf_counter()
                        run()
                        runs.append(time.perf_counter() - t)
                    times[(fresh, beside, label)].append(statistics.median(runs))
    finally:
        rt.configure(before)
    return [{"new_rows": fresh, "beside_a_step_of": 28 if beside else 0, "tokens": tokens,
             "dnnl_ms": round(1000 * statistics.median(times[(fresh, beside, "dnnl")]), 1),
             "mkl_ms": round(1000 * statistics.median(times[(fresh, beside, "mkl")]), 1),
             "transposed_ms": round(1000 * statistics.median(times[(fresh, beside, "transposed")]), 1),
             "ratio": round(statistics.median(times[(fresh, beside, "mkl")])
                            / statistics.median(times[(fresh, beside, "dnnl")]), 3)}
            for fresh, beside, tokens, _ in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the backbone's default)")
    ap.add_argument("--out", default="benchmarks/results/serving_profile.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = sp.load_backbone(args.model, dtype=args.dtype)
    texts = review_prompts(bb, args.requests)
    spent, calls = timed_parts()
    taken, steps = timed_requests()
    out: dict = {"engines": {}, "prefill_alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        names = make_tasks(bb, Path(tmp), args.tasks)
        bank = PromptBank(bb, Path(tmp))
        warm_up(Engine(bank, max_batch=32), names, texts)
        requests = list(zip(task_mix(names, args.requests, "uniform"), texts, strict=True))
        for mode in ("d_mixed_kv_reuse", "f_batch_to_end"):
            spent.clear()
            calls.clear()
            taken.clear()
            steps.clear()
            engine = Engine(bank, max_batch=32, **MODES[mode]).start()
            load = drive(engine, requests, args.concurrency, args.max_tokens)
            engine.stop()
            if "merge" in spent:  # the prefill part includes its merge: counted once, under merge
                spent["prefill"] -= spent["merge"]
            out["engines"][mode] = {**{k: round(v, 4) for k, v in load.items()},
                                    "parts_s": {k: round(spent[k], 3) for k in PARTS if k in spent},
                                    "calls": {k: calls[k] for k in PARTS if k in calls},
                                    "first_token": first_token_parts(taken, steps)}
            print(mode, json.dumps(out["engines"][mode]), flush=True)
        ids = [bb.tokenizer(t)["input_ids"] for t in texts]
        prompts = [bank.get(names[i % len(names)]).prompt for i in range(len(ids))]
        for rows in (4, 8, 16, 24, 4, 8, 16, 24):  # the first pass warms every size
            x, m = left_pad(ids[:rows], bb.pad_token_id, bb.device)
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.inference_mode():
                    generation.Decoding(bb, prompts[:rows], x, m,
                                        [generation.Row(generation.Sampling(max_new_tokens=8)) for _ in range(rows)])
                runs.append(time.perf_counter() - t)
            out["prefill_alone"] = [r for r in out["prefill_alone"] if r["rows"] != rows] + [{
                "rows": rows, "tokens": int(m.sum()), "seconds": round(statistics.median(runs), 4),
                "ms_per_request": round(1000 * statistics.median(runs) / rows, 1)}]
        out["dnnl_prefill"] = dnnl_ab(bb, ids, prompts) if bb.dtype == torch.float32 else None
    out["machine"] = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                               check=True).stdout.strip().splitlines()[-1])
    out["args"] = vars(args)
    out["command"] = " ".join(["python benchmarks/serving_profile.py", *sys.argv[1:]])
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["prefill_alone"]))


if __name__ == "__main__":
    main()
