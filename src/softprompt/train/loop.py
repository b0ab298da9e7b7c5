"""The training recipe: set up, one explicit loop, clean up. Reads top to bottom.

Data order is a pure function of (seed, step): optimizer step k takes examples [k*B, (k+1)*B) of a stream of
seeded per-epoch permutations. That is what makes --resume reach the same prompt bit for bit, and DDP with the
same global batch reach the same prompt as one process: every micro-batch and every rank's shard is known up
front, and each loss term is divided by the count of the whole global batch.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backbones import load_backbone
from ..errors import SoftPromptError
from ..evaluate import evaluate, headline
from ..files import save_prompt
from ..methods import Headed, PromptTuning, get_method
from ..model import PromptedModel
from ..precision import autocast, resolve_precision
from ..tasks.encode import TaskEncoder
from ..tasks.spec import load_task, load_task_splits, task_encoder
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import Dist
from .memory import peak_memory, reset_peak
from .probe import probe_head

PROMPT_FILE = "prompt.safetensors"
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class RunResult:
    out_dir: Path
    prompt_path: Path | None
    final_step: int
    best: dict | None  # validation metrics of the kept prompt
    best_step: int | None = None
    test: dict | None = None
    report: dict = field(default_factory=dict)
    stopped: str = "steps"  # steps | early_stopping | interrupted
    method: Any = None  # what was trained (with weights="all"/"lora" on an image task: the head trained with them)


def example_order(n: int, batch: int, seed: int, step: int, lengths: list[int] | None = None,
                  pool: int = 0) -> list[int]:
    """Indices of the `batch` examples of optimizer step `step` (epochs are seeded permutations, remainder dropped).

    With `lengths` and `pool` > 0 (length buckets): each epoch's permutation is cut into pools of `pool` batches,
    each pool sorted by length and cut into batches, and the epoch's batches shuffled (seeded). Every example is
    still seen once per epoch; a batch holds rows of similar length, so padding is small."""
    per_epoch = (n // batch) * batch
    if per_epoch == 0:
        raise SoftPromptError(f"the train split has {n} rows, fewer than one batch of {batch}; lower train.batch_size")
    start = step * batch
    epoch, offset = divmod(start, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))[:per_epoch]
    if lengths is None or pool <= 0:
        return perm[offset:offset + batch].tolist()
    order = perm.tolist()
    size = pool * batch
    for i in range(0, per_epoch, size):  # sort inside each pool (stable: ties keep the shuffled order)
        order[i:i + size] = sorted(order[i:i + size], key=lambda j: lengths[j])
    batches = torch.randperm(per_epoch // batch, generator=torch.Generator().manual_seed(seed * 100_019 + epoch))
    b = int(batches[offset // batch])
    return order[b * batch:(b + 1) * batch]


def lr_factor(step: int, args) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    if args.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params, args) -> torch.optim.Optimizer:
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Lester et al.: constant lr, no parameter scaling, beta2 decay 0.8, weight decay 1e-5
        return Adafactor(params, lr=args.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         decay_rate=-0.8, weight_decay=args.weight_decay, clip_threshold=1.0)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def classification_loss(enc: TaskEncoder, model, batch: dict, kind: str,
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed over the batch (the caller divides by the global count); each row weighted by its class's weight
    when class_weights are given (train.class_weights balanced)."""
    # cross-entropy over the labels ignores the per-row softmax normaliser: only the label words' LM-head rows
    scores = enc.label_scores(model, batch, normalize=kind == "lm")  # (B, n_labels)
    if kind == "lm":  # NLL of the gold label's words
        nll = -scores.gather(1, batch["y"][:, None])[:, 0]
    else:
        nll = torch.nn.functional.cross_entropy(scores, batch["y"], reduction="none")
    return nll.sum() if class_weights is None else (nll * class_weights[batch["y"]]).sum()


def generation_loss(model, batch: dict) -> torch.Tensor:
    """Summed over the target tokens; the LM head runs at target positions only."""
    return model.target_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")


