"""Every method and baseline side by side on one test split and one frozen model, in one table.

Rows (``--baselines``, any subset, in this order):

- ``zero_shot``: the template alone; ``few_shot``: k labelled examples in context (prompt engineering);
- ``linear_probe``: a class-balanced logistic-regression head on the frozen model's last-token features (the
  cheapest trained baseline), trained on the same rows the prompts see;
- the prompt methods (``prompt_tuning``, ``residual``, ``p_tuning``, ``prefix_tuning``, ``p_tuning_v2``): the
  backbone frozen, a file of kilobytes per task;
- ``lora`` (PEFT's LoRA: adapters on the attention projections) and ``fine_tune`` (every weight), trained on a
  private copy of the backbone: the comparison rows that change weights.

Every trained row gets the same step budget and batches, keeps its best validation step, and has its learning
rate chosen on validation from a small grid (each candidate trained for ``search_steps``, the winner then for the
full budget; the grid, every candidate's score and the choice are recorded). Each row also says what it costs
(trainable parameters, bytes stored per task, training time, peak memory) and whether the task can share a
serving batch on one frozen backbone with other tasks.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .backbones import load_backbone
from .errors import SoftPromptError
from .evaluate import classification_metrics, evaluate
from .files import load_prompt
from .methods import PromptTuning, from_file
from .model import PromptedModel
from .precision import autocast, resolve_precision
from .tasks.encode import TaskEncoder, left_pad
from .tasks.spec import TaskSpec, load_task, load_task_splits, task_encoder
from .train.config import RunConfig
from .train.memory import peak_memory, reset_peak
from .train.probe import fit_probe

IMAGE_METHODS = {"vpt": {"name": "vpt"}, "vpt_deep": {"name": "vpt", "deep": True},
                 "pixel_prompt": {"name": "pixel_prompt"}, "coop": {"name": "coop"},
                 "cocoop": {"name": "cocoop"}}  # row -> method args (image tasks; coop/cocoop: a CLIP backbone)
DETECTION_METHODS = {"linear_probe": {"name": "vpt", "num_virtual_tokens": 0}, "vpt": {"name": "vpt"},
                     "vpt_deep": {"name": "vpt", "deep": True}}  # detection rows trained by the loop (set loss)
PROMPT_METHODS = ("prompt_tuning", "residual", "p_tuning", "prefix_tuning", "p_tuning_v2", *IMAGE_METHODS)
BASELINES = ("zero_shot", "few_shot", "linear_probe", *PROMPT_METHODS, "lora", "fine_tune")
TEXT_ONLY = {"zero_shot", "few_shot", "prompt_tuning", "residual", "p_tuning", "prefix_tuning", "p_tuning_v2"}
ALIASES = {"soft_prompt": "prompt_tuning"}
DEFAULT_BASELINES = ("zero_shot", "few_shot", "prompt_tuning", "fine_tune")

# Learning-rate grids, chosen on validation: a prompt needs a far larger lr than a weight (REFERENCE: AdamW 1e-2
# measured best for prompt tuning on SmolLM2), reparameterised prompts sit between, LoRA and full fine-tuning use
# the usual ranges for adapters and weights.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "prompt_tuning": (3e-3, 1e-2, 3e-2), "residual": (3e-3, 1e-2, 3e-2), "p_tuning": (3e-4, 1e-3, 3e-3),
    "prefix_tuning": (3e-4, 1e-3, 3e-3), "p_tuning_v2": (3e-3, 1e-2, 3e-2), "lora": (1e-4, 3e-4, 1e-3),
    "fine_tune": (1e-5, 2e-5, 5e-5), "vpt": (3e-3, 1e-2, 3e-2), "vpt_deep": (3e-3, 1e-2, 3e-2),
    "pixel_prompt": (3e-3, 1e-2, 3e-2), "coop": (3e-4, 1e-3, 2e-3), "cocoop": (3e-4, 1e-3, 2e-3),
    "linear_probe": (3e-3, 1e-2, 3e-2),  # a detector's class head alone, trained by the loop (text/images: L-BFGS)
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}

NAMES = {"zero_shot": "zero-shot (template only)", "few_shot": "few-shot ({k} examples in context)",
         "linear_probe": "linear probe (frozen features)", "prompt_tuning": "prompt tuning ({p} tokens)",
         "residual": "residual prompt tuning ({p} tokens)", "p_tuning": "P-tuning ({p} tokens)",
         "prefix_tuning": "prefix tuning ({p} tokens per layer)", "p_tuning_v2": "P-tuning v2 ({p} tokens per layer)",
         "lora": "LoRA (r 8, q/v projections)", "fine_tune": "full fine-tuning (all weights)",
         "vpt": "VPT-shallow ({p} tokens)", "vpt_deep": "VPT-deep ({p} tokens per layer)",
         "pixel_prompt": "pixel prompt (border)", "coop": "CoOp ({p} context tokens)",
         "cocoop": "CoCoOp ({p} context tokens)", "detection_probe": "class head only (frozen detector)"}
SHARES = {"lora": "no: its own weights", "fine_tune": "no: its own model"}  # every other row: yes


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


def _row(key: str, name: str, metrics: dict, trainable: int, bytes_per_task: int, train_s: float, memory: dict,
         **extra: Any) -> dict:
    return {"key": key, "method": name, "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
            "exact_match": metrics.get("exact_match"), "map": metrics.get("map"), "test_loss": metrics.get("loss"), "recall": metrics.get("recall"), "n": metrics.get("n"),
            "trainable_params": trainable, "bytes_per_task": bytes_per_task, "train_seconds": round(train_s, 1),
            "shares_batch": SHARES.get(key, "yes"), **memory, **extra, "confusion": metrics.get("confusion")}


def probe_rows(splits: dict, encoder: Any, seed: int, n: int, eval_examples: int | None) -> tuple[list, list]:
    """The rows the linear probe row is fitted on: n training rows (at most the split, seeded) and the validation
    rows its L2 strength is chosen on (at most eval_examples, seeded); rows the encoder cannot take left out."""
    rows = [r for r in splits["train"] if encoder.row_problem(r) is None]
    rows = random.Random(seed).sample(rows, min(n, len(splits["train"]), len(rows)))
    val = [r for r in splits.get("validation", []) if encoder.row_problem(r) is None]
    if eval_examples and len(val) > eval_examples:
        val = random.Random(seed).sample(val, eval_examples)
    return rows, val


class _Compare:
    """One comparison: the backbone, the data, the test rows, and a runner per row kind."""

    def __init__(self, cfg: RunConfig, bb, splits, test, precision, out, say, search_steps, lr_grids, overwrite):
        self.cfg, self.bb, self.splits, self.test = cfg, bb, splits, test
        self.task = load_task(cfg.task)
        self.precision, self.out, self.say = precision, out, say
        self.search_steps, self.lr_grids, self.overwrite = search_steps, lr_grids, overwrite
        self.probe = task_encoder(self.task, bb, 0)
        self.images = getattr(self.task, "modality", "text") == "image"
        self.detection = self.task.kind == "detection"

    def test_metrics(self, model, enc) -> dict:
        model.eval()
        with torch.no_grad():
            return evaluate(model, enc, self.test, self.precision)

    def bare(self) -> PromptedModel:
        return PromptedModel(self.bb, PromptTuning(torch.empty(0, self.bb.hidden_size)).to(self.bb.device))

    # --- learning rates chosen on validation -----------------------------------------------------------
    def choose_lr(self, key: str, train) -> tuple[float | None, dict]:
        """Each lr of the grid trained for search_steps; the best validation score wins (recorded)."""
        grid = tuple(sorted(self.lr_grids.get(key) or ()))
        if len(grid) <= 1:
            return (grid[0] if grid else None), {}
        scores: dict[str, float] = {}

        def trial(lr: float) -> None:
            res = train(lr, self.search_steps, f"search/lr_{lr:g}")
            scores[f"{lr:g}"] = (res.best and _score(res.best)) or 0.0
            self.say(f"  {key}: lr {lr:g} -> validation {scores[f'{lr:g}']:.4f} ({self.search_steps} steps)")

        for lr in grid:
            trial(lr)
        tried = list(grid)
        best = max(tried, key=lambda lr: scores[f"{lr:g}"])
        # the winner at an edge of a grid of three or more: one more step beyond it (the grid's own ratio), once, so
        # that a grid stopping short of the best value does not report its edge as the choice
        edge = {grid[-1]: grid[-1] * grid[-1] / grid[-2], grid[0]: grid[0] * grid[0] / grid[1]}.get(best) \
            if len(grid) >= 3 else None
        if edge is not None:
            edge = float(f"{edge:.3g}")
            trial(edge)
            tried.append(edge)
            best = max(tried, key=lambda lr: scores[f"{lr:g}"])
        return best, {"lr_grid": sorted(tried), "lr_validation": scores, "search_steps": self.search_steps}

    def _cfg(self, sub: str, steps: int, **train) -> RunConfig:
        out = str(Path(self.out or self.cfg.out_dir) / sub)
        # a task head (a text encoder's; an image task's beside the weights) trains at the config's lr in every row:
        # the rows differ in what they add to the frozen model, not in how their common head learns
        head = self.cfg.train.head_lr if self.cfg.train.head_lr is not None else self.cfg.train.lr
        return replace(self.cfg, out_dir=out, train=replace(self.cfg.train, steps=steps, head_lr=head, **train))

    # --- rows ----------------------------------------------------------------------------------------------
    def prompt_method(self, key: str) -> dict:
        from .train.loop import fit

        args = (DETECTION_METHODS if self.detection else IMAGE_METHODS).get(key, {"name": key})

        def train(lr, steps, sub):
            cfg = replace(self._cfg(f"{key}/{sub}", steps, lr=lr), method=replace(self.cfg.method, **args))
            return fit(cfg, backbone=self.bb, splits=self.splits, overwrite=True, quiet=True)

        lr, chosen = self.choose_lr(key, train)
        lr = lr or self.cfg.train.lr
        self.say(f"{key}: training ({self.cfg.train.steps} steps x {self.cfg.train.batch_size}, lr {lr:g}) ...")
        if not chosen and key == self.cfg.method.name:  # the config's own run, in its run folder (as `train`)
            res = fit(self.cfg, backbone=self.bb, splits=self.splits, overwrite=self.overwrite)
        else:
            res = train(lr, self.cfg.train.steps, "final")
        return self.prompt_row(key, res.prompt_path, res.report, lr=lr, **chosen)

    def prompt_row(self, key: str | None, prompt_path, report: dict | None = None, **extra) -> dict:
        pf = load_prompt(prompt_path, backbone=self.bb)
        method = from_file(pf, self.bb.device)
        info = report or pf.metadata.get("training") or {}
        enc = task_encoder(self.task, self.bb, method.num_virtual_tokens)
        m = self.test_metrics(PromptedModel(self.bb, method), enc)
        key = key or pf.method
        name = NAMES["detection_probe" if self.detection and key == "linear_probe" else key] \
            if key in NAMES else key
        name = name.format(p=method.num_virtual_tokens)
        trainable = info.get("trainable_params", sum(t.numel() for t in pf.tensors.values()))
        memory = {k: info[k] for k in ("peak_rss_mb", "peak_cuda_mb") if k in info}
        return _row(key, name, m, trainable, Path(prompt_path).stat().st_size, info.get("train_seconds", 0.0),
                    memory, prompt_file=str(prompt_path), **extra)

    def weights(self, key: str) -> dict:
        """LoRA or full fine-tuning, each on a private copy of the backbone (the shared one is never touched)."""
        from .train.loop import fit

        field = "finetune_lr" if key == "fine_tune" else "lora_lr"

        def train(lr, steps, sub):
            fresh = self.private_copy(key)
            res = fit(self._cfg(f"{key}/{sub}", steps, **{field: lr}), backbone=fresh, splits=self.splits,
                      weights="all" if key == "fine_tune" else "lora", quiet=True)
            return res, fresh

        lr, chosen = self.choose_lr(key, lambda lr, steps, sub: train(lr, steps, sub)[0])
        lr = lr or getattr(self.cfg.train, field)
        self.say(f"{key}: training ({self.cfg.train.steps} steps x {self.cfg.train.batch_size}, lr {lr:g}) ...")
        res, fresh = train(lr, self.cfg.train.steps, "final")
        m = self.test_metrics(PromptedModel(fresh, res.method), self.probe)  # images: with the head it trained
        memory = {k: res.report[k] for k in ("peak_rss_mb", "peak_cuda_mb") if k in res.report}
        row = _row(key, NAMES[key], m, res.report["trainable_params"], res.report["bytes_per_task"],
                   res.report["train_seconds"], memory, lr=lr, best_step=res.best_step, **chosen)
        del fresh
        return row

    def private_copy(self, key: str):
        fresh = copy.deepcopy(self.bb)
        if key == "lora":
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError:
                raise SoftPromptError("the lora row needs PEFT: pip install 'softprompt[peft]'") from None
            inject_adapter_in_model(LoraConfig(**{**LORA, "target_modules": lora_targets(fresh.model)}), fresh.model)
            fresh.model.eval()
        return fresh

    def linear_probe(self) -> dict:
        """A logistic-regression head on the frozen model's final hidden state at the answer position, classes
        weighted by n / (classes * count), its L2 strength chosen on validation; trained on as many training rows as
        the prompts see (steps x batch)."""
        rows, val = probe_rows(self.splits, self.probe, self.cfg.seed,
                               self.cfg.train.steps * self.cfg.train.batch_size, self.cfg.train.eval_examples)
        t0 = time.perf_counter()
        reset_peak()
        x, y = self.features(rows), torch.tensor([self.probe.label_index(r) for r in rows])
        xv, yv = self.features(val), torch.tensor([self.probe.label_index(r) for r in val])
        head, mean, std, l2 = fit_probe(x, y, xv, yv, self.task.labels)
        train_s = time.perf_counter() - t0
        xt = self.features(self.test)
        pred = head((xt - mean) / std).argmax(-1)
        m = classification_metrics(pred.tolist(), [self.probe.label_index(r) for r in self.test], self.task.labels)
        params = head.weight.numel() + head.bias.numel()
        return _row("linear_probe", NAMES["linear_probe"], m, params, (params + 2 * mean.numel()) * 4, train_s,
                    peak_memory(), l2=l2, train_rows=len(rows))

    @torch.no_grad()
    def features(self, rows: list[dict], batch: int = 16) -> torch.Tensor:
        """(N, H) float32 features of the frozen model alone: the final hidden state at the answer position (text),
        the image model's features (images)."""
        if self.images:
            out = []
            for i in range(0, len(rows), batch):
                x = self.probe.batch(rows[i:i + batch], self.bb.device)["pixel_values"]
                with autocast(self.precision, self.bb.device):
                    out.append(self.bb.features(x).float().cpu())
            return torch.cat(out)
        model = self.bare()
        bb = self.bb
        ids = [self.probe.encode_input(r) for r in rows]
        if bb.kind == "encoder":  # pooled final states, the encoder's own pooling
            out = []
            for i in range(0, len(ids), batch):
                x, m = left_pad(ids[i:i + batch], self.probe.pad_id, bb.device)
                with autocast(self.precision, bb.device):
                    out.append(bb.features(x, m).float().cpu())
            return torch.cat(out)
        out = torch.zeros(len(rows), bb.hidden_size)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x, m = left_pad([ids[j] for j in idx], self.probe.pad_id, bb.device)
            with autocast(self.precision, bb.device):
                states, _ = model.hidden_states(x, m, last_only=True)
            if not model.lean:
                raise SoftPromptError("the linear probe needs hidden states; this backbone runs the plain path")
            out[idx] = states[:, -1].float().cpu()
        return out


