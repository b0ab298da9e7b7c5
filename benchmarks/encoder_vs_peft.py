"""softprompt vs PEFT prompt tuning on a text encoder (MiniLM): the same work, the same outputs.

    python benchmarks/encoder_vs_peft.py [--batch 32] [--seq 64] [--prompt-len 20] [--repeats 15] [--rounds 3]

One training step (forward, backward, AdamW) of a 20-token prompt and a linear head on mean-pooled final states
(MiniLM's own pooling), batch 32 x 64 tokens of real Rotten Tomatoes reviews (right-padded, as PEFT needs: it
passes no position ids), and scoring the same batch without gradient. PEFT: `get_peft_model(BertModel,
PromptTuningConfig(task_type=FEATURE_EXTRACTION))`, the prompt prepended by PEFT, the head and pooling written as a
PEFT user would (the prompt's positions dropped, the mean over the real tokens). Both start from the same prompt
and head; the losses on the batch must agree (checked before timing). Each side gets its own copy of the model;
the two alternate, --rounds times, each timing --repeats steps after warm-up; the figure is the median.
Writes benchmarks/results/encoder_vs_peft.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import PROBE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/encoder_vs_peft.json")
    args = ap.parse_args()
    from peft import PromptTuningConfig, TaskType, get_peft_model

    import softprompt as sp
    from softprompt.tasks.datasets import load_splits

    machine = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                        check=True).stdout.strip().splitlines()[-1])
    bb = sp.load_backbone(args.model, device="cpu")
    tok = bb.tokenizer
    rows = sorted(load_splits("rotten_tomatoes", seed=0)["train"], key=lambda r: -len(r["text"]))[:args.batch]
    b = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=args.seq,
            return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    y = torch.tensor([int(r["label"] == "positive") for r in rows])
    P = args.prompt_len

    ours = sp.Headed.create_for(sp.PromptTuning.create(bb, num_virtual_tokens=P, init="vocab"), bb, 2, 0, "mean")
    model = sp.PromptedModel(bb, ours)

    peft_base = copy.deepcopy(bb.encoder)
    peft = get_peft_model(peft_base, PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=P))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(ours.inner.weight)
    head = torch.nn.Linear(bb.hidden_size, 2)
    with torch.no_grad():
        head.weight.copy_(ours.head_weight)
        head.bias.copy_(ours.head_bias)

    def ours_logits():
        return model.classify_tokens(ids, mask)

    def peft_logits():
        states = peft(input_ids=ids, attention_mask=mask).last_hidden_state[:, P:]  # the prompt's positions dropped
        w = mask.unsqueeze(-1).to(states.dtype)
        return head((states * w).sum(1) / w.sum(1))

    with torch.no_grad():
        a, b_ = ours_logits(), peft_logits()
    agree = float((a - b_).abs().max())
    assert agree < 1e-4, f"the two sides disagree by {agree}"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt_peft = torch.optim.AdamW([*[p for p in peft.parameters() if p.requires_grad], *head.parameters()], lr=1e-2)

    def step(logits_fn, opt):
        loss = torch.nn.functional.cross_entropy(logits_fn(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def score(logits_fn):
        with torch.no_grad():
            logits_fn()

    cases = {"train step": {"softprompt": lambda: step(ours_logits, opt_ours),
                            "peft": lambda: step(peft_logits, opt_peft)},
             "scoring": {"softprompt": lambda: score(ours_logits), "peft": lambda: score(peft_logits)}}
    times = {c: {s: [] for s in sides} for c, sides in cases.items()}
    for rnd in range(args.rounds):
        for case, sides in cases.items():
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for side in order:
                for _ in range(3):
                    sides[side]()  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    sides[side]()
                    times[case][side].append(time.perf_counter() - t0)
    rows_out = []
    for case in cases:
        med = {s: statistics.median(v) for s, v in times[case].items()}
        rows_out.append({"case": case, "median_s": med, "speedup": med["peft"] / med["softprompt"]})
        print(f"{case}: softprompt {med['softprompt'] * 1e3:.1f} ms, PEFT {med['peft'] * 1e3:.1f} ms "
              f"({med['peft'] / med['softprompt']:.2f}x)")
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "prompt_len": P, "rounds": args.rounds,
              "repeats": args.repeats, "max_logit_difference": agree, "rows": rows_out, "machine": machine,
              "threads": torch.get_num_threads(), "command": "python benchmarks/encoder_vs_peft.py"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
