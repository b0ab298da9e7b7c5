"""Side by side on one test split and one frozen model: zero-shot (template alone), few-shot in-context
prompting (k labelled examples in the text), the trained soft prompt, and full fine-tuning of the whole model.
Each row also says what it costs: trainable parameters, bytes stored per task, training time, peak memory."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .backbones import load_backbone
from .errors import SoftPromptError
from .evaluate import evaluate
from .files import load_prompt
from .methods import PromptTuning
from .model import PromptedModel
from .precision import resolve_precision
from .tasks.datasets import load_splits
from .tasks.encode import TaskEncoder
from .tasks.spec import TaskSpec, load_task
from .train.config import RunConfig
from .train.memory import peak_memory, reset_peak

BASELINES = ("zero_shot", "few_shot", "soft_prompt", "fine_tune")


def few_shot_prefix(task: TaskSpec, tokenizer, train_rows: list[dict], k: int, seed: int, demo_tokens: int = 48) -> str:
    """k labelled examples (balanced over labels, seeded, shuffled), each the template + its label word."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for r in train_rows:
        by_label.setdefault(str(r[task.label_field]), []).append(r)
    labels = [lab for lab in task.labels if lab in by_label]
    picked = []
    for i in range(k):
        picked.append(rng.choice(by_label[labels[i % len(labels)]]))
    rng.shuffle(picked)
    field = task.truncate_field or task.fields[0]
    parts = []
    for r in picked:
        ids = tokenizer(str(r[field]), add_special_tokens=False)["input_ids"][:demo_tokens]
        values = {f: str(r[f]) for f in task.fields}
        values[field] = tokenizer.decode(ids)
        parts.append(task.template.format(**values) + task.verbalizer[str(r[task.label_field])][0] + "\n\n")
    return "".join(parts)


def _row(name: str, metrics: dict, trainable: int, bytes_per_task: int, train_s: float, memory: dict,
         **extra: Any) -> dict:
    return {"method": name, "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
            "exact_match": metrics.get("exact_match"), "n": metrics.get("n"), "trainable_params": trainable,
            "bytes_per_task": bytes_per_task, "train_seconds": round(train_s, 1), **memory, **extra,
            "confusion": metrics.get("confusion")}


