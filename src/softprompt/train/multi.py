"""Several tasks' prompts trained in one run on one causal LM (``softprompt train a.yaml b.yaml ...``).

Each config is a run of its own (its task, method, optimizer, learning rate, seed, run folder, checkpoints and
prompt file), set up exactly as ``fit`` sets it up. Each step takes every task's batch in that task's own data
order, puts the rows of all tasks into one batch, each row under its own task's prompt (the mixed-task machinery
serving uses, here with gradient), and runs one backbone forward for the classification rows and one for the
generation rows. The loss is the sum of each task's own normalised loss: the prompts share no parameter, so each
gets exactly the gradient its own run would give it. Then each task takes its own optimizer step, validation and
checkpoint (``loop._advance``). A task that stops early (patience) leaves the batch; the others go on.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..backbones import load_backbone
from ..errors import SoftPromptError
from ..model import MixedPromptedModel
from ..precision import autocast
from ..scoring import label_scores, target_loss
from ..tasks.encode import left_pad
from .config import RunConfig
from .loop import RunResult, _advance, _finish, _Run, _setup, example_order


def fit_many(cfgs: list[RunConfig], *, resume: bool = False, overwrite: bool = False, backbone: Any = None,
             splits: list[dict] | None = None, quiet: bool = False) -> list[RunResult]:
    """Train the configs' prompts together (one forward per step for every task's rows); a RunResult per config."""
    if len(cfgs) < 2:
        raise SoftPromptError("a multi-task run needs two or more configs; train one task with softprompt train")
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in ("model", "dtype", "device"):
            if getattr(c, key) != getattr(first, key):
                raise SoftPromptError(f"the configs of one multi-task run share the model: {key} is "
                                      f"{getattr(first, key)!r} in the first and {getattr(c, key)!r} in another")
        if c.train.precision != first.train.precision:
            raise SoftPromptError("the configs of one multi-task run share train.precision (one forward)")
    outs = [str(c.out_dir) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise SoftPromptError("each task of a multi-task run needs its own out_dir")
    bb = backbone or load_backbone(first.model, dtype=first.dtype, device=first.device)
    if bb.kind != "causal_lm":
        raise SoftPromptError(f"multi-task runs put every task's rows in one forward through a causal LM's prompt "
                              f"prefixes; {bb.name!r} is a {bb.kind!r} model: train its tasks one by one")
    runs = [_setup(c, resume, overwrite, bb, None if splits is None else splits[i], None, quiet)
            for i, c in enumerate(cfgs)]
    for r in runs:
        if r.ddp.world > 1:
            raise SoftPromptError("multi-task runs are single-process; run distributed training task by task")
        if r.task.kind not in ("classification", "generation"):
            raise SoftPromptError(f"task {r.task.name!r} is a {r.task.kind} task; multi-task runs train text tasks")
    if len({r.state["step"] for r in runs}) > 1:
        raise SoftPromptError("the tasks' checkpoints are at different steps; resume each run on its own")
    for r in runs:
        r.model.train()
        r.t_start = time.perf_counter() - r.state["train_seconds"]
    stopped = {id(r): "steps" for r in runs}
    active = [r for r in runs if r.state["step"] < r.cfg.train.steps]
    while active:
        losses, tokens = _step(active, bb)
        for r, loss, n in zip(active, losses, tokens, strict=True):
            stopped[id(r)] = _advance(r, loss, n)
        active = [r for r in active if stopped[id(r)] == "steps" and r.state["step"] < r.cfg.train.steps]
    return [_finish(r, r.state["step"], stopped[id(r)]) for r in runs]


def _step(runs: list[_Run], bb: Any) -> tuple[list[float], list[int]]:
    """Every task's batch of this step in one forward (per kind of task), backward of the summed losses; each
    task's loss and token count."""
    device = bb.device
    step = runs[0].state["step"]
    cls_rows: list[tuple[int, list[int], Any, int]] = []  # (task, input ids, verbalizer, label)
    gen_rows: list[tuple[int, list[int], list[int]]] = []  # (task, ids, labels)
    counts, tokens, prompts = [], [], []
    for t, r in enumerate(runs):
        args = r.cfg.train
        if args.grad_accum != 1:
            raise SoftPromptError("multi-task runs take each task's batch whole; set train.grad_accum to 1")
        rows = [r.train_rows[i] for i in example_order(len(r.train_rows), args.batch_size, r.cfg.seed, step,
                                                       r.lengths, args.length_buckets)]
        counts.append(r.enc.count(rows))
        batch = r.enc.batch(rows)
        tokens.append(int(r.enc.units(batch, r.model.num_virtual_tokens)))
        prompts.append(r.model.method())  # one prompt per task per step: its rows share its prefix
        real = batch["attention_mask"].bool()
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i][real[i]].tolist()
            if r.task.kind == "classification":
                cls_rows.append((t, ids, r.enc.verbalizer, int(batch["y"][i])))
            else:
                gen_rows.append((t, ids, batch["labels"][i][real[i]].tolist()))
    per_task = [torch.zeros((), device=device) for _ in runs]
    with autocast(runs[0].precision, device):
        if cls_rows:
            ids, mask = left_pad([row[1] for row in cls_rows], bb.pad_token_id, device)
            view = MixedPromptedModel(bb, [prompts[row[0]] for row in cls_rows], grad=True)
            kinds = {runs[row[0]].cfg.train.loss for row in cls_rows}
            scores = {k: label_scores(view, ids, mask, [row[2] for row in cls_rows], normalize=k == "lm",
                                      pad_id=bb.pad_token_id) for k in kinds}
            for t in dict.fromkeys(row[0] for row in cls_rows):  # each task's rows at once (its labels' count)
                r = runs[t]
                js = [j for j, row in enumerate(cls_rows) if row[0] == t]
                s = torch.stack([scores[r.cfg.train.loss][j] for j in js])  # (n, K)
                y = torch.tensor([cls_rows[j][3] for j in js], device=device)
                nll = -s.gather(1, y[:, None])[:, 0] if r.cfg.train.loss == "lm" else \
                    torch.nn.functional.cross_entropy(s.float(), y, reduction="none")
                per_task[t] = per_task[t] + (nll if r.class_weights is None else nll * r.class_weights[y]).sum()
        if gen_rows:
            ids, mask, labels = left_pad([row[1] for row in gen_rows], bb.pad_token_id, device,
                                         [row[2] for row in gen_rows])
            view = MixedPromptedModel(bb, [prompts[row[0]] for row in gen_rows], grad=True)
            token_loss = target_loss(view, ids, mask, labels, reduction="none")  # target tokens, row by row
            owner = torch.tensor([row[0] for row in gen_rows], device=device)
            owner = owner[:, None].expand_as(labels)[labels != -100]
            for t in set(owner.tolist()):
                per_task[t] = per_task[t] + token_loss[owner == t].sum()
    total = sum(loss / counts[t] for t, loss in enumerate(per_task))
    total.backward()
    values = torch.stack([loss.detach().float() for loss in per_task]).tolist()
    return [v / c for v, c in zip(values, counts, strict=True)], tokens
