"""One schema for YAML, CLI overrides and Python; every shipped config loads."""

from pathlib import Path

import pytest

import softprompt as sp
from softprompt.train.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["--train.lr", "0.3", "--train.optimizer=adafactor", "--method.num_virtual_tokens", "50",
                             "--task", "reuters_r8", "--train.max_grad_norm", "null"])
    assert isinstance(cfg, RunConfig) and cfg.train.lr == 0.3 and cfg.train.optimizer == "adafactor"
    assert cfg.method.num_virtual_tokens == 50 and cfg.task == "reuters_r8" and cfg.train.max_grad_norm is None


@pytest.mark.parametrize("argv, message", [
    (["--train.lrr", "1"], "unknown config key train.lrr; did you mean train.lr?"),
    (["--trian.lr", "1"], "unknown config key trian; did you mean train?"),
    (["--train.optimizer", "sgd"], "train.optimizer must be adamw or adafactor"),
    (["--train.steps", "x"], "config key train.steps must be int, not 'x'"),
    (["--train.batch_size", "6", "--train.grad_accum", "4"], "not divisible by grad_accum 4"),
    (["--train.lr"], "override --train.lr needs a value"),
    (["lr", "3"], "unexpected argument 'lr'"),
])
def test_bad_config_is_one_clear_error(argv, message):
    with pytest.raises(sp.SoftPromptError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, argv)


def test_yaml_file_and_overrides_share_the_schema(tmp_path):
    (tmp_path / "c.yaml").write_text("model: smollm2-135m\ntrain:\n  lr: 1e-2\n  steps: 10\nmethod:\n  init: vocab\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["--train.steps", "20"])
    assert cfg.train.lr == 0.01 and cfg.train.steps == 20 and cfg.method.init == "vocab"
    (tmp_path / "bad.yaml").write_text("train: [1, 2]\n")
    with pytest.raises(sp.SoftPromptError, match="train must be a mapping"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(sp.SoftPromptError, match="no config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/ ships example configs"
    for f in files:
        cfg = load_config(str(f))
        sp.tasks.spec.load_task(cfg.task)
