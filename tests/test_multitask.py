"""Multi-task runs: several tasks' prompts in one run, rows of every task in one forward; each prompt equals its
own separate run with the same data order."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_learnable_backbone, synthetic_splits, write_model_and_data

import softprompt as sp
from softprompt.cli import main
from softprompt.train.config import build_config
from softprompt.train.loop import fit
from softprompt.train.multi import fit_many

GEN_TASK = {"name": "echo", "data": "synthetic", "template": "{text} answer :", "target_field": "answer",
            "max_length": 32}


def gen_splits():
    def rows(split):
        return [{**r, "answer": "yes" if r["label"] == "positive" else "no"} for r in split]

    return {k: rows(v) for k, v in synthetic_splits().items()}


def configs(tmp_path, steps=12):
    common = {"train": {"steps": steps, "batch_size": 8, "lr": 0.05, "eval_every": 6, "save_every": 6,
                        "precision": "float32"}}
    return [build_config({"task": SYNTH_TASK, "out_dir": str(tmp_path / "cls"), "seed": 0,
                          "method": {"num_virtual_tokens": 4, "init": "random"}, **common}),
            build_config({"task": {**SYNTH_TASK, "name": "flipped", "verbalizer": {"positive": " no",
                                                                                  "negative": " yes"}},
                          "out_dir": str(tmp_path / "flip"), "seed": 1,
                          "method": {"name": "p_tuning_v2", "num_virtual_tokens": 3, "init": "random"}, **common}),
            build_config({"task": GEN_TASK, "out_dir": str(tmp_path / "gen"), "seed": 2,
                          "method": {"num_virtual_tokens": 5, "init": "random"}, **common})]


def test_each_prompt_of_a_multi_task_run_equals_its_own_run(tmp_path):
    splits = [synthetic_splits(), synthetic_splits(), gen_splits()]
    together = fit_many(configs(tmp_path / "one"), backbone=make_learnable_backbone(), splits=splits, quiet=True)
    for cfg, split, res in zip(configs(tmp_path / "apart"), splits, together, strict=True):
        alone = fit(cfg, backbone=make_learnable_backbone(), splits=split, quiet=True)
        a, b = sp.load_prompt(res.prompt_path).tensors, sp.load_prompt(alone.prompt_path).tensors
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-4), (cfg.task, k, (a[k] - b[k]).abs().max())
        assert res.best_step == alone.best_step
        assert res.best["loss"] == pytest.approx(alone.best["loss"], abs=1e-4)


def test_a_multi_task_run_resumes_after_a_kill(tmp_path):
    splits = [synthetic_splits(), synthetic_splits(), gen_splits()]
    whole = fit_many(configs(tmp_path / "a"), backbone=make_learnable_backbone(), splits=splits, quiet=True)
    import softprompt.train.loop as loop

    real = loop._advance
    calls = {"n": 0}

    def dies(run, loss, tokens, on_step=None):
        out = real(run, loss, tokens, on_step)
        calls["n"] += 1
        if calls["n"] == 3 * 9:  # step 9 of every task done (last checkpoints: step 6)
            raise KeyboardInterrupt
        return out

    loop._advance = dies
    import softprompt.train.multi as multi

    multi._advance = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_many(configs(tmp_path / "b"), backbone=make_learnable_backbone(), splits=splits, quiet=True)
    finally:
        loop._advance = multi._advance = real
    resumed = fit_many(configs(tmp_path / "b"), backbone=make_learnable_backbone(), splits=splits, quiet=True,
                       resume=True)
    for w, r in zip(whole, resumed, strict=True):
        a, b = sp.load_prompt(w.prompt_path).tensors, sp.load_prompt(r.prompt_path).tensors
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_multi_task_through_the_cli_and_its_refusals(tmp_path, capsys):
    task = write_model_and_data(tmp_path, 64)
    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / f"{name}.yaml").write_text(json.dumps({
            "model": str(tmp_path / "model"), "task": task, "out_dir": str(tmp_path / name), "seed": seed,
            "method": {"num_virtual_tokens": 4, "init": "random"},
            "train": {"steps": 4, "batch_size": 8, "eval_every": 4, "precision": "float32"}}))
    assert main(["train", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("saved ") == 2 and (tmp_path / "a" / "prompt.safetensors").exists()
    assert (tmp_path / "b" / "prompt.safetensors").exists()
    with pytest.raises(sp.SoftPromptError, match="needs its own out_dir"):
        fit_many([build_config({"out_dir": "x"}), build_config({"out_dir": "x"})])
    with pytest.raises(sp.SoftPromptError, match="share the model"):
        fit_many([build_config({"out_dir": "x", "model": "a"}), build_config({"out_dir": "y", "model": "b"})])
