"""softprompt vs Hugging Face PEFT prompt tuning: training, scoring and generation, same process, same everything.

    python benchmarks/train_vs_peft.py [--model smollm2-135m] [--batch 8] [--seq 128] [--prompt-len 20]
                                       [--repeats 5] [--precisions float32,bf16] [--cases train_cls,train_gen,score,generate]

One loaded backbone that PEFT wraps (the same weights, the same P-token init on both sides), the same real Rotten
Tomatoes reviews (the longest of the train split, so that batches are near --seq tokens), the same loss, AdamW.
Cases, each in float32 and bf16 autocast:
  train_cls  one optimizer step, classification with a verbalizer: cross-entropy over " positive"/" negative" at
             the answer position (PEFT: its forward, full logits, label columns of the last position)
  train_gen  one optimizer step, generation-style targets: loss on the target tokens " The review is positive."
             + EOS after the review (PEFT: its forward with labels, HF's loss over full logits)
  score      classification scoring of --score-rows test rows, forward only: softprompt as `softprompt eval` does
             it (length-bucketed batches of 16); PEFT's forward in split order, full logits
  generate   batch 8, 32 new greedy tokens (EOS ignored on both sides), sp.generate vs PEFT's generate
Runs alternate between the two sides after a warm-up; the median of --repeats is reported with the ratio
PEFT / softprompt. Before timing, equal losses on an unpadded row are asserted for both training cases. Peak
memory is measured per side and case in a fresh subprocess (VmHWM of the whole process, and CUDA peak allocation
on GPU), so that one side's freed memory never hides in the other's figure. Achieved FLOP/s: FLOPs counted by
torch's FlopCounterMode on one step, divided by the median time, against this machine's fp32 and bf16 matmul rates
measured in the same run. Writes benchmarks/results/train_vs_peft.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.evaluate import evaluate_classification
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.encode import TaskEncoder, left_pad
from softprompt.tasks.spec import load_task
from softprompt.train.memory import peak_rss_mb, reset_peak

GEN_TARGET = " The review is {label}."


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 7) -> float:
    """FLOP/s of this machine's matmul at the model's shapes (tokens x hidden x intermediate), median."""
    rates = []
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            sync(device)
            ts.append((time.perf_counter() - t) / 5)
        rates.append(2 * m * k * n / statistics.median(ts))
    return max(rates)


class Bench:
    """Both sides, built once: the backbone, batches, and a step / score / generate function per side."""

    def __init__(self, args, device: torch.device):
        import peft

        self.args, self.device = args, device
        bb = sp.load_backbone(args.model, device=device, dtype="float32")
        self.bb = bb
        task = load_task({"builtin": "rotten_tomatoes", "max_length": args.seq})
        enc = TaskEncoder(task, bb.tokenizer, args.prompt_len, bb.max_positions, bb.pad_token_id)
        gen_task = load_task({"data": "rotten_tomatoes", "template": "Review: {text}\n", "target_field": "target",
                              "max_length": args.seq})
        self.enc, self.gen_enc = enc, TaskEncoder(gen_task, bb.tokenizer, args.prompt_len, bb.max_positions,
                                                  bb.pad_token_id)
        splits = load_splits("rotten_tomatoes")
        rows = sorted(splits["train"], key=lambda r: -len(r["text"]))[: args.batch * (args.repeats + 2)]
        for r in rows:
            r["target"] = GEN_TARGET.format(label=r["label"])
        self.rows = rows
        self.cls_batches = [enc.classification_batch(rows[i:i + args.batch], device)
                            for i in range(0, len(rows), args.batch)]
        self.gen_batches = [self.gen_enc.generation_batch(rows[i:i + args.batch], device)
                            for i in range(0, len(rows), args.batch)]
        self.test = splits["test"][: args.score_rows]
        self.label_ids = [c[0] for c in enc.candidates]
        init = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="labels",
                                      init_labels=[" positive", " negative"]).weight.detach()
        self.ours_prompt = sp.PromptTuning(init.clone()).to(device)
        self.ours = sp.PromptedModel(bb, self.ours_prompt)
        self.ours_opt = torch.optim.AdamW(self.ours.parameters(), lr=1e-2)
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prompt_len)
        self.theirs = peft.get_peft_model(bb.model, cfg)
        with torch.no_grad():
            self.theirs.prompt_encoder["default"].embedding.weight.copy_(init)
        self.theirs_opt = torch.optim.AdamW([p for p in self.theirs.parameters() if p.requires_grad], lr=1e-2)
        self.peft_version = peft.__version__

    # --- losses --------------------------------------------------------------------------------------
    def loss(self, side: str, case: str, b: dict) -> torch.Tensor:
        if side == "softprompt":
            if case == "train_cls":  # as the training loop does it (train.loss options)
                return torch.nn.functional.cross_entropy(self.enc.label_scores(self.ours, b, normalize=False), b["y"])
            return self.ours.target_loss(b["input_ids"], b["attention_mask"], b["labels"], reduction="mean")
        if case == "train_cls":
            logits = self.theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, P+T, V)
            return torch.nn.functional.cross_entropy(logits[:, -1, self.label_ids].float(), b["y"])
        return self.theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def step(self, side: str, case: str, b: dict, precision: str) -> float:
        ckpt = side == "softprompt_ckpt"  # softprompt with train.activation_checkpointing
        side = "softprompt" if ckpt else side
        opt = self.ours_opt if side == "softprompt" else self.theirs_opt
        self.ours.activation_checkpointing = ckpt
        try:
            with autocast(precision, self.device):
                loss = self.loss(side, case, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            self.ours.activation_checkpointing = False
        return float(loss)

    def batches(self, case: str) -> list[dict]:
        return self.cls_batches if case == "train_cls" else self.gen_batches

    def check_equal(self) -> dict:
        """Same init, one unpadded row: the same loss on both sides (PEFT drops position ids, so padded batches
        differ: under left padding its pads sit between prompt and text, PEFT issue #1093)."""
        out = {}
        with torch.no_grad():
            for case, b in (("train_cls", self.enc.classification_batch(self.rows[:1], self.device)),
                            ("train_gen", self.gen_enc.generation_batch(self.rows[:1], self.device))):
                a, c = float(self.loss("softprompt", case, b)), float(self.loss("peft", case, b))
                assert abs(a - c) < 1e-4 * max(1.0, abs(a)), (case, a, c)
                out[case] = {"softprompt": a, "peft": c}
        return out

    # --- scoring and generation ----------------------------------------------------------------------
    def score(self, side: str, precision: str) -> None:
        if side == "softprompt":
            self.ours.eval()
            evaluate_classification(self.ours, self.enc, self.test, batch_size=16, precision=precision)
            self.ours.train()
            return
        ids = [self.enc.encode_input(r) for r in self.test]
        with torch.no_grad(), autocast(precision, self.device):
            for i in range(0, len(ids), 16):
                x, m = left_pad(ids[i:i + 16], self.enc.pad_id, self.device)
                self.theirs(input_ids=x, attention_mask=m).logits[:, -1, self.label_ids].float().argmax(-1)

    def gen_inputs(self):
        texts = [f"Review: {r['text']}\nSentiment:" for r in self.test[:8]]
        ids, mask = left_pad([self.bb.tokenizer(t)["input_ids"] for t in texts], self.bb.pad_token_id, self.device)
        return texts, ids, mask

    def generate(self, side: str, precision: str, new: int) -> list[list[int]]:
        texts, ids, mask = self.gen_inputs()
        with torch.no_grad(), autocast(precision, self.device):
            if side == "softprompt":
                return sp.generate(self.bb, self.ours_prompt, texts, max_new_tokens=new).tokens
            out = self.theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=self.bb.pad_token_id)
            return out[:, -new:].tolist()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run_case(bench: Bench, case: str, precision: str, repeats: int, ckpt: bool = False) -> dict:
    dev = bench.device
    sides = ("softprompt", "peft")
    if ckpt and case in ("train_cls", "train_gen"):
        sides = ("softprompt", "peft", "softprompt_ckpt")
    times: dict[str, list[float]] = {s: [] for s in sides}
    flops = {}
    if case in ("train_cls", "train_gen"):
        bs = bench.batches(case)
        for s in sides:  # warm-up
            bench.step(s, case, bs[0], precision)
        for i in range(repeats):
            for s in sides:
                times[s].append(timed(lambda s=s, i=i: bench.step(s, case, bs[1 + i % (len(bs) - 1)], precision), dev))
        for s in ("softprompt", "peft"):
            flops[s] = count_flops(lambda s=s: bench.step(s, case, bs[1], precision))
        tokens = {"real_tokens_per_batch": statistics.mean(int(b["attention_mask"].sum()) for b in bs[1:]),
                  "padded_tokens_per_batch": statistics.mean(b["attention_mask"].numel() for b in bs[1:])}
    elif case == "score":
        for s in sides:
            bench.score(s, precision)
        for _ in range(repeats):
            for s in sides:
                times[s].append(timed(lambda s=s: bench.score(s, precision), dev))
        for s in sides:
            flops[s] = count_flops(lambda s=s: bench.score(s, precision))
        tokens = {"rows": len(bench.test)}
    else:
        new = bench.args.new_tokens
        orig = type(bench.bb).eos_token_ids
        type(bench.bb).eos_token_ids = property(lambda self: [])  # our side never stops early either
        try:
            outs = {}
            for s in sides:
                bench.generate(s, precision, 4)
            for _ in range(repeats):
                for s in sides:
                    times[s].append(timed(lambda s=s: outs.__setitem__(s, bench.generate(s, precision, new)), dev))
        finally:
            type(bench.bb).eos_token_ids = orig
        same = sum(a == b for a, b in zip(outs["softprompt"], outs["peft"], strict=True))
        tokens = {"new_tokens": new, "batch": 8, "greedy_rows_equal": f"{same}/8",
                  "new_tokens_per_s": {s: 8 * new / statistics.median(times[s]) for s in sides}}
    med = {s: statistics.median(v) for s, v in times.items()}
    row = {"case": case, "precision": precision, "median_s": med, "runs_s": times,
           "speedup": med["peft"] / med["softprompt"], **tokens}
    if "softprompt_ckpt" in med:
        row["ckpt_time_ratio"] = med["softprompt_ckpt"] / med["softprompt"]
    if flops:
        row["flops"] = flops
        row["flop_per_s"] = {s: flops[s] / med[s] for s in flops}
    return row


