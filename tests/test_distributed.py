"""torchrun with 2 processes (gloo, CPU) reaches the prompt that 1 process reaches with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_learnable_backbone, write_model_and_data

import softprompt as sp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    task = write_model_and_data(tmp, 128)
    args = ["--model", str(tmp / "model"), "--task", json.dumps(task), "--method.num_virtual_tokens", "4",
            "--method.init", "random", "--train.steps", "6", "--train.batch_size", "8", "--train.grad_accum", "2",
            "--train.lr", "0.1", "--train.length_buckets", "4", "--train.eval_every", "3", "--train.eval_examples", "16",
            "--train.precision", "float32", "--device", "cpu"]
    return tmp, args


@pytest.fixture(scope="module")
def one_process(setup):
    """The prompt that one process reaches: the reference both launchers must reach."""
    tmp, args = setup
    run([sys.executable, "-m", "softprompt.cli", "train", *args, "--out_dir", str(tmp / "one")])
    return sp.load_prompt(tmp / "one" / "prompt.safetensors").tensors["prompt"]


def run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_reach_the_same_prompt_as_one(setup, one_process):
    tmp, args = setup
    one = one_process
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "softprompt.cli", "train", *args, "--out_dir", str(tmp / "two")])
    two = sp.load_prompt(tmp / "two" / "prompt.safetensors").tensors["prompt"]
    init = sp.PromptTuning.create(make_learnable_backbone(), num_virtual_tokens=4, init="random").weight.detach()
    assert not torch.allclose(one, init, atol=1e-3)  # it trained
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-4)
    # only rank 0 writes: one metrics line per step and eval
    assert json.loads((tmp / "two" / "summary.json").read_text())["processes"] == 2
    rows = (tmp / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in r for r in rows) == 6


def test_accelerate_launch_runs_the_same_command(setup, one_process):
    """accelerate's --cpu launcher is single-process (multi-CPU needs MPI); --multi_gpu starts torchrun-style
    workers, which pick gloo when there is no GPU."""
    import accelerate  # noqa: F401  (a runtime dependency: its absence is a failure, not a skip)

    tmp, args = setup
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "softprompt.cli", "train", *args, "--out_dir", str(tmp / "acc")])
    acc = sp.load_prompt(tmp / "acc" / "prompt.safetensors").tensors["prompt"]
    assert json.loads((tmp / "acc" / "summary.json").read_text())["processes"] == 2
    torch.testing.assert_close(one_process, acc, atol=1e-5, rtol=1e-4)