# a resumed run may be extended, given more patience, or checkpointed at another pace
RESUMABLE_CHANGES = {"train.steps", "train.patience", "train.save_every", "train.save_every_seconds",
                     "train.log_every"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "task":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_out_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber or mis-resume a run. Read-only: every rank runs it before rank 0 writes anything."""
    cfg_file = out / "config.json"
    if cfg_file.exists():
        if resume:
            theirs, ours = _flat(json.loads(cfg_file.read_text())), _flat(json.loads(_config_json(cfg)))
            defaults = _flat(json.loads(_config_json(RunConfig())))
            theirs = {**{k: v for k, v in defaults.items() if k not in theirs and k in ours}, **theirs}  # older runs
            diff = [k for k in sorted(set(theirs) | set(ours))
                    if theirs.get(k) != ours.get(k) and k not in RESUMABLE_CHANGES]
            if diff:
                shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:4])
                raise SoftPromptError(f"{out} holds a run with a different config ({shown}); resume with the same "
                                      "config, or use another out_dir")
        elif not overwrite:
            raise SoftPromptError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace "
                                  "it, or choose another --out-dir")
    elif resume:
        raise SoftPromptError(f"nothing to resume in {out} (no config.json); start without --resume")


def prepare_out_dir(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Rank 0 only, after check_out_dir: clear a replaced run's files, record the config."""
    if not resume:
        for name in (CHECKPOINT, PROMPT_FILE, "metrics.jsonl", "summary.json", "plot.png"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.json.tmp"  # whole or not at all: a run killed here still resumes
    tmp.write_text(_config_json(cfg) + "\n")
    tmp.replace(out / "config.json")


def _config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


class Trainable:
    """What a run trains: a method's parameters (a prompt), or weights of the backbone itself (the full fine-tuning
    and LoRA baselines, which train a private copy). Keeps and restores their state by name."""

    def __init__(self, method, named: dict[str, torch.nn.Parameter] | None = None, head: tuple[str, ...] = ()):
        self.method = method
        self.named = named  # None: the method's own state (prompt runs)
        self.head = head  # names in `named` of a task head that trains with the weights (image tasks)

    def groups(self, weights_lr: float, head_lr: float) -> list[dict]:
        """Optimizer groups: the weights at their lr; a head trained with them at a prompt's lr (it starts random)."""
        if self.named is None and isinstance(self.method, Headed):  # a text method's prompt, and its task head
            head = [self.method.head_weight, self.method.head_bias]
            rest = [p for p in self.method.parameters() if all(p is not h for h in head)]
            return [{"params": rest}, {"params": head, "lr": head_lr}]
        if self.named is None or not self.head:
            return [{"params": self.params}]
        return [{"params": [p for k, p in self.named.items() if k not in self.head], "lr": weights_lr},
                {"params": [self.named[k] for k in self.head], "lr": head_lr}]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.method.parameters()) if self.named is None else list(self.named.values())

    def state(self) -> dict[str, torch.Tensor]:
        if self.named is None:
            return self.method.state_tensors()
        return {k: v.detach() for k, v in self.named.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        if self.named is None:
            self.method.load_state_tensors(state)
        else:
            for k, p in self.named.items():
                p.copy_(state[k])


@dataclass
class _Run:
    """Everything the loop reads, made by _setup."""

    cfg: RunConfig
    ddp: Dist
    out: Path
    task: Any
    bb: Any
    trainable: Trainable
    model: PromptedModel
    enc: TaskEncoder
    train_rows: list[dict]
    val_rows: list[dict]
    lengths: list[int] | None
    precision: str
    select: str
    class_weights: torch.Tensor | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict
    log: _Logger
    skipped: int
    writes: bool  # a prompt run on rank 0: checkpoints, the prompt file, the run folder's logs
    t_start: float = 0.0  # perf_counter at step 0 (a resumed run's earlier seconds counted in)
    saved_at: float = field(default_factory=time.monotonic)  # when the last checkpoint was written


def fit(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, backbone: Any = None,
        splits: dict | None = None, weights: str | None = None,
        on_step: Callable[[int, float], None] | None = None, quiet: bool = False) -> RunResult:
    """Train a prompt as `cfg` says (or, with weights="all" / "lora", the backbone's own weights: the expensive
    baselines, which change `backbone`: give them a copy). Set-up, one loop, clean-up."""
    run = _setup(cfg, resume, overwrite, backbone, splits, weights, quiet)
    args, ddp, enc, state = cfg.train, run.ddp, run.enc, run.state
    params, device = run.trainable.params, run.bb.device
    micro = args.batch_size // args.grad_accum
    run.model.train()
    stopped = "steps"
    run.t_start = time.perf_counter() - state["train_seconds"]
    while state["step"] < args.steps:
        step = state["step"]
        rows = [run.train_rows[i] for i in example_order(len(run.train_rows), args.batch_size, cfg.seed, step,
                                                         run.lengths, args.length_buckets)]
        count = enc.count(rows)  # loss normaliser of the whole global batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per micro-batch
        for j in range(args.grad_accum):
            shard = rows[j * micro:(j + 1) * micro][ddp.rank::ddp.world]
            batch = enc.batch(shard, device)
            tokens += enc.units(batch, run.model.num_virtual_tokens)
            with autocast(run.precision, device):
                if run.task.kind == "classification":
                    loss = classification_loss(enc, run.model, batch, args.loss, run.class_weights)
                elif run.task.kind == "detection":
                    loss = enc.loss(run.model, batch)
                else:
                    loss = generation_loss(run.model, batch)
            (loss / count).backward()
            loss_sum += loss.detach()
        ddp.all_reduce_grads(params)
        local_loss, local_tokens = torch.stack([loss_sum, tokens]).tolist()  # the one host sync per step
        stopped = _advance(run, ddp.sum(local_loss) / count, int(ddp.sum(local_tokens)), on_step)
        if stopped != "steps":
            break
    return _finish(run, state["step"], stopped)


def _advance(run: _Run, loss_value: float, tokens: int, on_step=None) -> str:
    """Everything after a step's gradients are in: the optimizer step, progress, validation and the kept best,
    checkpoints. Returns why the run stops ("steps": it goes on)."""
    args, state = run.cfg.train, run.state
    step = state["step"]
    if not math.isfinite(loss_value):
        kept = f"the last good checkpoint (step {_ck_step(run.out)}) is kept in {run.out / CHECKPOINT}" \
            if (run.out / CHECKPOINT).exists() else "no checkpoint was written yet"
        raise SoftPromptError(f"loss became {loss_value} at step {step + 1}; stopping: {kept}; lower train.lr "
                              "or use train.max_grad_norm")
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.trainable.params, args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    step += 1
    state["step"] = step
    state["tokens"] += tokens
    state["train_seconds"] = time.perf_counter() - run.t_start
    run.log.step(step, loss_value, run.scheduler.get_last_lr()[0], state)
    if on_step is not None:
        on_step(step, loss_value)
    stopped = "steps"
    last = step == args.steps
    if (args.eval_every and step % args.eval_every == 0) or last:
        run.model.eval()
        metrics = evaluate(run.model, run.enc, run.val_rows, run.precision)
        run.model.train()
        score = headline(metrics, run.select)
        run.log.eval(step, metrics)
        if state["best_score"] is None or score > state["best_score"]:
            state.update(best_score=score, best_step=step, best_metrics=_small(metrics), bad_evals=0,
                         best_tensors={k: v.detach().cpu().clone() for k, v in run.trainable.state().items()})
        else:
            state["bad_evals"] += 1
        if args.patience and state["bad_evals"] >= args.patience:
            stopped = "early_stopping"
    due = args.save_every_seconds and time.monotonic() - run.saved_at >= args.save_every_seconds
    if run.writes and (step % args.save_every == 0 or due or last or stopped != "steps"):
        run.saved_at = time.monotonic()
        save_checkpoint(run.out / CHECKPOINT, {
            "method": run.trainable.state(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "state": state,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())}})
    return stopped


def _setup(cfg: RunConfig, resume: bool, overwrite: bool, backbone: Any, splits: dict | None, weights: str | None,
           quiet: bool) -> _Run:
    """The run folder, backbone, data, what trains, the optimizer, and the state (fresh, or from the checkpoint)."""
    ddp = Dist.from_env(cfg.device)
    out = Path(cfg.out_dir)
    writes = weights is None
    if writes:
        check_out_dir(out, cfg, resume, overwrite)
        ddp.barrier()
        if ddp.main:
            prepare_out_dir(out, cfg, resume)
    ddp.barrier()
    args = cfg.train
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    bb = backbone or load_backbone(cfg.model, dtype=cfg.dtype, device=ddp.device(cfg.device))
    precision = resolve_precision(args.precision, bb.device)  # auto: bf16 where native, float32 elsewhere
    splits = splits or load_task_splits(task, seed=cfg.seed)
    if getattr(task, "modality", "text") == "image" and not task.labels:  # splits given: classes from them
        task.labels = sorted({str(r[task.label_field]) for r in splits["train"]})
    if cfg.method.init == "library":  # transfer: start from the library prompt most like a short probe's
        from dataclasses import replace

        from ..transfer import choose_source

        if ddp.world > 1:
            raise SoftPromptError("method.init library probes in one process; choose the source first (a "
                                  "single-process run), then start the distributed run with init file")
        choice = choose_source(cfg, bb, splits, out, quiet or not ddp.main)
        cfg = replace(cfg, method=replace(cfg.method, init="file", init_file=choice["source"]))
        random.seed(cfg.seed)  # the run itself starts as it would without the probe
        torch.manual_seed(cfg.seed)
    # a text encoder classifies through a task head that trains with the prompt (unless a {mask} template is scored
    # through its masked-LM head): the task's encoder says which
    head = bool(getattr(task_encoder(task, bb), "needs_head", False))
    trainable = _trainable(cfg, bb, task, weights, head)
    model = PromptedModel(bb, trainable.method, activation_checkpointing=args.activation_checkpointing)
    enc = task_encoder(task, bb, trainable.method.num_virtual_tokens)
    train_rows, bad = enc.check_rows(splits.get("train", []), "train", args.skip_bad_rows)
    val_rows, _ = enc.check_rows(splits.get("validation", []), "validation", args.skip_bad_rows)
    if args.eval_examples and len(val_rows) > args.eval_examples:
        val_rows = random.Random(cfg.seed).sample(val_rows, args.eval_examples)
    lengths = None
    if args.length_buckets:  # token counts that decide the buckets (same on every rank: a function of the data)
        lengths = enc.lengths(train_rows)
    micro = args.batch_size // args.grad_accum
    if micro % ddp.world:
        raise SoftPromptError(f"micro-batch {micro} (batch_size / grad_accum) is not divisible by {ddp.world} processes")
    probed = None
    if not (resume and (out / CHECKPOINT).exists()):  # a resumed run's head is in its checkpoint
        probed = _probe_head(cfg, task, model, enc, train_rows, val_rows, precision)
    head_lr = args.head_lr if args.head_lr is not None else args.lr
    optimizer = make_optimizer(trainable.groups(_weights_args(args, weights).lr, head_lr), _weights_args(args, weights))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    state = {"step": 0, "best_score": None, "best_step": None, "best_metrics": None, "bad_evals": 0,
             "tokens": 0, "train_seconds": 0.0, "best_tensors": None}
    if resume and not (out / CHECKPOINT).exists():  # killed before its first checkpoint: nothing was lost
        if not quiet and ddp.main:
            print(f"softprompt: {out} holds no checkpoint yet; starting the run from step 0", file=sys.stderr)
    elif resume:
        ck = load_checkpoint(out / CHECKPOINT)
        trainable.load(ck["method"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        state.update(ck["state"])
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate((ck["rng"]["python"][0], tuple(ck["rng"]["python"][1]), ck["rng"]["python"][2]))
    log = _Logger(out, ddp.main and writes, quiet or not ddp.main, args.steps, state["step"], args.log_every,
                  getattr(enc, "unit", "tokens"))
    class_weights = select = None
    if task.kind == "classification":
        counts = [0] * len(task.labels)
        for r in train_rows:
            counts[enc.label_index(r)] += 1
        imbalanced = min(counts) == 0 or max(counts) > 1.5 * min(counts)
        select = args.select if args.select != "auto" else ("macro_f1" if imbalanced else "accuracy")
        if args.class_weights == "balanced":  # n / (classes * count): every class weighs the same in the loss
            class_weights = torch.tensor([len(train_rows) / (len(counts) * max(c, 1)) for c in counts],
                                         dtype=torch.float32, device=bb.device)
    else:
        select = "map" if task.kind == "detection" else "exact_match"
    if probed is not None:  # the probe's seconds are part of the run's training time
        state["train_seconds"] = probed.pop("seconds")
        if not quiet and ddp.main:
            print(f"softprompt: the task head starts as a linear probe ({probed['rows']} rows, L2 {probed['l2']:g})",
                  file=sys.stderr)
    reset_peak()
    return _Run(cfg=cfg, ddp=ddp, out=out, task=task, bb=bb, trainable=trainable, model=model, enc=enc,
                train_rows=train_rows, val_rows=val_rows, lengths=lengths, precision=precision, select=select,
                class_weights=class_weights, optimizer=optimizer, scheduler=scheduler, state=state, log=log,
                skipped=bad.skipped, writes=writes)


def _probe_head(cfg: RunConfig, task: Any, model: PromptedModel, enc: TaskEncoder, train_rows: list[dict],
                val_rows: list[dict], precision: str) -> dict | None:
    """train.head_init: an image classification task's head fitted as a linear probe of the prompted model's
    features before training (on as many train rows as the run sees); None where the head starts random."""
    image = getattr(task, "modality", "text") == "image" and task.kind == "classification"
    headed = hasattr(model.method, "head_weight")  # CoOp classifies through CLIP's text encoder: no linear head
    # auto: the probe on a vision transformer; on other image models (a CNN) a random head did better (docs/vision.md)
    auto = image and headed and model.backbone.kind == "vit"
    if cfg.train.head_init == "random" or (cfg.train.head_init == "auto" and not auto):
        return None
    if not (image and headed):
        what = "this method has no linear head" if image else \
            f"this is a {getattr(task, 'modality', 'text')} {task.kind} task"
        raise SoftPromptError(f"train.head_init probe fits an image classification task's linear head; {what}: use "
                              "train.head_init random or auto")
    t0 = time.perf_counter()
    done = probe_head(model, enc, train_rows, val_rows, task.labels, precision,
                      rows=cfg.train.steps * cfg.train.batch_size, seed=cfg.seed)
    return {**done, "seconds": time.perf_counter() - t0}


def _trainable(cfg: RunConfig, bb: Any, task: Any, weights: str | None, task_head: bool = False) -> Trainable:
    labels = [ws[0] for ws in task.verbalizer.values()]
    if weights is None:
        method = get_method(cfg.method.name).create(
            bb, cfg.method.method_config(labels, cfg.seed, image_size=getattr(task, "image_size", None)))
        if task_head:
            method = Headed.create_for(method, bb, len(labels), cfg.seed)
        return Trainable(method)
    empty, head = PromptTuning(torch.empty(0, bb.hidden_size)).to(bb.device), {}  # no prompt: the weights change
    if getattr(task, "modality", "text") in ("image", "detection"):  # an image task's head trains with the weights
        empty = _head_only(bb, labels, cfg.seed, getattr(task, "image_size", None))
        head = {f"task_head.{k}": p for k, p in empty.named_parameters() if p.requires_grad}
    elif task_head:  # so does a text encoder's
        empty = Headed.create_for(empty, bb, len(labels), cfg.seed)
        head = {f"task_head.{k}": p for k, p in empty.named_parameters() if k.startswith("head_")}
    if weights == "all":
        bb.model.requires_grad_(True)
        return Trainable(empty, {**dict(bb.model.named_parameters()), **head}, tuple(head))
    if weights == "lora":  # the adapters PEFT injected into this (copied) backbone
        named = {n: p for n, p in bb.model.named_parameters() if "lora_" in n}
        if not named:
            raise SoftPromptError("weights='lora' needs a backbone with LoRA adapters injected (see compare)")
        for p in named.values():
            p.requires_grad_(True)
        return Trainable(empty, {**named, **head}, tuple(head))
    raise SoftPromptError(f"weights must be None, 'all' or 'lora', not {weights!r}")


def _head_only(bb: Any, labels: list[str], seed: int, image_size: int | None):
    """A task head alone for an image backbone: VPT with no tokens (a ViT, a detector), a pixel prompt with no pixels
    (any)."""
    from ..methods import VPT, PixelPrompting

    if bb.kind in ("vit", "detector"):
        return VPT.create(bb, num_virtual_tokens=0, init_labels=labels, seed=seed, dropout=0.0)
    m = PixelPrompting.create(bb, init_labels=labels, seed=seed, image_size=image_size or 0, width=1)
    m.mask.zero_()
    m.pixels.requires_grad_(False)
    return m


def _finish(run: _Run, step: int, stopped: str) -> RunResult:
    """Keep the best state on validation, save the prompt (rank 0), report."""
    run.model.eval()
    state, out, ddp = run.state, run.out, run.ddp
    if state["best_tensors"] is not None:  # the kept state is the best one on validation
        run.trainable.load(state["best_tensors"])
    trainable = sum(p.numel() for p in run.trainable.params)
    report = {**_report(trainable, state, run.bb, run.trainable.named is not None, run.skipped),
              "precision": run.precision, "selected_on": run.select, "unit": getattr(run.enc, "unit", "tokens")}
    prompt_path = None
    if run.writes:
        prompt_path = out / PROMPT_FILE if ddp.main else None  # only rank 0 writes
        if ddp.main:
            save_prompt(out / PROMPT_FILE, run.trainable.method, run.bb, task=run.task.to_dict(), overwrite=True,
                        training={"config": run.cfg.to_dict(), "best_step": state["best_step"],
                                  "validation": state["best_metrics"], **report},
                        extra={"preprocessing": run.enc.preprocessing} if hasattr(run.enc, "preprocessing") else None)
            report["bytes_per_task"] = (out / PROMPT_FILE).stat().st_size
            run.log.finish(report)
    else:
        report["bytes_per_task"] = sum(p.numel() * p.element_size() for p in run.trainable.params)
        for p in run.trainable.params:
            p.requires_grad_(False)
        run.bb.model.eval()
    ddp.barrier()
    return RunResult(out_dir=out, prompt_path=prompt_path, final_step=step, best=state["best_metrics"],
                     best_step=state["best_step"], report=report, stopped=stopped, method=run.trainable.method)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _weights_args(args, weights: str | None):
    """The optimizer settings: the run's own for a prompt; AdamW at finetune_lr / lora_lr for the baselines."""
    from dataclasses import replace

    if weights is None:
        return args
    return replace(args, optimizer="adamw", lr=args.finetune_lr if weights == "all" else args.lora_lr,
                   weight_decay=0.0)


def _ck_step(out: Path) -> int | str:
    try:
        return load_checkpoint(out / CHECKPOINT)["state"]["step"]
    except SoftPromptError:
        return "?"


def _small(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("confusion", "recall", "ap_per_class")}


def _report(trainable: int, state: dict, bb: Any, weights: bool, skipped: int) -> dict:
    total = sum(p.numel() for p in bb.model.parameters()) + (0 if weights else trainable)
    seconds = state["train_seconds"]
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(1, total),
            "bytes_per_task": None, "tokens_processed": state["tokens"], "train_seconds": round(seconds, 2),
            "tokens_per_second": round(state["tokens"] / max(seconds, 1e-9), 1), **peak_memory(),
            "skipped_rows": skipped, "steps": state["step"], "processes": _world()}


class _Logger:
    """Progress (a bar on a terminal; on a pipe or file, a line every `every` steps or 30 s with step, loss and ETA),
    metrics.jsonl, TensorBoard when installed, and the final plot. Progress goes to stderr, results to stdout."""

    LINE_SECONDS = 30  # without a bar: at least one progress line this often

    def __init__(self, out: Path, write: bool, quiet: bool, total: int, start: int, every: int = 10,
                 unit: str = "tokens"):
        self.out, self.write, self.unit = out, write, unit
        self.total, self.start, self.every = total, start, every
        self.t0 = self.last_line = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.quiet = quiet
        self.tb = None
        if write:
            self._trim()
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL file is the record
                self.tb = None

    def _trim(self) -> None:
        """A resumed run: drop the rows a killed run wrote after its checkpoint (and a line cut by the kill), so each
        step is in metrics.jsonl once."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.start:
                kept.append(line)
        path.write_text("".join(k + "\n" for k in kept))

    def _append(self, row: dict) -> None:
        if self.write:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def step(self, step: int, loss: float, lr: float, state: dict) -> None:
        tok_s = state["tokens"] / max(state["train_seconds"], 1e-9)
        self._append({"step": step, "loss": loss, "lr": lr, "tokens": state["tokens"],
                      "tokens_per_second": round(tok_s, 1), "elapsed_s": round(state["train_seconds"], 2)})
        if self.tb:
            self.tb.add_scalar("train/loss", loss, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}")
        elif not self.quiet:
            now = time.perf_counter()
            if step % self.every == 0 or now - self.last_line >= self.LINE_SECONDS or step == self.total:
                self.last_line = now
                per_step = (now - self.t0) / max(1, step - self.start)
                print(f"train step {step}/{self.total}: loss {loss:.4f}, {per_step:.2f} s/step, {tok_s:.0f} {self.unit}/s, "
                      f"ETA {_duration(per_step * (self.total - step))}", file=sys.stderr, flush=True)

    def eval(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{f"val_{k}": v for k, v in _small(metrics).items()}}
        self._append(row)
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("val_", "val/"), v, step)
        if not self.quiet:
            line = f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                              if k != "step" and isinstance(v, float))
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def finish(self, report: dict) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.write:
            (self.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_metrics(self.out / "metrics.jsonl", self.out / "plot.png")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plot_metrics(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r.get("val_accuracy", r.get("val_exact_match", r.get("val_map")))) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, label="train loss (batch)")
        w = max(1, len(losses) // 20)  # running mean over ~5% of the run
        smooth = [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", label=f"train loss (mean of {w})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:red", label="validation score")
        ax2.set_ylabel("validation accuracy", color="tab:red")
    ax.set_title("softprompt training")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