def probe_memory(args) -> None:
    """In a fresh process: set up one side, then peak RSS (and CUDA peak) over warm-up + 2 steps of one case."""
    side, case, precision = args.probe_memory.split(":")
    dev = sp.backbones.resolve_device(args.device)
    bench = Bench(args, dev)  # side softprompt_ckpt: step() turns activation checkpointing on
    bs = bench.batches(case)
    import gc

    with torch.no_grad():  # page every weight in (safetensors maps the file): the loaded model is resident
        sum(float(p.float().sum()) for p in bench.bb.model.parameters())
    gc.collect()
    loaded = float(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    reset_peak()
    for b in bs[:3]:
        bench.step(side, case, b, precision)
    out = {"peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded}
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("MEMORY " + json.dumps(out))


def memory_rows(args, precisions: list[str], cases: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        for case in cases:
            if case not in ("train_cls", "train_gen"):
                continue
            runs = {side: [] for side in ("softprompt", "peft", "softprompt_ckpt")}
            for _ in range(args.memory_repeats):  # peak RSS varies with the allocator: sides interleaved, median
                for side in runs:
                    cmd = [sys.executable, __file__, "--probe-memory", f"{side}:{case}:{precision}", "--model",
                           args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--prompt-len",
                           str(args.prompt_len), "--repeats", str(args.repeats), "--device", args.device]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    runs[side].append(json.loads(proc.stdout.split("MEMORY ")[-1]))
            got = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
                   for side, rs in runs.items()}
            row = {"case": case, "precision": precision, **{s: got[s] for s in got},
                   "peak_rss_ratio": got["softprompt"]["peak_rss_mb"] / got["peft"]["peak_rss_mb"],
                   "above_loaded_ratio": (got["softprompt"]["peak_rss_mb"] - got["softprompt"]["loaded_rss_mb"])
                   / (got["peft"]["peak_rss_mb"] - got["peft"]["loaded_rss_mb"]),
                   "ckpt_peak_rss_ratio": got["softprompt_ckpt"]["peak_rss_mb"] / got["peft"]["peak_rss_mb"]}
            if "peak_cuda_mb" in got["softprompt"]:
                row["peak_cuda_ratio"] = got["softprompt"]["peak_cuda_mb"] / got["peft"]["peak_cuda_mb"]
            rows.append(row)
            print(json.dumps(row))
    return rows


CASE_NAMES = {"train_cls": "train step, classification (verbalizer)", "train_gen": "train step, generation targets",
              "score": "scoring {rows} test rows", "generate": "generate, batch 8 x {new} new tokens"}


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"{a['model']}, batch {a['batch']} x <= {a['seq']} tokens, P = {a['prompt_len']}, {res['threads']} threads, "
             f"torch {res['torch']}, peft {res['peft_version']}, device {res['device']}; median of {a['repeats']}, "
             "alternating, after a warm-up. Matmul rate of this machine (same run): "
             f"float32 {res['matmul_flop_per_s']['float32'] / 1e9:.0f} GFLOP/s, "
             f"bf16 {res['matmul_flop_per_s']['bf16'] / 1e9:.0f} GFLOP/s.", "",
             "| case | precision | softprompt | PEFT | speed-up | softprompt GFLOP/s (% of the matmul rate of its "
             "precision) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = CASE_NAMES[r["case"]].format(rows=r.get("rows"), new=r.get("new_tokens"))
        fl = ""
        if "flop_per_s" in r:
            f = r["flop_per_s"]["softprompt"]
            fl = f"{f / 1e9:.0f} ({100 * f / res['matmul_flop_per_s'][r['precision']]:.0f}%)"
        lines.append(f"| {name} | {r['precision']} | {r['median_s']['softprompt']:.2f} s | {r['median_s']['peft']:.2f} s "
                     f"| {r['speedup']:.2f}x | {fl} |")
    ck = [r for r in res["rows"] if "ckpt_time_ratio" in r]
    if ck:
        lines += ["", "Time cost of activation checkpointing (train.activation_checkpointing, same run, alternating):", "",
                  "| case | precision | softprompt | softprompt, checkpointing | time ratio | PEFT / checkpointing |",
                  "|---|---|---|---|---|---|"]
        for r in ck:
            m = r["median_s"]
            lines.append(f"| {CASE_NAMES[r['case']]} | {r['precision']} | {m['softprompt']:.2f} s | "
                         f"{m['softprompt_ckpt']:.2f} s | {r['ckpt_time_ratio']:.2f} | "
                         f"{m['peft'] / m['softprompt_ckpt']:.2f}x |")
    if res.get("memory"):
        lines += ["", f"Peak memory of one training step (fresh process per side, median of {a['memory_repeats']}: "
                  "whole-process peak RSS; in brackets the peak above the process after set-up with every weight "
                  "resident, i.e. what training adds to the loaded model):", "",
                  "| case | precision | softprompt | PEFT | ratio | ratio above set-up | softprompt, activation "
                  "checkpointing | ratio |", "|---|---|---|---|---|---|---|---|"]
        for m in res["memory"]:
            s, p = m["softprompt"], m["peft"]
            lines.append(f"| {CASE_NAMES[m['case']]} | {m['precision']} | {s['peak_rss_mb']:.0f} MB "
                         f"(+{s['peak_rss_mb'] - s['loaded_rss_mb']:.0f}) | {p['peak_rss_mb']:.0f} MB "
                         f"(+{p['peak_rss_mb'] - p['loaded_rss_mb']:.0f}) | {m['peak_rss_ratio']:.2f} | "
                         f"{m['above_loaded_ratio']:.2f} | {m['softprompt_ckpt']['peak_rss_mb']:.0f} MB "
                         f"(+{m['softprompt_ckpt']['peak_rss_mb'] - m['softprompt_ckpt']['loaded_rss_mb']:.0f}) | "
                         f"{m['ckpt_peak_rss_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def bench_args(ap: argparse.ArgumentParser) -> None:
    """The options that Bench reads, shared by the scripts built on it."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-rows", type=int, default=128)
    ap.add_argument("--precisions", default="float32,bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_args(ap)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cases", default="train_cls,train_gen,score,generate")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="skip the timed cases")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per side for peak memory")
    ap.add_argument("--ckpt", action="store_true", help="also time training steps with activation checkpointing")
    ap.add_argument("--probe-memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/train_vs_peft.json")
    args = ap.parse_args()
    if args.probe_memory:
        return probe_memory(args)
    dev = sp.backbones.resolve_device(args.device)
    precisions, cases = args.precisions.split(","), args.cases.split(",")
    rates = {"float32": matmul_rate(torch.float32, dev), "bf16": matmul_rate(torch.bfloat16, dev)}
    print("matmul GFLOP/s:", {k: round(v / 1e9) for k, v in rates.items()})
    bench = Bench(args, dev)
    res = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "peft_version": bench.peft_version, "matmul_flop_per_s": rates, "equal_losses": bench.check_equal(),
           "rows": []}
    print("equal losses on an unpadded row:", res["equal_losses"])
    for precision in precisions:
        for case in [] if args.memory_only else cases:
            row = run_case(bench, case, precision, args.repeats, args.ckpt)
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")  # progress, rewritten at the end
    del bench
    res["memory"] = [] if args.no_memory else memory_rows(args, precisions, cases)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
