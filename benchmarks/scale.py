"""Training step time against PEFT as the prompt length P and the sequence length T grow, same process.

    python benchmarks/scale.py [--model smollm2-135m] [--batch 8] [--prompts 1,20,100,200] [--seqs 32,64,128,256]
                               [--precision float32] [--repeats 3]

Classification step (cross-entropy over " positive"/" negative" at the last position, AdamW) on unpadded rows of
exactly T tokens cut from the running text of real reviews, so that T is what is measured. P varies at T = 64,
T varies at P = 20. Alternating runs after a warm-up, median of --repeats. Writes benchmarks/results/scale.json
and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import softprompt as sp
from softprompt.tasks.datasets import load_splits


def main() -> None:
    import peft

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", default="1,20,100,200")
    ap.add_argument("--seqs", default="32,64,128,256")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    args = ap.parse_args()
    dev = sp.backbones.resolve_device(args.device)
    bb = sp.load_backbone(args.model, device=dev, dtype="float32")
    tok = bb.tokenizer
    stream = tok(" ".join(r["text"] for r in load_splits("rotten_tomatoes")["train"][:3000]))["input_ids"]
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative")]
    base_model = bb.model
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def batch(T: int, k: int) -> dict:
        start = k * args.batch * T
        ids = torch.tensor(stream[start:start + args.batch * T], device=dev).view(args.batch, T)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "y": torch.arange(args.batch, device=dev) % 2}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    points = [(int(p), 64) for p in args.prompts.split(",")] + [(20, int(t)) for t in args.seqs.split(",") if int(t) != 64]
    for P, T in points:
        init = sp.PromptTuning.create(bb, num_virtual_tokens=P, init="vocab", seed=0).weight.detach()
        ours = sp.PromptedModel(bb, sp.PromptTuning(init.clone()).to(dev))
        ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
        theirs = peft.get_peft_model(base_model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(init)
        theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)

        def ours_step(b, ours=ours):
            h = ours.hidden_states(b["input_ids"], b["attention_mask"], last_only=True)[0][:, -1]  # as label_scores
            return torch.nn.functional.cross_entropy(ours.head(h, words).float(), b["y"])

        def theirs_step(b, theirs=theirs):
            logits = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, -1, words].float(), b["y"])

        sides = {"softprompt": (ours_step, ours_opt), "peft": (theirs_step, theirs_opt)}
        times = {s: [] for s in sides}
        for k in range(args.repeats + 1):
            b = batch(T, k)
            for s, (fn, opt) in sides.items():
                sync()
                t = time.perf_counter()
                with amp:
                    loss = fn(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                if k:  # k = 0 is the warm-up
                    times[s].append(time.perf_counter() - t)
        base_model = theirs.get_base_model()  # prompt tuning leaves the base model unchanged
        med = {s: statistics.median(v) for s, v in times.items()}
        row = {"P": P, "T": T, "median_s": med, "runs_s": times, "speedup": med["peft"] / med["softprompt"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs_s"}), flush=True)
    res = {"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "peft_version": peft.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = [f"{args.model}, {args.precision}, batch {args.batch}, unpadded rows, {res['threads']} threads, torch "
          f"{res['torch']}, peft {res['peft_version']}; one classification training step, median of {args.repeats}", "",
          "| P | T | softprompt | PEFT | speed-up |", "|---|---|---|---|---|"]
    md += [f"| {r['P']} | {r['T']} | {r['median_s']['softprompt']:.2f} s | {r['median_s']['peft']:.2f} s | "
           f"{r['speedup']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
