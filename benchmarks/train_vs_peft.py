"""softprompt vs a tuned Hugging Face PEFT prompt tuning: the same work, the same outputs, each side in its own process.

    python benchmarks/train_vs_peft.py [--model smollm2-135m] [--batch 8] [--seq 128] [--prompt-len 20]
                                       [--rounds 3] [--repeats 3] [--precisions auto|float32,bf16]
                                       [--cases train_cls,train_gen,score,generate] [--no-memory]

Each measurement runs in a fresh process that loads the backbone and builds one side only, so neither side ever
runs on a model the other has touched (softprompt's fast path registers an attention function and wraps modules;
PEFT wraps the model). Processes alternate between the sides, --rounds times, each timing --repeats runs after a
warm-up; the figure is the median of all runs of a side. Both sides get the same real Rotten Tomatoes reviews (the
longest of the train split, so batches are near --seq tokens), the same P-token init, the same loss, AdamW.

PEFT gets its best shot, as a competent PEFT user would write it:
  train_cls  one optimizer step, classification with a verbalizer: cross-entropy over " positive"/" negative" at the
             answer position. PEFT: its forward with logits_to_keep=1 (the LM head at the answer position only).
  train_gen  one optimizer step, generation-style targets (" The review is positive." + EOS after the review).
             PEFT: its forward with logits_to_keep = the target span + 1, cross-entropy on those positions.
  score      classification scoring of --score-rows test rows in the same length-sorted batches of 16 on both sides;
             PEFT with logits_to_keep=1.
  generate   batch 8, 32 new greedy tokens (EOS ignored). An independent reference (greedy, the whole
             [prompt embeddings ; token embeddings] recomputed at every step, no cache, one row at a time) decides
             which sides produce the right tokens (each row up to and including its first EOS: after it,
             transformers pads a finished row while the others go on): softprompt must equal it (asserted,
             float32); PEFT's cached generate, PEFT with use_cache=False and transformers'
             generate(inputs_embeds=...) are reported against it, and a speed ratio is only quoted against a side
             that produces the reference's tokens.
  bf16 training: PEFT is timed with SDPA's default kernel and with the math kernel softprompt uses, and the faster
             of the two is its figure (both recorded).
Checks before any timing (in the processes themselves): equal losses on an unpadded row (both training cases),
softprompt's scores equal an unpadded full-logits reference per row (PEFT's agreement is reported: it drops
position ids, so its padded rows differ, PEFT issue #1093).

Peak memory: per side and case in a fresh process (VmHWM, and CUDA peak on GPU), median of --memory-repeats.
Achieved FLOP/s: FLOPs counted by torch's FlopCounterMode on one step, over the median time, against this machine's
matmul rate measured in the same run. The CPU model and flags and the precision each case ran are recorded.
Writes benchmarks/results/train_vs_peft.json (the tables are rendered from it by benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

GEN_TARGET = " The review is {label}."
SIDES = ("softprompt", "peft")
GEN_SIDES = ("softprompt", "peft", "peft_nocache", "hf_embeds")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 7) -> float:
    """FLOP/s of this machine's matmul at the model's shapes (tokens x hidden x intermediate), best of shapes."""
    rates = []
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(repeats):
            ts.append(timed(lambda a=a, b=b: [a @ b for _ in range(5)], device) / 5)
        rates.append(2 * m * k * n / statistics.median(ts))
    return max(rates)


class Data:
    """The batches and rows both sides use (built from the tokenizer and the data only: no model touched)."""

    def __init__(self, args, bb, device):
        from softprompt.tasks.datasets import load_splits
        from softprompt.tasks.encode import TaskEncoder
        from softprompt.tasks.spec import load_task

        task = load_task({"builtin": "rotten_tomatoes", "max_length": args.seq})
        self.enc = TaskEncoder(task, bb.tokenizer, args.prompt_len, bb.max_positions, bb.pad_token_id)
        gen_task = load_task({"data": "rotten_tomatoes", "template": "Review: {text}\n", "target_field": "target",
                              "max_length": args.seq})
        self.gen_enc = TaskEncoder(gen_task, bb.tokenizer, args.prompt_len, bb.max_positions, bb.pad_token_id)
        splits = load_splits("rotten_tomatoes")
        rows = sorted(splits["train"], key=lambda r: -len(r["text"]))[: args.batch * (args.repeats + 2)]
        for r in rows:
            r["target"] = GEN_TARGET.format(label=r["label"])
        self.rows = rows
        self.batches = {
            "train_cls": [self.enc.classification_batch(rows[i:i + args.batch], device)
                          for i in range(0, len(rows), args.batch)],
            "train_gen": [self.gen_enc.generation_batch(rows[i:i + args.batch], device)
                          for i in range(0, len(rows), args.batch)]}
        self.test = splits["test"][: args.score_rows]
        self.label_ids = [c[0] for c in self.enc.candidates]
        # scoring: length-sorted batches of 16, the same for both sides (softprompt's evaluation order)
        from softprompt.evaluate import length_batches

        ids = [self.enc.encode_input(r) for r in self.test]
        self.score_batches = [[ids[i] for i in idx] for idx in length_batches(list(map(len, ids)), 16)]
        self.score_gold = [[self.enc.label_index(self.test[i]) for i in idx]
                           for idx in length_batches(list(map(len, ids)), 16)]
        texts = [f"Review: {r['text']}\nSentiment:" for r in self.test[:8]]
        self.gen_rows = [bb.tokenizer(t)["input_ids"] for t in texts]


def load(args, device):
    import softprompt as sp

    bb = sp.load_backbone(args.model, device=device, dtype="float32")
    init = sp.PromptTuning.create(bb, num_virtual_tokens=args.prompt_len, init="labels",
                                  init_labels=[" positive", " negative"]).weight.detach().clone()
    return bb, init


class SoftpromptSide:
    def __init__(self, args, bb, init, data, device):
        import softprompt as sp

        self.sp, self.bb, self.data, self.device = sp, bb, data, device
        self.prompt = sp.PromptTuning(init.clone()).to(device)
        self.model = sp.PromptedModel(bb, self.prompt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def loss(self, case, b):
        if case == "train_cls":  # as the training loop does it (train.loss options)
            scores = self.data.enc.label_scores(self.model, b, normalize=False)
            return torch.nn.functional.cross_entropy(scores, b["y"])
        return self.model.target_loss(b["input_ids"], b["attention_mask"], b["labels"], reduction="mean")

    def step(self, case, b, precision, kernel=None):
        with autocast(precision, self.device):
            loss = self.loss(case, b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss)

    def score(self, precision):
        from softprompt.evaluate import evaluate_classification

        self.model.eval()
        out = evaluate_classification(self.model, self.data.enc, self.data.test, batch_size=16, precision=precision)
        self.model.train()
        return out

    def scores_per_batch(self, precision):
        from softprompt.tasks.encode import left_pad

        out = []
        self.model.eval()
        with torch.no_grad(), autocast(precision, self.device):
            for ids in self.data.score_batches:
                x, m = left_pad(ids, self.data.enc.pad_id, self.device)
                out.append(self.data.enc.label_scores(self.model, {"input_ids": x, "attention_mask": m},
                                                      normalize=True).float())
        self.model.train()
        return out

    def generate(self, precision, new):
        with torch.no_grad(), autocast(precision, self.device):
            return self.sp.generate(self.bb, self.prompt, [list(r) for r in self.data.gen_rows],
                                    max_new_tokens=new).tokens


class PeftSide:
    def __init__(self, args, bb, init, data, device):
        import peft

        self.bb, self.data, self.device = bb, data, device
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prompt_len)
        self.model = peft.get_peft_model(bb.model, cfg)
        with torch.no_grad():
            self.model.prompt_encoder["default"].embedding.weight.copy_(init)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)
        self.version = peft.__version__
        self.P = args.prompt_len

    def loss(self, case, b):
        if case == "train_cls":
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1).logits
            return torch.nn.functional.cross_entropy(logits[:, -1, self.data.label_ids].float(), b["y"])
        # targets sit at the end of each left-padded row: keep the logits of the target span + 1 positions only
        labels = b["labels"]
        span = int((labels != -100).sum(1).max())
        keep = span + 1
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
        pred = logits[:, :-1].float()  # (B, span, V): position t predicts t + 1
        target = labels[:, -span:]
        return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100)

    def step(self, case, b, precision, kernel=None):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel([SDPBackend.MATH]) if kernel == "math" else contextlib.nullcontext()
        with ctx, autocast(precision, self.device):
            loss = self.loss(case, b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss)

    def full_loss(self, case, b):
        """PEFT as its docs show it (full logits, HF's loss): the equality check's second opinion."""
        if case == "train_cls":
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, -1, self.data.label_ids].float(), b["y"])
        return self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def score(self, precision):
        return self.scores_per_batch(precision, predict_only=True)

    def scores_per_batch(self, precision, predict_only=False):
        from softprompt.tasks.encode import left_pad

        out = []
        with torch.no_grad(), autocast(precision, self.device):
            for ids in self.data.score_batches:
                x, m = left_pad(ids, self.data.enc.pad_id, self.device)
                logits = self.model(input_ids=x, attention_mask=m, logits_to_keep=1).logits[:, -1].float()
                out.append(logits.argmax(-1) if predict_only else logits.log_softmax(-1)[:, self.data.label_ids])
        return out

    def generate(self, precision, new, use_cache=True):
        from softprompt.tasks.encode import left_pad

        ids, mask = left_pad([list(r) for r in self.data.gen_rows], self.bb.pad_token_id, self.device)
        with torch.no_grad(), autocast(precision, self.device):
            out = self.model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache,
                                      generation_config=greedy_config(self.bb, new))
        return out[:, -new:].tolist()


def greedy_config(bb, new: int):
    """Greedy, exactly `new` tokens, EOS neither a stop nor suppressed (min_new_tokens would forbid it: the
    reference may pick it, and so may softprompt, which ignores it as a stop here)."""
    import copy

    gc = copy.deepcopy(bb.model.generation_config)
    gc.eos_token_id = None
    gc.update(max_new_tokens=new, min_new_tokens=None, do_sample=False, pad_token_id=bb.pad_token_id,
              temperature=None, top_p=None, top_k=None)
    return gc


class HFEmbedsSide:
    """transformers' own generate on [prompt ; token] embeddings, left-padded (the prompt after each row's pads)."""

    def __init__(self, args, bb, init, data, device):
        self.bb, self.data, self.device, self.init = bb, data, device, init.to(device)

    def generate(self, precision, new):
        rows = self.data.gen_rows
        P, T = self.init.shape[0], max(map(len, rows))
        emb = self.bb.model.get_input_embeddings()
        pad = emb(torch.tensor([self.bb.pad_token_id], device=self.device))[0]
        embeds, mask = [], []
        for r in rows:
            e = torch.cat([self.init, emb(torch.tensor(r, device=self.device))])
            n = T - len(r)
            embeds.append(torch.cat([pad.expand(n, -1), e]))
            mask.append([0] * n + [1] * (P + len(r)))
        embeds = torch.stack(embeds)
        mask = torch.tensor(mask, device=self.device)
        with torch.no_grad(), autocast(precision, self.device):
            out = self.bb.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                         generation_config=greedy_config(self.bb, new))
        return out[:, -new:].tolist()


def reference_tokens(bb, init, rows, new, device) -> list[list[int]]:
    """Greedy, whole [prompt ; tokens] recomputed at every step, no cache, one row at a time, float32."""
    emb = bb.model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for r in rows:
            ids = list(r)
            got = []
            for _ in range(new):
                x = torch.cat([init.to(device), emb(torch.tensor(ids + got, device=device))])[None]
                got.append(int(bb.model(inputs_embeds=x).logits[0, -1].argmax()))
            out.append(got)
    return out


def scoring_reference(bb, init, data, device) -> list[torch.Tensor]:
    """Per row, unpadded, prompt prepended by hand, full logits: log-likelihood of each label word."""
    emb = bb.model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for ids in data.score_batches:
            rows = []
            for r in ids:
                x = torch.cat([init.to(device), emb(torch.tensor(r, device=device))])[None]
                rows.append(bb.model(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)[data.label_ids])
            out.append(torch.stack(rows))
    return out


# --- one process: one side, one case, one precision ----------------------------------------------------------

def child(args) -> dict:
    side, case, precision, kernel = (args.child.split(":") + [""])[:4]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    bb, init = load(args, device)
    data = Data(args, bb, device)
    cls = {"softprompt": SoftpromptSide, "peft": PeftSide, "peft_nocache": PeftSide, "hf_embeds": HFEmbedsSide}[side]
    s = cls(args, bb, init, data, device)
    out: dict = {"side": side, "case": case, "precision": precision, "kernel": kernel or "default"}
    if args.memory:
        with torch.no_grad():  # page every weight in (safetensors maps the file): the loaded model is resident
            sum(float(p.float().sum()) for p in bb.model.parameters())
        import gc

        from softprompt.train.memory import peak_rss_mb, reset_peak

        gc.collect()
        loaded = float(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        reset_peak()
        for b in data.batches[case][:3]:
            s.step(case, b, precision, kernel)
        out.update(peak_rss_mb=peak_rss_mb(), loaded_rss_mb=loaded)
        if device.type == "cuda":
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out
    times = []
    if case in ("train_cls", "train_gen"):
        bs = data.batches[case]
        if args.check:  # the same loss on an unpadded row, and PEFT's tuned loss equal to its plain one
            row = (data.enc.classification_batch if case == "train_cls" else data.gen_enc.generation_batch)(
                data.rows[:1], device)
            with torch.no_grad():
                out["unpadded_row_loss"] = float(s.loss(case, row))
                if side == "peft":
                    out["unpadded_row_loss_peft_as_documented"] = float(s.full_loss(case, row))
        s.step(case, bs[0], precision, kernel)  # warm-up
        for i in range(args.repeats):
            times.append(timed(lambda i=i: s.step(case, bs[1 + i % (len(bs) - 1)], precision, kernel), device))
        out["flops"] = count_flops(lambda: s.step(case, bs[1], precision, kernel))
        out["real_tokens_per_batch"] = statistics.mean(int(b["attention_mask"].sum()) for b in bs[1:])
        out["padded_tokens_per_batch"] = statistics.mean(b["attention_mask"].numel() for b in bs[1:])
    elif case == "score":
        if args.check:
            got = s.scores_per_batch(precision)
            if side == "softprompt":
                ref = scoring_reference(bb, init, data, device)
                out["max_abs_score_error_vs_reference"] = max(float((a - b).abs().max()) for a, b in zip(got, ref, strict=True))
                pred = torch.cat([a.argmax(-1) for a in got])
                out["predictions_equal_reference"] = int((pred == torch.cat([b.argmax(-1) for b in ref])).sum())
                out["rows"] = int(pred.numel())
            else:
                out["predictions"] = torch.cat([a.argmax(-1) for a in got]).tolist()
        s.score(precision)  # warm-up
        for _ in range(args.repeats):
            times.append(timed(lambda: s.score(precision), device))
        out["flops"] = count_flops(lambda: s.score(precision))
        out["rows"] = len(data.test)
    else:  # generate; EOS ignored on both sides
        new = args.new_tokens
        eos = bb.eos_token_ids
        type(bb).eos_token_ids = property(lambda self: [])  # softprompt's side never stops early either
        gen = (lambda: s.generate(precision, new, use_cache=False)) if side == "peft_nocache" else \
            (lambda: s.generate(precision, new))
        tokens = gen()  # warm-up, and the tokens to check
        for _ in range(args.repeats):
            times.append(timed(gen, device))
        out["tokens"] = tokens
        if args.check and side == "softprompt":
            out["reference"] = reference_tokens(bb, init, data.gen_rows, new, device)
            out["eos_ids"] = eos
        out["new_tokens"], out["batch"] = new, len(tokens)
    out["times_s"] = times
    return out


def run_child(args, spec: str, memory: bool = False, check: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats),
           "--score-rows", str(args.score_rows), "--new-tokens", str(args.new_tokens), "--device", args.device]
    if memory:
        cmd.append("--memory")
    if check:
        cmd.append("--check")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args, case: str, precision: str) -> dict:
    """Alternate fresh processes between the sides; medians over every run of a side."""
    specs = {s: f"{s}:{case}:{precision}" for s in (GEN_SIDES if case == "generate" else SIDES)}
    if precision == "bf16" and case in ("train_cls", "train_gen"):
        specs["peft_math"] = f"peft:{case}:{precision}:math"
    runs: dict[str, list[dict]] = {k: [] for k in specs}
    for r in range(args.rounds):
        for name, spec in specs.items():
            runs[name].append(run_child(args, spec, check=r == 0))
    times = {k: [t for run in v for t in run["times_s"]] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"case": case, "precision": precision, "median_s": med, "runs_s": times}
    first = {k: v[0] for k, v in runs.items()}
    if "flops" in first["softprompt"]:
        row["flops"] = {k: first[k]["flops"] for k in ("softprompt", "peft")}
        row["flop_per_s"] = {k: row["flops"][k] / med[k] for k in ("softprompt", "peft")}
    if case in ("train_cls", "train_gen"):
        peft_best = min(("peft", "peft_math"), key=lambda k: med.get(k, float("inf")))
        row["peft_kernel"] = "math" if peft_best == "peft_math" else "default"
        row["peft_s"] = med[peft_best]
        losses = {k: first[k]["unpadded_row_loss"] for k in ("softprompt", "peft")}
        documented = first["peft"]["unpadded_row_loss_peft_as_documented"]
        assert abs(losses["softprompt"] - losses["peft"]) < 1e-4 * max(1.0, abs(losses["peft"])), losses
        assert abs(documented - losses["peft"]) < 1e-4 * max(1.0, abs(documented)), (documented, losses)
        row["unpadded_row_loss"] = losses
        row["real_tokens_per_batch"] = first["softprompt"]["real_tokens_per_batch"]
        row["padded_tokens_per_batch"] = first["softprompt"]["padded_tokens_per_batch"]
    elif case == "score":
        ours = first["softprompt"]
        if precision == "float32":
            assert ours["max_abs_score_error_vs_reference"] < 1e-3, ours
            assert ours["predictions_equal_reference"] == ours["rows"], ours
        row["softprompt_vs_reference"] = {k: ours[k] for k in ("max_abs_score_error_vs_reference",
                                                               "predictions_equal_reference", "rows")}
        row["peft_s"] = med["peft"]
        row["rows"] = ours["rows"]
    else:
        # equal up to and including the first EOS: after it transformers pads a finished row (the same compute),
        # while the reference and softprompt (EOS ignored here) go on; what follows EOS is no one's output
        eos = set(first["softprompt"]["eos_ids"])
        ref = [_upto_eos(r, eos) for r in first["softprompt"]["reference"]]
        equal = {k: sum(_upto_eos(a, eos) == b for a, b in zip(first[k]["tokens"], ref, strict=True)) for k in specs}
        if precision == "float32":
            assert equal["softprompt"] == len(ref), equal
        row["rows_equal_reference"] = {k: f"{v}/{len(ref)}" for k, v in equal.items()}
        correct = [k for k in ("peft", "peft_nocache", "hf_embeds") if equal[k] == len(ref)]
        row["baseline"] = min(correct, key=lambda k: med[k]) if correct else None
        row["peft_s"] = med[row["baseline"]] if correct else None
        row["new_tokens"], row["batch"] = first["softprompt"]["new_tokens"], first["softprompt"]["batch"]
        row["new_tokens_per_s"] = {k: row["batch"] * row["new_tokens"] / med[k] for k in specs}
    if row.get("peft_s"):
        row["speedup"] = row["peft_s"] / med["softprompt"]
    return row


def _upto_eos(tokens: list[int], eos: set[int]) -> list[int]:
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut + 1]


def memory_rows(args, precisions: list[str], cases: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        for case in (c for c in cases if c in ("train_cls", "train_gen")):
            runs = {side: [] for side in SIDES}
            for _ in range(args.memory_repeats):
                for side in SIDES:
                    runs[side].append(run_child(args, f"{side}:{case}:{precision}", memory=True))
            got = {side: {k: statistics.median(r[k] for r in rs) for k in ("peak_rss_mb", "loaded_rss_mb")}
                   | {"runs": rs} for side, rs in runs.items()}
            s, p = got["softprompt"], got["peft"]
            row = {"case": case, "precision": precision, **got, "peak_rss_ratio": s["peak_rss_mb"] / p["peak_rss_mb"],
                   "above_loaded_ratio": (s["peak_rss_mb"] - s["loaded_rss_mb"]) / (p["peak_rss_mb"] - p["loaded_rss_mb"])}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in SIDES}), flush=True)
    return rows


def machine() -> dict:
    import peft
    import transformers

    from softprompt.precision import cpu_flags, cpu_model, native_bf16

    return {"cpu": cpu_model(), "cpu_flags": list(cpu_flags()), "native_bf16": native_bf16("cpu"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side and case (alternating)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process, after a warm-up")
    ap.add_argument("--score-rows", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--precisions", default="float32,bf16",
                    help="comma-separated; 'auto' = float32, plus bf16 where it is native")
    ap.add_argument("--cases", default="train_cls,train_gen,score,generate")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per side for peak memory")
    ap.add_argument("--out", default="benchmarks/results/train_vs_peft.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from softprompt.precision import native_bf16

    precisions = args.precisions.split(",")
    if precisions == ["auto"]:
        precisions = ["float32"] + (["bf16"] if native_bf16("cpu") else [])
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       (args.device if args.device != "auto" else "cpu"))
    res = {"args": vars(args), "machine": machine(), "device": str(dev),
           "matmul_flop_per_s": {"float32": matmul_rate(torch.float32, dev),
                                 "bf16": matmul_rate(torch.bfloat16, dev)}, "rows": []}
    print("machine:", json.dumps(res["machine"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        for case in args.cases.split(","):
            row = measure(args, case, precision)
            res["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
            out.write_text(json.dumps(res, indent=2) + "\n")  # progress, rewritten at the end
    res["memory"] = [] if args.no_memory else memory_rows(args, precisions, args.cases.split(","))
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}; tables: python benchmarks/report.py")


if __name__ == "__main__":
    main()
