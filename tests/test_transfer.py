"""Prompt transfer from a library (SPoT): candidates that fit the backbone, the probe, the similarity ranking, the
run started from the chosen prompt, and resume without probing again."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone, make_learnable_backbone, synthetic_splits

import softprompt as sp
from softprompt.train.config import build_config
from softprompt.train.loop import fit
from softprompt.transfer import library, similarity


def cfg(tmp_path, init="library", init_file=None, steps=30):
    return build_config({"task": SYNTH_TASK, "out_dir": str(tmp_path / "run"), "seed": 0,
                         "method": {"num_virtual_tokens": 4, "init": init, "init_file": init_file},
                         "train": {"steps": steps, "batch_size": 16, "lr": 0.1, "eval_every": steps,
                                   "precision": "float32"}})


def test_a_run_starts_from_the_library_prompt_most_like_its_probe(tmp_path):
    bb = make_learnable_backbone()
    lib = tmp_path / "library"
    lib.mkdir()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    sp.save_prompt(lib / "plus.safetensors", sp.PromptTuning(x), bb)
    sp.save_prompt(lib / "minus.safetensors", sp.PromptTuning(-x), bb)
    other = make_backbone("llama")  # another model: left out
    sp.save_prompt(lib / "other.safetensors", sp.PromptTuning(torch.randn(4, 32)), other)
    fits, left = library(lib, bb)
    assert sorted(p.name for p, _ in fits) == ["minus.safetensors", "plus.safetensors"]
    assert list(left) == [str(lib / "other.safetensors")]

    res = fit(cfg(tmp_path, init_file=str(lib)), backbone=bb, splits=synthetic_splits(), quiet=True)
    choice = json.loads((tmp_path / "run" / "transfer.json").read_text())
    probe = sp.load_prompt(tmp_path / "run" / "probe" / "prompt.safetensors").tensors["prompt"]
    assert choice["probe_steps"] == 10 and set(choice["left_out"]) == {str(lib / "other.safetensors")}
    want = {str(lib / n): similarity(t, probe) for n, t in (("plus.safetensors", x), ("minus.safetensors", -x))}
    assert choice["scores"] == pytest.approx(want)
    assert choice["source"] == max(want, key=want.get)
    training = sp.load_prompt(res.prompt_path).metadata["training"]["config"]["method"]
    assert training["init"] == "file" and training["init_file"] == choice["source"]
    # the same as a run started from that file by hand
    by_hand = fit(cfg(tmp_path / "b", init="file", init_file=choice["source"]), backbone=make_learnable_backbone(),
                  splits=synthetic_splits(), quiet=True)
    assert torch.equal(sp.load_prompt(res.prompt_path).tensors["prompt"],
                       sp.load_prompt(by_hand.prompt_path).tensors["prompt"])


def test_an_empty_library_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(sp.SoftPromptError, match="holds no prompt for backbone") as e:
        fit(cfg(tmp_path, init_file=str(tmp_path / "empty")), backbone=make_learnable_backbone(),
            splits=synthetic_splits(), quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(sp.SoftPromptError, match="is not a folder"):
        fit(cfg(tmp_path / "x", init_file=str(tmp_path / "nowhere")), backbone=make_learnable_backbone(),
            splits=synthetic_splits(), quiet=True)
