"""A linear probe: multinomial logistic regression on a model's features, fitted full batch by L-BFGS.

It is the compare table's "linear probe" row, and where an image task's head starts (``train.head_init: probe``):
the head is first fitted, as a probe, to the features the model gives with the prompt as initialised, then prompt
and head train from there (linear probing, then fine-tuning: Kumar et al. 2022). A head that starts random has to
catch up with the probe inside the step budget before the prompt's gradients mean much; with few images per class
it does not (measured in docs/vision.md).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

from ..evaluate import classification_metrics
from ..precision import autocast
from ..prompts import Head

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
L2_DEFAULT = 1e-3  # without validation rows


def fit_logistic(x: torch.Tensor, y: torch.Tensor, k: int, weight: torch.Tensor, l2: float) -> torch.nn.Linear:
    """Weighted multinomial logistic regression, full batch, L-BFGS, from zeros (no randomness drawn)."""
    head = torch.nn.Linear(x.shape[1], k)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y, weight=weight) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.eval().requires_grad_(False)


def fit_probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None, yv: torch.Tensor | None,
              labels: list[str]) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, float]:
    """(head, mean, std, l2): a probe on standardised features ((x - mean) / std), classes weighted by
    n / (classes * count), its L2 strength the best of L2_GRID by macro-F1 on (xv, yv) (L2_DEFAULT without them)."""
    k = len(labels)
    mean, std = x.mean(0), x.std(0, correction=0 if len(x) < 2 else 1) + 1e-6
    counts = torch.bincount(y, minlength=k).float()
    weight = len(y) / (k * counts.clamp(min=1))
    if xv is None or not len(xv):
        return fit_logistic((x - mean) / std, y, k, weight, L2_DEFAULT), mean, std, L2_DEFAULT
    best = None
    for l2 in L2_GRID:
        head = fit_logistic((x - mean) / std, y, k, weight, l2)
        pred = head((xv - mean) / std).argmax(-1)
        score = classification_metrics(pred.tolist(), yv.tolist(), labels)["macro_f1"]
        if best is None or score > best[0]:
            best = (score, l2, head)
    _, l2, head = best
    return head, mean, std, l2


def folded(head: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe as a head on raw features: W (x - m) / s + b = (W / s) x + (b - (W / s) m)."""
    w = head.weight / std
    return w, head.bias - w @ mean


@torch.no_grad()
def prompted_features(model: Any, enc: Any, rows: list[dict], precision: str, batch: int = 32) -> torch.Tensor:
    """(N, F) float32 features of images through `model` with its prompt (dropout off): the prompt's own join, its
    head swapped for the identity."""
    prompt = model.method()
    features = prompt.head.weight.shape[1]
    eye = Head(torch.eye(features, device=prompt.head.weight.device), prompt.head.weight.new_zeros(features))
    prompt = dataclasses.replace(prompt, head=eye)
    out = []
    for i in range(0, len(rows), batch):
        x = enc.batch(rows[i:i + batch], model.backbone.device)["pixel_values"]
        with autocast(precision, model.backbone.device):
            out.append(model.join.classify_rows(model.backbone, [prompt], x)[0].float().cpu())
    return torch.cat(out)


def probe_head(model: Any, enc: Any, train_rows: list[dict], val_rows: list[dict], labels: list[str], precision: str,
               rows: int, seed: int) -> dict:
    """Fit the probe on (a seeded sample of `rows` of) train_rows through the prompted model and write it into the
    method's head (head_weight, head_bias). Returns what was done (for the run's log)."""
    method = model.method
    was_training = model.training
    model.eval()
    try:
        sample = random.Random(seed).sample(train_rows, min(rows, len(train_rows)))
        x = prompted_features(model, enc, sample, precision)
        y = torch.tensor([enc.label_index(r) for r in sample])
        xv = prompted_features(model, enc, val_rows, precision) if val_rows else None
        yv = torch.tensor([enc.label_index(r) for r in val_rows]) if val_rows else None
        head, mean, std, l2 = fit_probe(x, y, xv, yv, labels)
    finally:
        model.train(was_training)
    w, b = folded(head, mean, std)
    with torch.no_grad():
        method.head_weight.copy_(w)
        method.head_bias.copy_(b)
    return {"rows": len(sample), "l2": l2}
