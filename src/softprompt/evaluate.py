"""Evaluation: accuracy, macro-F1 and a confusion matrix for classification; exact match for generation.
Scoring never asks the model to produce free text for classification: each label's words are scored by
log-likelihood at the answer position."""

from __future__ import annotations

from typing import Any

import torch

from .precision import autocast
from .tasks.encode import PAD_TOLERANCE, TaskEncoder, length_batches  # noqa: F401 (re-exported)


def classification_metrics(pred: list[int], gold: list[int], labels: list[str]) -> dict:
    n = len(labels)
    conf = [[0] * n for _ in range(n)]  # conf[gold][pred]
    for p, g in zip(pred, gold, strict=True):
        conf[g][p] += 1
    f1s = []
    for k in range(n):
        tp = conf[k][k]
        fp = sum(conf[g][k] for g in range(n)) - tp
        fn = sum(conf[k]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    present = [k for k in range(n) if sum(conf[k]) > 0 or any(conf[g][k] for g in range(n))]
    return {
        "accuracy": sum(conf[k][k] for k in range(n)) / max(1, len(gold)),
        "macro_f1": sum(f1s[k] for k in present) / max(1, len(present)),
        "recall": {labels[k]: conf[k][k] / sum(conf[k]) for k in range(n) if sum(conf[k])},  # per class
        "confusion": {"labels": labels, "matrix": conf},
        "n": len(gold),
    }


@torch.no_grad()
def evaluate_classification(model: Any, enc: TaskEncoder, rows: list[dict], batch_size: int = 16,
                            precision: str = "float32") -> dict:
    """Text or images: the task's encoder makes the batches (text: sorted by length, little padding per batch)."""
    device = model.backbone.device
    preds, gold, nll = [0] * len(rows), [enc.label_index(r) for r in rows], 0.0
    for idx, batch in enc.eval_batches(rows, batch_size, device):
        with autocast(precision, device):
            # argmax and cross-entropy over the labels ignore the softmax normaliser: label-word rows only
            scores = enc.label_scores(model, batch, normalize=False)
        for i, p in zip(idx, scores.argmax(-1).tolist(), strict=True):
            preds[i] = p
        nll += float(torch.nn.functional.cross_entropy(scores.float(), batch["y"], reduction="sum"))
    out = classification_metrics(preds, gold, enc.task.labels)
    out["loss"] = nll / max(1, len(rows))
    return out


@torch.no_grad()
def evaluate_generation(model: Any, enc: TaskEncoder, rows: list[dict], batch_size: int = 8,
                        precision: str = "float32", max_new_tokens: int = 32) -> dict:
    from .generation import generate

    device = model.backbone.device
    right, nll, count = 0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = enc.generation_batch(chunk, device)
        with autocast(precision, device):
            nll += float(model.target_loss(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        count += int((batch["labels"][:, 1:] != -100).sum())
        inputs = [enc.encode_input(r) for r in chunk]
        gen = generate(model.backbone, model.method, inputs, max_new_tokens=max_new_tokens)
        for r, text in zip(chunk, gen.texts, strict=True):
            right += text.strip().lower() == str(r[enc.task.target_field]).strip().lower()
    return {"exact_match": right / max(1, len(rows)), "loss": nll / max(1, count), "n": len(rows)}


def evaluate(model: Any, enc: TaskEncoder, rows: list[dict], precision: str = "float32", batch_size: int = 16) -> dict:
    if enc.task.kind == "classification":
        return evaluate_classification(model, enc, rows, batch_size, precision)
    if enc.task.kind == "detection":
        from .tasks.detection import evaluate_detection

        return evaluate_detection(model, enc, rows, precision, batch_size)
    return evaluate_generation(model, enc, rows, max(1, batch_size // 2), precision)


def headline(metrics: dict, select: str | None = None) -> float:
    """The number that decides 'best': `select` (accuracy, macro_f1, exact_match), by default accuracy for
    classification and exact match for generation."""
    if select and select in metrics:
        return metrics[select]
    return metrics.get("accuracy", metrics.get("exact_match", metrics.get("map", 0.0)))
