"""The training loop: it learns, it resumes bit for bit, it stops cleanly, it refuses to clobber a run."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_learnable_backbone, synthetic_splits

import softprompt as sp
from softprompt.train.checkpoint import load_checkpoint
from softprompt.train.config import load_config
from softprompt.train.loop import example_order, fit


def config(tmp_path, *overrides):
    return load_config(None, ["--task", json.dumps(SYNTH_TASK), "--out_dir", str(tmp_path / "run"),
                              "--method.num_virtual_tokens", "8", "--method.init", "random",
                              "--train.batch_size", "16", "--train.lr", "0.1", "--train.eval_every", "50",
                              "--train.precision", "float32", *overrides])  # the same on every CPU (auto: tested apart)


def test_a_tiny_model_learns_the_synthetic_task(tmp_path):
    bb = make_learnable_backbone()
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    res = fit(config(tmp_path, "--train.steps", "150"), backbone=bb, splits=synthetic_splits(), quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[:10]) / 10 > 0.65 and sum(losses[-10:]) / 10 < 0.3  # from chance (ln 2) to learned
    assert res.best["accuracy"] >= 0.9  # validation; chance is 0.5
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
    for name in ("prompt.safetensors", "checkpoint.safetensors", "metrics.jsonl", "summary.json", "plot.png",
                 "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    report = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report["trainable_params"] == 8 * 64 and report["trainable_share"] < 0.01
    assert report["bytes_per_task"] == (tmp_path / "run" / "prompt.safetensors").stat().st_size
    assert report["tokens_processed"] > 150 * 16 * 8 and report["peak_rss_mb"] > 0
    pf = sp.load_prompt(tmp_path / "run" / "prompt.safetensors", backbone=bb)
    assert pf.metadata["task"]["name"] == "synth" and pf.metadata["training"]["validation"]["accuracy"] >= 0.9


def test_data_order_is_a_function_of_seed_and_step():
    a = [example_order(50, 8, seed=1, step=s) for s in range(12)]
    assert a == [example_order(50, 8, seed=1, step=s) for s in range(12)]
    epoch0 = sum(a[:6], [])
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 48  # an epoch: no repeats, remainder dropped
    assert a[6:12] != a[:6]  # the next epoch is another permutation


def test_length_buckets_are_a_function_of_seed_and_step_and_cut_padding():
    lengths = [int(x) for x in torch.randint(3, 60, (200,), generator=torch.Generator().manual_seed(0))]
    a = [example_order(200, 8, seed=1, step=s, lengths=lengths, pool=5) for s in range(50)]
    assert a == [example_order(200, 8, seed=1, step=s, lengths=lengths, pool=5) for s in range(50)]
    epoch0 = sum(a[:25], [])
    assert sorted(epoch0) == list(range(200))  # every example once per epoch
    assert a[25:] != a[:25]
    plain = [example_order(200, 8, seed=1, step=s) for s in range(25)]

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(a[:25]) < 0.8 * padded(plain)  # real tokens are the same: the difference is padding


@pytest.mark.parametrize("optimizer,buckets", [("adamw", "0"), ("adafactor", "0"), ("adamw", "3")])
def test_resume_reaches_the_same_prompt_bit_for_bit(tmp_path, optimizer, buckets):
    splits = synthetic_splits()
    args = ("--train.steps", "12", "--train.save_every", "4", "--train.eval_every", "5", "--train.optimizer",
            optimizer, "--train.warmup_steps", "3", "--train.grad_accum", "2", "--train.length_buckets", buckets)
    whole = fit(config(tmp_path / "a", *args), backbone=make_learnable_backbone(), splits=splits, quiet=True)

    def crash(step, loss):
        if step == 10:
            raise KeyboardInterrupt  # killed between checkpoints (last one: step 8)

    cfg = config(tmp_path / "b", *args)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, backbone=make_learnable_backbone(), splits=splits, on_step=crash, quiet=True)
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.safetensors")["state"]["step"] == 8
    with pytest.raises(sp.SoftPromptError, match="already holds a run"):
        fit(cfg, backbone=make_learnable_backbone(), splits=splits, quiet=True)
    resumed = fit(cfg, backbone=make_learnable_backbone(), splits=splits, resume=True, quiet=True)
    a = sp.load_prompt(whole.prompt_path).tensors["prompt"]
    b = sp.load_prompt(resumed.prompt_path).tensors["prompt"]
    assert torch.equal(a, b) and resumed.final_step == 12


def test_resume_refuses_a_different_config(tmp_path):
    splits = synthetic_splits()
    fit(config(tmp_path, "--train.steps", "2"), backbone=make_learnable_backbone(), splits=splits, quiet=True)
    with pytest.raises(sp.SoftPromptError, match=r"different config \(train.lr: 0.1 -> 0.2\)"):
        fit(config(tmp_path, "--train.steps", "2", "--train.lr", "0.2"), backbone=make_learnable_backbone(),
            splits=splits, resume=True, quiet=True)
    with pytest.raises(sp.SoftPromptError, match="nothing to resume"):
        fit(config(tmp_path / "new", "--train.steps", "2"), backbone=make_learnable_backbone(), splits=splits,
            resume=True, quiet=True)


def test_overwrite_replaces_a_run(tmp_path):
    splits = synthetic_splits()
    fit(config(tmp_path, "--train.steps", "2"), backbone=make_learnable_backbone(), splits=splits, quiet=True)
    res = fit(config(tmp_path, "--train.steps", "3"), backbone=make_learnable_backbone(), splits=splits,
              overwrite=True, quiet=True)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert res.final_step == 3 and sum('"loss"' in r for r in rows) == 3  # the old run's metrics are gone


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def diverge(step, loss):
        if step == 5:
            with torch.no_grad():
                method.weight.fill_(float("nan"))

    bb = make_learnable_backbone()
    import softprompt.train.loop as loop

    created = []
    original = loop.get_method

    def spy(name):
        cls = original(name)

        class Spy(cls):
            @classmethod
            def create(klass, *a, **k):
                m = cls.create(*a, **k)
                created.append(m)
                return m
        return Spy

    loop.get_method = spy
    try:
        cfg = config(tmp_path, "--train.steps", "10", "--train.save_every", "2")
        with pytest.raises(sp.SoftPromptError, match=r"loss became nan at step 6.*last good checkpoint \(step 4\)"):
            method = None

            def hook(step, loss):
                nonlocal method
                method = created[0]
                diverge(step, loss)
            fit(cfg, backbone=bb, splits=synthetic_splits(), on_step=hook, quiet=True)
    finally:
        loop.get_method = original
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert ck["state"]["step"] == 4 and torch.isfinite(ck["method"]["prompt"]).all()
    assert not (tmp_path / "run" / "prompt.safetensors").exists()


def test_early_stopping_keeps_the_best_prompt(tmp_path):
    res = fit(config(tmp_path, "--train.steps", "200", "--train.eval_every", "10", "--train.patience", "2",
                     "--train.lr", "1e-4"),
              backbone=make_learnable_backbone(), splits=synthetic_splits(), quiet=True)
    assert res.stopped == "early_stopping" and res.final_step < 200
    pf = sp.load_prompt(res.prompt_path)
    assert pf.metadata["training"]["best_step"] <= res.final_step - 20


def losses_of(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_bf16_autocast_trains_a_float32_prompt(tmp_path):
    """bf16 autocast keeps the prompt float32, computes the float32 step up to bf16 rounding, and learns.

    No score threshold after N steps: AdamW's first steps move each entry by +-lr whatever its gradient's size, so
    bf16 rounding of near-zero gradients sends runs down different (equally good) paths: over 4 seeds each, bf16
    and float32 runs ended at 82-100% validation accuracy alike. One step is compared instead, with a bound that
    bf16 rounding (relative 2^-8 per operation) keeps well inside, and the loss must fall."""
    from softprompt.tasks.encode import TaskEncoder
    from softprompt.tasks.spec import TaskSpec
    from softprompt.train.loop import classification_loss

    bb = make_learnable_backbone()
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 8, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch(synthetic_splits()["train"][:16])
    init = sp.PromptTuning.create(bb, num_virtual_tokens=8, init="random").weight.detach()
    step = {}
    for precision in ("float32", "bf16"):
        prompt = sp.PromptTuning(init.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = classification_loss(enc, sp.PromptedModel(bb, prompt), b, "options")
        loss.backward()
        step[precision] = (float(loss), prompt.weight.grad)
    (l32, g32), (l16, g16) = step["float32"], step["bf16"]
    assert abs(l16 - l32) <= 0.02 * abs(l32)
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.995
    assert ((g16 - g32).norm() / g32.norm()) < 0.1
    res = fit(config(tmp_path, "--train.steps", "100", "--train.precision", "bf16"), backbone=bb,
              splits=synthetic_splits(), quiet=True)
    assert sp.load_prompt(res.prompt_path).tensors["prompt"].dtype == torch.float32
    losses = losses_of(tmp_path / "run")
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:10]) / 10  # measured: 0.85 -> 0.18-0.42 over 4 seeds


def test_lr_schedules():
    from softprompt.train.config import TrainArgs
    from softprompt.train.loop import lr_factor

    a = TrainArgs(steps=10, warmup_steps=2, schedule="linear")
    assert [round(lr_factor(s, a), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    c = TrainArgs(steps=10, schedule="cosine")
    assert lr_factor(0, c) == 1.0 and abs(lr_factor(5, c) - 0.5) < 1e-9 and lr_factor(10, c) < 1e-9
    assert lr_factor(7, TrainArgs(steps=10, schedule="constant")) == 1.0


def test_a_generation_task_trains_on_target_tokens(tmp_path):
    """target_field task: loss on the answer tokens only; the loss falls and exact match is reported."""
    splits = {s: [{"q": r["text"], "a": "yes" if r["label"] == "positive" else "no"} for r in rows]
              for s, rows in synthetic_splits().items()}
    task = {"name": "gen", "data": "x", "template": "{q} sentiment :", "target_field": "a", "max_length": 32}
    cfg = load_config(None, ["--task", json.dumps(task), "--out_dir", str(tmp_path / "run"),
                             "--method.num_virtual_tokens", "8", "--method.init", "random", "--train.batch_size", "16",
                             "--train.lr", "0.1", "--train.steps", "80", "--train.eval_every", "80",
                             "--train.eval_examples", "null", "--train.precision", "float32"])
    bb = make_learnable_backbone()
    res = fit(cfg, backbone=bb, splits=splits, quiet=True)
    losses = losses_of(tmp_path / "run")
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    # the reported exact match is what the saved prompt's greedy answers give, recomputed here row by row
    prompt = sp.load_prompt(res.prompt_path, backbone=bb)
    val = splits["validation"]
    right = sum(sp.generate(bb, prompt, [f"{r['q']} sentiment :"], max_new_tokens=32).texts[0].strip() == r["a"]
                for r in val)
    assert res.best["n"] == len(val) and res.best["exact_match"] == right / len(val)
    assert right > 0


def imbalanced_splits(seed: int = 0) -> dict:
    """The synthetic task with 80% positive rows."""
    import random

    rng = random.Random(seed)
    out = {}
    for split, rows in synthetic_splits(seed).items():
        pos = [r for r in rows if r["label"] == "positive"]
        neg = [r for r in rows if r["label"] == "negative"]
        out[split] = pos + neg[: len(pos) // 4]
        rng.shuffle(out[split])
    return out


def test_imbalanced_data_selects_on_macro_f1_and_weights_classes(tmp_path):
    """With 80/20 labels: the kept prompt is picked on macro-F1 (auto), balanced class weights change the loss by
    class (each class's rows weighted n / (classes x count)), and per-class recall is reported."""
    from softprompt.tasks.encode import TaskEncoder
    from softprompt.tasks.spec import TaskSpec
    from softprompt.train.loop import classification_loss

    splits = imbalanced_splits()
    res = fit(config(tmp_path / "a", "--train.steps", "8", "--train.eval_every", "4"),
              backbone=make_learnable_backbone(), splits=splits, quiet=True)
    assert res.report["selected_on"] == "macro_f1"
    m = sp.load_prompt(res.prompt_path).metadata["training"]["validation"]
    assert "macro_f1" in m and "accuracy" in m
    balanced = fit(config(tmp_path / "b", "--train.steps", "8", "--train.select", "accuracy"),
                   backbone=make_learnable_backbone(), splits=synthetic_splits(), quiet=True)
    assert balanced.report["selected_on"] == "accuracy"
    bb = make_learnable_backbone()
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 8, bb.max_positions, bb.pad_token_id)
    rows = splits["train"][:16]
    b = enc.classification_batch(rows)
    model = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=8, init="random"))
    w = torch.tensor([0.625, 2.5])  # 800 rows at 80/20: n / (2 x count)
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(enc.label_scores(model, b, normalize=False), b["y"], reduction="none")
        weighted = classification_loss(enc, model, b, "options", w)
    torch.testing.assert_close(weighted, (plain * w[b["y"]]).sum())
    res_w = fit(config(tmp_path / "c", "--train.steps", "8", "--train.class_weights", "balanced"),
                backbone=make_learnable_backbone(), splits=splits, quiet=True)
    from softprompt.evaluate import evaluate

    metrics = evaluate(sp.PromptedModel(bb, sp.load_method(res_w.prompt_path, bb)), enc, splits["test"])
    assert set(metrics["recall"]) == {"positive", "negative"}


def test_search_trains_each_value_and_keeps_the_best_on_validation(tmp_path, capsys):
    """`--search lr=...`: a trial per value, each recorded with its validation score; the best one's prompt is the
    run's prompt."""
    import shutil

    from conftest import write_model_and_data

    from softprompt.cli import main

    task = write_model_and_data(tmp_path, 256)
    argv = ["train", "--model", str(tmp_path / "model"), "--task", json.dumps(task), "--out_dir",
            str(tmp_path / "run"), "--method.num_virtual_tokens", "4", "--method.init", "random", "--train.steps", "30",
            "--train.batch_size", "16", "--train.eval_every", "15", "--train.precision", "float32",
            "--search", "lr=1e-4,0.1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "search.json").read_text())
    scores = {t["values"]["train.lr"]: t["score"] for t in result["trials"]}
    assert set(scores) == {1e-4, 0.1} and result["best"]["values"]["train.lr"] == max(scores, key=scores.get)
    best = tmp_path / "run" / "search" / result["best"]["trial"] / "prompt.safetensors"
    assert (tmp_path / "run" / "prompt.safetensors").read_bytes() == best.read_bytes()
    assert "best: lr-" in out
    assert main(argv) == 2 and "already holds a search" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run")
