"""The built-in demo (the README's first command): train a soft prompt on real reviews with a real model.

Loads SmolLM2-135M-Instruct (built in), trains a 20-token prompt to answer " positive"/" negative" after
"Review: ...\nSentiment:" on Rotten Tomatoes reviews (movie-disjoint splits, a subset so that it runs in a few
minutes on 2 CPU cores), scores zero-shot and prompted accuracy on the same test reviews, saves the prompt,
and generates with it (the prompt's key/values computed once and reused).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .backbones import load_backbone
from .data import rotten_tomatoes
from .files import save_prompt
from .generation import generate, prompt_kv
from .methods import PromptTuning
from .model import PromptedModel

TEMPLATE = "Review: {text}\nSentiment:"
LABELS = {"positive": " positive", "negative": " negative"}


def _batch(backbone, rows, max_tokens=64):
    """Left-padded ids/mask (the answer position is the last column for every row) and label indices."""
    tok = backbone.tokenizer
    ids = []
    for r in rows:
        text_ids = tok(r["text"], add_special_tokens=False)["input_ids"][:max_tokens]  # truncate the review only
        ids.append(tok(TEMPLATE.format(text=tok.decode(text_ids)))["input_ids"])
    T = max(map(len, ids))
    pad = backbone.pad_token_id
    input_ids = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=backbone.device)
    mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=backbone.device)
    y = torch.tensor([list(LABELS).index(r["label"]) for r in rows], device=backbone.device)
    return input_ids, mask, y


def label_logits(model, input_ids, mask, label_ids):
    """(B, n_labels) logits of each label word's first token at the answer position."""
    out = model(input_ids, mask, logits_to_keep=1)
    return out.logits[:, -1, label_ids].float()


@torch.no_grad()
def accuracy(model, backbone, rows, label_ids, bs=16):
    right = 0
    for i in range(0, len(rows), bs):
        ids, mask, y = _batch(backbone, rows[i:i + bs])
        right += int((label_logits(model, ids, mask, label_ids).argmax(-1) == y).sum())
    return right / len(rows)


def run(model_name: str = "smollm2-135m", steps: int = 60, batch_size: int = 8, lr: float = 3e-2,
        num_virtual_tokens: int = 20, n_test: int = 200, out: str = "runs/demo", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    bb = load_backbone(model_name)
    print(f"backbone {model_name}: loaded in {bb.load_seconds:.1f} s, "
          f"{sum(p.numel() for p in bb.model.parameters()) / 1e6:.1f}M frozen parameters")
    data = rotten_tomatoes(seed=0)
    rng = random.Random(seed)
    test = rng.sample(data["test"], min(n_test, len(data["test"])))
    label_ids = [bb.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABELS.values()]
    print(f"data: rotten_tomatoes, {len(data['train'])} train / {len(data['test'])} test reviews (movie-disjoint);"
          f" this demo trains {steps} steps x {batch_size} and tests on a {len(test)}-review sample")

    bare = PromptedModel(bb, PromptTuning(torch.empty(0, bb.hidden_size)))  # P = 0: the model alone
    zero_shot = accuracy(bare, bb, test, label_ids)
    print(f"zero-shot accuracy (template alone): {zero_shot:.1%}")

    prompt = PromptTuning.create(bb, num_virtual_tokens=num_virtual_tokens, init="labels",
                                 init_labels=list(LABELS.values()), seed=seed)
    model = PromptedModel(bb, prompt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # lr measured: see the issue note
    train = data["train"][:]
    rng.shuffle(train)
    t_train = time.perf_counter()
    for step in range(steps):
        rows = train[(step * batch_size) % len(train):][:batch_size]
        ids, mask, y = _batch(bb, rows)
        loss = torch.nn.functional.cross_entropy(label_logits(model, ids, mask, label_ids), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - t_train:.0f} s)")
    train_s = time.perf_counter() - t_train
    prompted = accuracy(model, bb, test, label_ids)
    print(f"soft-prompt accuracy: {prompted:.1%} (zero-shot {zero_shot:.1%}); trained in {train_s:.0f} s")

    path = Path(out) / "rotten_tomatoes.safetensors"
    save_prompt(path, prompt, bb, overwrite=True,
                task={"name": "rotten_tomatoes", "template": TEMPLATE, "verbalizer": LABELS},
                training={"steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "adamw",
                          "test_accuracy": prompted, "zero_shot_accuracy": zero_shot, "train_seconds": train_s})
    print(f"saved {path} ({path.stat().st_size} bytes; the backbone is {sum(p.numel() * p.element_size() for p in bb.model.parameters()) / 1e6:.0f} MB)")

    examples = [TEMPLATE.format(text=r["text"]) for r in test[:4]]
    prompt_kv(bb, prompt())  # computed once here, reused by every generate call below
    gen = generate(bb, prompt, examples, max_new_tokens=3)
    for r, text in zip(test[:4], gen.texts, strict=True):
        print(f"  [{r['label']:>8}] {r['text'][:70]!r:74} -> {text.strip()!r}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return {"zero_shot": zero_shot, "soft_prompt": prompted, "train_seconds": train_s, "path": str(path)}
