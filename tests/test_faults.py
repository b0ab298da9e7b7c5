"""Training survives kill -9: a run killed at random moments (before its first checkpoint, mid-step, mid-eval,
mid-save) and resumed each time reaches the prompt an uninterrupted run reaches, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_model_and_data

import softprompt as sp

KILLS = 10


def _last_step(out) -> int:
    try:
        rows = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(r).get("step", 0) for r in rows if r.strip().endswith("}")]
    return max(steps, default=0)


def kill_and_resume(cmd: list[str], out, env: dict, n: int, rng: random.Random, step_window: int,
                    timeout: float = 600) -> tuple[int, list[int]]:
    """Run `cmd` into `out`, SIGKILL it n times (the first before any checkpoint, the others a random moment up
    to `step_window` steps past where that process started), resuming each time; then let it finish."""
    kills, moments = 0, []
    while True:
        resume = ["--resume"] if (out / "config.json").exists() else []
        proc = subprocess.Popen(cmd + ["--out_dir", str(out), *resume], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        if kills < n:
            before = _last_step(out)
            if kills == 0:  # the first: once the run folder exists, before any checkpoint
                while not (out / "config.json").exists() and proc.poll() is None:
                    time.sleep(0.005)
            else:  # a random moment a few steps past where this process started
                target = before + rng.randint(1, step_window)
                while _last_step(out) < target and proc.poll() is None:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.02))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                moments.append(_last_step(out))
                continue
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-2000:]
        if kills >= n:
            return kills, moments


def test_kill_9_at_random_moments_and_resume_reaches_the_same_prompt_bit_for_bit(tmp_path):
    task = write_model_and_data(tmp_path, 64)
    args = ["--model", str(tmp_path / "model"), "--task", json.dumps(task), "--method.num_virtual_tokens", "4",
            "--method.init", "random", "--train.steps", "100", "--train.batch_size", "4", "--train.lr", "0.05",
            "--train.save_every", "5", "--train.eval_every", "20", "--train.eval_examples", "8",
            "--train.precision", "float32", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOFTPROMPT_DEBUG": "1"}
    cmd = [sys.executable, "-m", "softprompt.cli", "train", *args]
    whole = subprocess.run(cmd + ["--out_dir", str(tmp_path / "whole")], capture_output=True, text=True, env=env,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "killed"
    kills, moments = kill_and_resume(cmd, out, env, KILLS, random.Random(0), step_window=8)
    assert kills == KILLS and moments[0] == 0, moments  # the first kill came before the first checkpoint
    a = sp.load_prompt(tmp_path / "whole" / "prompt.safetensors").tensors["prompt"]
    b = sp.load_prompt(out / "prompt.safetensors").tensors["prompt"]
    assert torch.equal(a, b)
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert steps == list(range(1, 101))  # each step logged once, however often the run was killed


@pytest.mark.slow
def test_kill_9_during_a_real_smollm2_run_and_resume_bit_for_bit(tmp_path):
    """The same on SmolLM2-135M and real Rotten Tomatoes reviews: 3 kills (one before the first checkpoint)."""
    args = ["configs/rotten_tomatoes.yaml", "--method.num_virtual_tokens", "4", "--train.steps", "12",
            "--train.batch_size", "2", "--train.save_every", "2", "--train.eval_every", "0", "--train.eval_examples", "8",
            "--train.precision", "float32", "--device", "cpu"]
    env = {**os.environ, "SOFTPROMPT_DEBUG": "1"}
    cmd = [sys.executable, "-m", "softprompt.cli", "train", *args]
    whole = subprocess.run(cmd + ["--out_dir", str(tmp_path / "whole")], capture_output=True, text=True, env=env,
                           timeout=900)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    kills, moments = kill_and_resume(cmd, out, env, 3, random.Random(1), step_window=4, timeout=900)
    assert kills == 3 and moments[0] == 0, moments
    a = sp.load_prompt(tmp_path / "whole" / "prompt.safetensors").tensors["prompt"]
    b = sp.load_prompt(out / "prompt.safetensors").tensors["prompt"]
    assert torch.equal(a, b)