def compare(cfg: RunConfig, *, prompt_file: str | None = None, baselines=BASELINES, k_shot: int = 4,
            test_examples: int | None = None, out: str | None = None, backbone: Any = None,
            splits: dict | None = None, overwrite: bool = False, say=None) -> dict:
    say = say or _progress
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise SoftPromptError(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    task = load_task(cfg.task)
    bb = backbone or load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
    splits = splits or load_splits(task.data, seed=cfg.seed)
    if task.kind != "classification" and "few_shot" in baselines:
        raise SoftPromptError("few-shot comparison needs a classification task")
    probe = TaskEncoder(task, bb.tokenizer, 0, bb.max_positions, bb.pad_token_id)
    test, _ = probe.check_rows(splits.get("test", []), "test", cfg.train.skip_bad_rows)
    if test_examples and len(test) > test_examples:
        test = random.Random(cfg.seed + 1).sample(test, test_examples)
    precision = resolve_precision(cfg.train.precision, bb.device)
    rows = []

    def run_eval(model, enc):
        model.eval()
        with torch.no_grad():
            return evaluate(model, enc, test, precision)

    if "zero_shot" in baselines:
        reset_peak()
        t0 = time.perf_counter()
        say(f"zero-shot: scoring {len(test)} test rows ...")
        m = run_eval(PromptedModel(bb, PromptTuning(torch.empty(0, bb.hidden_size))), probe)
        rows.append(_row("zero-shot (template only)", m, 0, len(task.template.encode()), 0.0, peak_memory()))
        say(f"zero-shot: {_fmt(m)} ({time.perf_counter() - t0:.0f} s)")
    if "few_shot" in baselines:
        prefix = few_shot_prefix(task, bb.tokenizer, splits["train"], k_shot, cfg.seed)
        enc = TaskEncoder(task, bb.tokenizer, 0, bb.max_positions, bb.pad_token_id, prefix=prefix)
        enc.limit = max(enc.limit, len(bb.tokenizer(prefix)["input_ids"]) + task.max_length)
        if bb.max_positions:
            enc.limit = min(enc.limit, bb.max_positions)
        reset_peak()
        t0 = time.perf_counter()
        say(f"few-shot: scoring {len(test)} test rows with {k_shot} examples in context ...")
        m = run_eval(PromptedModel(bb, PromptTuning(torch.empty(0, bb.hidden_size))), enc)
        rows.append(_row(f"few-shot ({k_shot} examples in context)", m, 0, len(prefix.encode()), 0.0, peak_memory()))
        say(f"few-shot (k={k_shot}): {_fmt(m)} ({time.perf_counter() - t0:.0f} s)")
    if "soft_prompt" in baselines:
        from .train.loop import fit

        if prompt_file:
            pf = load_prompt(prompt_file, backbone=bb)
            method = pf.build(bb.device)
            info = (pf.metadata.get("training") or {})
            train_s, mem = info.get("train_seconds", 0.0), {k: info[k] for k in ("peak_rss_mb",) if k in info}
            size = Path(prompt_file).stat().st_size
        else:
            say(f"training a soft prompt ({cfg.train.steps} steps x {cfg.train.batch_size}) ...")
            res = fit(cfg, backbone=bb, splits=splits, overwrite=overwrite)
            method = load_prompt(res.prompt_path, backbone=bb).build(bb.device)
            train_s = res.report["train_seconds"]
            mem = {k: res.report[k] for k in ("peak_rss_mb", "peak_cuda_mb") if k in res.report}
            size = res.prompt_path.stat().st_size
            prompt_file = str(res.prompt_path)
        enc = TaskEncoder(task, bb.tokenizer, method.num_virtual_tokens, bb.max_positions, bb.pad_token_id)
        t0 = time.perf_counter()
        say(f"soft prompt: scoring {len(test)} test rows ...")
        m = run_eval(PromptedModel(bb, method), enc)
        rows.append(_row(f"soft prompt ({method.num_virtual_tokens} tokens)", m, method.weight.numel(), size,
                         train_s, mem, prompt_file=prompt_file))
        say(f"soft prompt: {_fmt(m)} ({time.perf_counter() - t0:.0f} s)")
    if "fine_tune" in baselines:
        from .train.loop import fit

        say(f"full fine-tuning ({cfg.train.steps} steps x {cfg.train.batch_size}, AdamW lr {cfg.train.finetune_lr}) ...")
        import copy

        fresh = copy.deepcopy(bb)  # a private copy: the shared backbone is never touched
        t0 = time.perf_counter()
        res = fit(cfg, backbone=fresh, splits=splits, full_finetune=True)
        model = PromptedModel(fresh, PromptTuning(torch.empty(0, fresh.hidden_size)))
        m = run_eval(model, probe)
        rows.append(_row("full fine-tuning (all weights)", m, res.report["trainable_params"],
                         res.report["bytes_per_task"], res.report["train_seconds"] or time.perf_counter() - t0,
                         {k: res.report[k] for k in ("peak_rss_mb", "peak_cuda_mb") if k in res.report}))
        say(f"full fine-tuning: {_fmt(m)}")
        del fresh, model
    result = {"task": task.name, "model": cfg.model, "test_rows": len(test), "split": "test", "rows": rows}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "compare.md").write_text(markdown_table(result) + "\n")
    return result


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # progress on stderr: stdout carries the table (or --json)


def _fmt(m: dict) -> str:
    if "accuracy" in m:
        return f"accuracy {m['accuracy']:.1%}, macro-F1 {m['macro_f1']:.3f} (n={m['n']})"
    return f"exact match {m['exact_match']:.1%} (n={m['n']})"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def markdown_table(result: dict) -> str:
    head = (f"{result['task']} on {result['model']}, {result['test_rows']} test rows\n\n"
            "| method | accuracy | macro-F1 | trainable params | bytes per task | train time | peak memory |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else f"EM {r['exact_match']:.1%}"
        f1 = f"{r['macro_f1']:.3f}" if r["macro_f1"] is not None else "-"
        mem = f"{r['peak_rss_mb']:.0f} MB RSS" if r.get("peak_rss_mb") else "-"
        if r.get("peak_cuda_mb"):
            mem += f", {r['peak_cuda_mb']:.0f} MB CUDA"
        lines.append(f"| {r['method']} | {acc} | {f1} | {r['trainable_params']:,} | {_size(r['bytes_per_task'])} | "
                     f"{r['train_seconds']:.0f} s | {mem} |")
    return "\n".join(lines)
