"""The run configuration: one schema for the YAML file, the CLI overrides (``--train.lr 0.3``) and Python.

Each group is a small dataclass with a comment per field; unknown keys are refused with the closest valid one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError, check_keys


@dataclass
class MethodArgs:
    """What trains (the method registered under `name`: prompt_tuning | residual | p_tuning | prefix_tuning |
    p_tuning_v2 | vpt | pixel_prompt | coop | cocoop) and how it starts. Options a method does not have must stay unset."""

    name: str = "prompt_tuning"
    num_virtual_tokens: int = 20  # Lester et al.: 20 gets most of the gain
    init: str = "labels"  # random | vocab | text | labels (the verbalizer words) | file | library (init_file: a folder)
    init_text: str | None = None
    init_labels: list[str] = field(default_factory=list)  # default for init=labels: the task's verbalizer words
    init_file: str | None = None
    reparameterize: bool | None = None  # prefix_tuning / p_tuning_v2: an MLP over embeddings while training
    encoder: str | None = None  # p_tuning: mlp | lstm
    encoder_hidden: int | None = None  # width of a reparameterisation (prefix MLP, P-tuning encoder)
    bottleneck: int | None = None  # residual: hidden width of the shared MLP
    deep: bool | None = None  # vpt: a fresh set of tokens before every layer (VPT-deep)
    dropout: float | None = None  # vpt: dropout on the tokens while training
    shape: str | None = None  # pixel_prompt: border | patch
    width: int | None = None  # pixel_prompt: border width / patch side in pixels
    class_specific: bool | None = None  # coop / cocoop: a context per class
    conditional: bool | None = None  # coop: the image-conditioned meta-network (cocoop has it on)

    def method_config(self, labels: list[str], seed: int, **context):
        """The registered method's config from these args (one-line error for an option it does not have);
        `context` (e.g. the task's image_size) fills the fields the method has."""
        from ..methods import METHODS, get_method

        cls = get_method(self.name).Config
        known = {f.name for f in dataclasses.fields(cls)}
        values = {"num_virtual_tokens": self.num_virtual_tokens, "init": self.init, "init_text": self.init_text,
                  "init_labels": self.init_labels or labels, "init_file": self.init_file, "seed": seed}
        values.update({k: v for k, v in context.items() if k in known and v is not None})
        for key in ("reparameterize", "encoder", "encoder_hidden", "bottleneck", "deep", "dropout", "shape", "width",
                    "class_specific", "conditional"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in known:
                owners = [n for n, m in METHODS.items() if key in {f.name for f in dataclasses.fields(m.Config)}]
                raise SoftPromptError(f"method.{key} does not apply to {self.name}; leave it unset (it applies to: "
                                      f"{', '.join(owners)})")
            values[key] = value
        return cls(**values)



# Measured on rotten_tomatoes / SmolLM2-135M, batch 8, bf16, constant lr, 150 steps (README): AdamW 1e-2 -> 85.3%
# test, AdamW 3e-2 -> 81.5%, Adafactor 0.3 (Lester's T5 recipe) -> 80.0%. A prompt needs a far larger lr than a
# weight, but not Lester's T5 one here. 300 steps: constant 84.8%, linear decay 87.0% (validation stable at 86%).
DEFAULT_LR = {"adamw": 1e-2, "adafactor": 0.3}


@dataclass
class TrainArgs:
    """The optimisation. Defaults are the measured ones for SmolLM2-135M (see the README)."""

    steps: int = 300
    batch_size: int = 8  # examples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | adafactor
    lr: float | None = None  # None: 1e-2 for adamw (measured best on SmolLM2, see README), 0.3 for adafactor (Lester)
    weight_decay: float = 1e-5  # Lester et al.
    head_lr: float | None = None  # a text encoder's task head, and an image task's head beside the weights; None: lr
    # where an image classification task's head starts: probe = fitted as a linear probe of the features the model
    # gives with the prompt as initialised (on the rows the run sees, L2 chosen on validation), then prompt and head
    # train from there | random = nn.Linear's seeded start | auto = probe for image classification on a vision
    # transformer, random elsewhere (a CNN included). Measured on Fashion-MNIST (docs/vision.md)
    head_init: str = "auto"
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: str = "linear"  # after warm-up: linear (to 0 at the last step; measured best) | cosine | constant (Lester)
    max_grad_norm: float | None = 1.0  # clipping; None = off
    # auto: bf16 autocast where bf16 is native (CUDA, CPUs with avx512_bf16/AMX), float32 elsewhere, where bf16 is
    # emulated and far slower (measured 84x on an AVX2-only CPU) | float32 | bf16. The prompt stays float32.
    precision: str = "auto"
    loss: str = "options"  # classification: options (cross-entropy over labels) | lm (NLL of the label words)
    eval_every: int = 50  # steps between validation passes (0 = only at the end)
    eval_examples: int | None = 400  # validation rows used (seeded sample; None = all)
    patience: int | None = None  # early stopping: evaluations without improvement before stopping
    save_every: int = 50  # steps between checkpoints
    save_every_seconds: float = 120.0  # and at least this often (0 = off): a killed run loses at most this much work
    log_every: int = 10  # without a progress bar (a pipe, a log file): a progress line every this many steps or 30 s
    # > 0: each epoch's shuffled examples are cut into pools of this many batches, sorted by length inside a pool,
    # and the batches shuffled: rows of a batch have similar lengths, so little padding is computed (measured in
    # benchmarks/bucketing.py). 0 = plain shuffling. Either way the order is a function of (seed, step).
    # Off by default: 50 trained rotten_tomatoes 1.2-1.65x faster but 2 points lower on test with 2 of 2 seeds
    # (benchmarks/results/SPEED.md)
    length_buckets: int = 0
    # recompute each decoder layer in backward instead of keeping its activations: measured 0.52-0.70x PEFT's peak
    # memory instead of 0.76-0.98x, at 1.3-1.6x the step time (SPEED.md), hence off by default
    activation_checkpointing: bool = False
    skip_bad_rows: bool = False  # skip (and count) rows with a missing field or unknown label instead of failing
    # classification on imbalanced data: balanced = each class's loss weighted by n / (classes * its count)
    class_weights: str = "none"  # none | balanced
    # the validation metric that picks the kept prompt: auto = macro_f1 when the train labels are imbalanced (the
    # largest class over 1.5x the smallest), else accuracy (exact match for generation) | accuracy | macro_f1
    select: str = "auto"
    finetune_lr: float = 2e-5  # full fine-tuning baseline (compare): AdamW lr for the whole model
    lora_lr: float = 2e-4  # LoRA baseline (compare): AdamW lr for the adapters

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adafactor"):
            raise SoftPromptError(f"train.optimizer must be adamw or adafactor, not {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if not self.lr > 0:
            raise SoftPromptError(f"train.lr must be positive (got {self.lr})")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise SoftPromptError(f"train.schedule must be constant, linear or cosine, not {self.schedule!r}")
        if self.precision not in ("auto", "float32", "bf16"):
            raise SoftPromptError(f"train.precision must be auto, float32 or bf16, not {self.precision!r}")
        if self.loss not in ("options", "lm"):
            raise SoftPromptError(f"train.loss must be options or lm, not {self.loss!r}")
        if self.class_weights not in ("none", "balanced"):
            raise SoftPromptError(f"train.class_weights must be none or balanced, not {self.class_weights!r}")
        if self.head_init not in ("auto", "probe", "random"):
            raise SoftPromptError(f"train.head_init must be auto, probe or random, not {self.head_init!r}")
        if self.select not in ("auto", "accuracy", "macro_f1", "exact_match"):
            raise SoftPromptError(f"train.select must be auto, accuracy, macro_f1 or exact_match, not {self.select!r}")
        if int(self.length_buckets) < 0:
            raise SoftPromptError(f"train.length_buckets must be >= 0 (got {self.length_buckets})")
        for key in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if int(getattr(self, key)) < 1:
                raise SoftPromptError(f"train.{key} must be at least 1 (got {getattr(self, key)})")
        if self.batch_size % self.grad_accum:
            raise SoftPromptError(f"train.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")


@dataclass
class RunConfig:
    """One training run."""

    model: str = "smollm2-135m"  # built-in name, model folder, .gguf file or hub id
    task: Any = "rotten_tomatoes"  # built-in task name, task YAML file, or a mapping (see TaskSpec)
    method: MethodArgs = field(default_factory=MethodArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    out_dir: str = "runs/run"
    seed: int = 0
    dtype: str | None = None  # backbone weights: float32 (CPU default) | bfloat16
    device: str | None = None  # cpu | cuda (default: cuda when available)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(cls: type, values: dict, where: str) -> dict:
    """YAML reads '1e-4' as a string and users type '20' for ints: convert by the field's declared type."""
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints.get(key)
        if value is None or hint is None or hint is typing.Any:
            continue
        allowed = typing.get_args(hint) or (hint,)
        if isinstance(value, bool) or any(isinstance(value, t) for t in allowed if isinstance(t, type)):
            if not (isinstance(value, int) and not isinstance(value, bool) and float in allowed):
                continue
        for t in (int, float):
            if t in allowed:
                try:
                    out[key] = t(value) if t is float or float(value) == int(float(value)) else value
                except (TypeError, ValueError):
                    raise SoftPromptError(f"config key {where}{key} must be {t.__name__}, not {value!r}") from None
                break
        if bool in allowed and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise SoftPromptError(f"config key {where}{key} must be true or false, not {value!r}")
            out[key] = value.lower() in ("true", "yes", "1")
    return out


def build_config(values: dict) -> RunConfig:
    check_keys(values, RunConfig, "")
    groups = {"method": MethodArgs, "train": TrainArgs}
    kwargs = dict(values)
    for name, cls in groups.items():
        sub = kwargs.get(name) or {}
        if not isinstance(sub, dict):
            raise SoftPromptError(f"config key {name} must be a mapping of {cls.__name__} fields")
        check_keys(sub, cls, name)
        try:
            kwargs[name] = cls(**_coerce(cls, sub, f"{name}."))
        except TypeError as e:
            raise SoftPromptError(f"bad {name} settings: {e}") from None
    return RunConfig(**_coerce(RunConfig, kwargs, ""))


def parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``--a.b value`` / ``--a.b=value`` pairs onto a nested dict."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--"):
            raise SoftPromptError(f"unexpected argument {item!r}; overrides look like --train.lr 0.3")
        key, eq, val = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise SoftPromptError(f"override --{key} needs a value")
            val = overrides[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        parts = key.split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SoftPromptError(f"cannot set {key}: {p} is not a group")
        node[parts[-1]] = parse_value(val)
    return values


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A YAML file (optional) plus overrides -> RunConfig, checked."""
    import yaml

    values: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise SoftPromptError(f"no config file at {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SoftPromptError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise SoftPromptError(f"{p} must be a YAML mapping of config keys")
    return build_config(apply_overrides(values, overrides or []))