def lora_targets(model: Any) -> list[str]:
    """The attention projections LoRA adapts: q/v under transformers 5 names, query/value under older ones."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    raise SoftPromptError(f"no q/v attention projections found in {type(model).__name__} for LoRA")


def _score(metrics: dict) -> float:
    """The validation number that picks a learning rate: macro-F1 for classification (robust to imbalance), mean
    average precision for detection, exact match for generation."""
    for k in ("macro_f1", "map", "exact_match"):
        if metrics.get(k) is not None:
            return metrics[k]
    return 0.0


def compare(cfg: RunConfig, *, prompt_file: str | None = None, baselines=DEFAULT_BASELINES, k_shot: int = 4,
            test_examples: int | None = None, out: str | None = None, backbone: Any = None,
            splits: dict | None = None, overwrite: bool = False, say=None, search_steps: int | None = None,
            lr_grids: dict[str, tuple[float, ...]] | None = None, resume: bool = False) -> dict:
    """One table: the rows in `baselines` (see the module's docstring) on the same test rows. `prompt_file` stands
    for the prompt_tuning row (a prompt trained before). search_steps=0 skips the learning-rate search (each row at
    the config's lr); None: a third of the step budget. The table in `out` is rewritten after every row; resume=True
    keeps the rows a stopped run of the same settings finished there and runs only the others."""
    say = say or _progress
    baselines = [ALIASES.get(b, b) for b in baselines]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise SoftPromptError(f"unknown baseline(s) {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    task = load_task(cfg.task)
    if task.kind == "detection":
        other = sorted(set(baselines) - set(DETECTION_METHODS) - {"lora", "fine_tune"})
        if other:
            raise SoftPromptError(f"row(s) {', '.join(other)} do not apply to a detection task; detection rows: "
                                  f"{', '.join(DETECTION_METHODS)}, lora, fine_tune")
    elif task.kind != "classification" and set(baselines) & {"few_shot", "linear_probe"}:
        raise SoftPromptError("few-shot and linear-probe rows need a classification task")
    bb = backbone or load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
    splits = splits or load_task_splits(task, seed=cfg.seed)
    if task.kind == "detection":
        cfg = replace(cfg, task=task.to_dict())
    elif getattr(task, "modality", "text") == "image":
        if not task.labels:
            task.labels = sorted({str(r[task.label_field]) for r in splits["train"]})
        text_rows = sorted(set(baselines) & TEXT_ONLY)
        if text_rows:
            raise SoftPromptError(f"row(s) {', '.join(text_rows)} need a text task; image rows: linear_probe, "
                                  f"{', '.join(IMAGE_METHODS)}, lora, fine_tune")
        cfg = replace(cfg, task=task.to_dict())
    elif set(baselines) & set(IMAGE_METHODS):
        raise SoftPromptError(f"row(s) {', '.join(sorted(set(baselines) & set(IMAGE_METHODS)))} need an image task")
    probe = task_encoder(task, bb, 0)
    skipped = []  # notes for the table: rows that do not apply to this model
    if bb.kind == "encoder":  # in-context examples are a decoder's; zero-shot needs a {mask} template's MLM head
        skip = sorted(set(baselines) & ({"few_shot"} | ({"zero_shot"} if probe.needs_head else set())))
        if skip:
            skipped.append(f"{' and '.join(s.replace('_', '-') for s in skip)} skipped: {bb.name!r} is a text "
                           "encoder" + (" classified through a trained head" if probe.needs_head else ""))
            say(skipped[-1])
            baselines = [b for b in baselines if b not in skip]
    test, _ = probe.check_rows(splits.get("test", []), "test", cfg.train.skip_bad_rows)
    if test_examples and len(test) > test_examples:
        test = random.Random(cfg.seed + 1).sample(test, test_examples)
    steps = cfg.train.steps if search_steps is None else search_steps
    search = max(1, cfg.train.steps // 3) if search_steps is None else search_steps
    grids = {} if search == 0 else {**LR_GRIDS, **(lr_grids or {})}
    run = _Compare(cfg, bb, splits, test, resolve_precision(cfg.train.precision, bb.device), out, say, search or steps,
                   grids, overwrite)
    settings = {"task": task.name, "model": cfg.model, "test_rows": len(test), "split": "test",
                "precision": run.precision, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
                "search_steps": search, "seed": cfg.seed, "k_shot": k_shot}
    done = _finished_rows(Path(out) / "compare.json", settings) if (out and resume) else {}
    rows = []
    for key in [b for b in BASELINES if b in baselines]:
        if key in done:
            rows.append(done[key])
            say(f"{done[key]['method']}: {_fmt(done[key])} (kept from the stopped run)")
            continue
        t0 = time.perf_counter()
        reset_peak()
        if key == "zero_shot":
            say(f"zero-shot: scoring {len(test)} test rows ...")
            m = run.test_metrics(run.bare(), probe)
            row = _row(key, NAMES[key], m, 0, len(task.template.encode()), 0.0, peak_memory())
        elif key == "few_shot":
            prefix = few_shot_prefix(task, bb.tokenizer, splits["train"], k_shot, cfg.seed)
            enc = TaskEncoder(task, bb.tokenizer, 0, bb.max_positions, bb.pad_token_id, prefix=prefix)
            enc.limit = max(enc.limit, len(bb.tokenizer(prefix)["input_ids"]) + task.max_length)
            if bb.max_positions:
                enc.limit = min(enc.limit, bb.max_positions)
            say(f"few-shot: scoring {len(test)} test rows with {k_shot} examples in context ...")
            m = run.test_metrics(run.bare(), enc)
            row = _row(key, NAMES[key].format(k=k_shot), m, 0, len(prefix.encode()), 0.0, peak_memory())
        elif key == "linear_probe" and task.kind == "detection":
            row = run.prompt_method(key)
        elif key == "linear_probe":
            say("linear probe: features of the frozen model, a balanced logistic-regression head ...")
            row = run.linear_probe()
        elif key == "prompt_tuning" and prompt_file:
            row = run.prompt_row(key, prompt_file)
        elif key in PROMPT_METHODS:
            row = run.prompt_method(key)
        else:
            row = run.weights(key)
        rows.append(row)
        say(f"{row['method']}: {_fmt(row)} ({time.perf_counter() - t0:.0f} s)")
        _write(out, {**settings, "rows": rows, "complete": False})
    result = {**settings, "rows": rows, "notes": skipped + _notes(rows), "complete": True}
    _write(out, result)
    return result


def _write(out: str | None, result: dict) -> None:
    """compare.json (and compare.md once complete), each written whole to a temporary file, then renamed."""
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    files = {"compare.json": json.dumps(result, indent=2) + "\n"}
    if result.get("complete"):
        files["compare.md"] = markdown_table(result) + "\n"
    for name, text in files.items():
        tmp = Path(out) / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(Path(out) / name)


def _finished_rows(path: Path, settings: dict) -> dict[str, dict]:
    """The rows a stopped run with the same settings finished (none when there is no such run)."""
    if not path.exists():
        return {}
    try:
        before = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SoftPromptError(f"cannot resume from {path}: {e}; pass --overwrite to start again") from None
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SoftPromptError(f"cannot resume {path}: its settings differ ({what}); pass --overwrite to start "
                              "again, or the same settings to resume")
    return {r["key"]: r for r in before.get("rows", [])}


def _notes(rows: list[dict]) -> list[str]:
    """What the table says in words: the best prompt method against the linear probe and full fine-tuning."""
    by = {r["key"]: r for r in rows}
    if any(r.get("map") is not None for r in rows):  # detection: mean average precision; the head-only row's key
        prompts = [r for r in rows if r["key"] in ("vpt", "vpt_deep") and r.get("map") is not None]
        if prompts and "fine_tune" in by:
            best = max(prompts, key=lambda r: r["map"])
            gap = by["fine_tune"]["map"] - best["map"]
            return [f"best prompt method ({best['method']}) is {abs(gap):.3f} mAP "
                    f"{'behind' if gap > 0 else 'ahead of'} full fine-tuning"]
        return []
    prompts = [r for r in rows if r["key"] in PROMPT_METHODS and r.get("macro_f1") is not None]
    notes = []
    if prompts:
        best = max(prompts, key=lambda r: r["macro_f1"])
        if "linear_probe" in by:
            probe = by["linear_probe"]
            verdict = "matches or beats" if best["macro_f1"] >= probe["macro_f1"] else "does NOT match"
            notes.append(f"best prompt method ({best['method']}, macro-F1 {best['macro_f1']:.3f}) {verdict} the "
                         f"linear probe (macro-F1 {probe['macro_f1']:.3f})")
        if "fine_tune" in by and by["fine_tune"].get("accuracy") is not None:
            gap = 100 * (by["fine_tune"]["accuracy"] - best["accuracy"])
            notes.append(f"best prompt method is {gap:.1f} accuracy points behind full fine-tuning" if gap > 0 else
                         f"best prompt method is {-gap:.1f} accuracy points ahead of full fine-tuning")
    return notes


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # progress on stderr: stdout carries the table (or --json)


def _fmt(r: dict) -> str:
    if r.get("map") is not None:
        return f"mAP@0.5 {r['map']:.3f} (n={r['n']})"
    if r.get("accuracy") is not None:
        return f"accuracy {r['accuracy']:.1%}, macro-F1 {r['macro_f1']:.3f} (n={r['n']})"
    return f"exact match {r['exact_match']:.1%} (n={r['n']})"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def markdown_table(result: dict) -> str:
    detection = any(r.get("map") is not None for r in result["rows"])
    quality = "mAP@0.5" if detection else "accuracy | macro-F1"
    head = (f"{result['task']} on {result['model']}, {result['test_rows']} test rows\n\n"
            f"| method | {quality} | trainable params | bytes per task | train time | peak memory | "
            f"shares a batch |\n|---|{'---|' * (1 if detection else 2)}---|---|---|---|---|")
    lines = [head]
    for r in result["rows"]:
        if detection:
            score = f"{r['map']:.3f}"
        else:
            acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else f"EM {r['exact_match']:.1%}"
            score = f"{acc} | {r['macro_f1']:.3f}" if r["macro_f1"] is not None else f"{acc} | -"
        mem = f"{r['peak_rss_mb']:.0f} MB RSS" if r.get("peak_rss_mb") else "-"
        if r.get("peak_cuda_mb"):
            mem += f", {r['peak_cuda_mb']:.0f} MB CUDA"
        lines.append(f"| {r['method']} | {score} | {r['trainable_params']:,} | {_size(r['bytes_per_task'])} | "
                     f"{r['train_seconds']:.0f} s | {mem} | {r.get('shares_batch', 'yes')} |")
    for note in result.get("notes") or []:
        lines.append(f"\n{note[0].upper()}{note[1:]}.")
    return "\n".join(lines)
