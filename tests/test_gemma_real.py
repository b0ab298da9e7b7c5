"""The built-in Gemma 3 270M (a Q4_K_M GGUF split over four wheels, put together, checked and de-quantised once)
on real data: its scaled embeddings, the fast path's self-check, and a prompt trained on Rotten Tomatoes."""

import pytest
import torch

import softprompt as sp
from softprompt.evaluate import evaluate
from softprompt.init import embed_scale
from softprompt.tasks.datasets import load_splits
from softprompt.tasks.spec import load_task, task_encoder
from softprompt.train.config import build_config
from softprompt.train.loop import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return sp.load_backbone("gemma3-270m", device="cpu")


def test_builtin_gemma_is_gemma3_with_scaled_embeddings_and_the_models_own_outputs(gemma):
    cfg = gemma.model.config.get_text_config()
    assert cfg.model_type.startswith("gemma3") and gemma.hidden_size == 640 and cfg.num_hidden_layers == 18
    assert embed_scale(gemma) == pytest.approx(640**0.5, rel=1e-2)
    tok = gemma.tokenizer
    head, tail = "The capital of France", " is"
    ids = torch.tensor([tok(head)["input_ids"]])  # <bos> The capital of France
    rest = torch.tensor([tok(tail, add_special_tokens=False)["input_ids"]])
    method = sp.PromptTuning.create(gemma, num_virtual_tokens=ids.shape[1], init="text", init_text="x")
    with torch.no_grad():
        method.weight.copy_(gemma.embed(ids)[0])  # the prompt: exactly what the embedding module gives those ids
        got = sp.PromptedModel(gemma, method)(rest, torch.ones_like(rest)).logits[0, -1]
        ref = gemma.model(input_ids=torch.cat([ids, rest], 1)).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-3 * float(ref.abs().max())), float((got - ref).abs().max())
    out = sp.generate(gemma, None, ["The capital of France is"], max_new_tokens=6)
    want = gemma.model.generate(input_ids=torch.tensor([tok("The capital of France is")["input_ids"]]),
                                max_new_tokens=6, do_sample=False)[0, -6:].tolist()
    assert out.tokens[0] == [t for t in want if t not in gemma.eos_token_ids][:len(out.tokens[0])]
    assert "capital" in out.texts[0]  # a real model stays on the subject (measured: " the capital of the country of")


def test_a_prompt_on_gemma_learns_rotten_tomatoes_and_other_models_refuse_it(gemma, tmp_path):
    splits = load_splits("rotten_tomatoes", seed=0)
    cfg = build_config({"model": "gemma3-270m", "task": "rotten_tomatoes", "out_dir": str(tmp_path / "run"),
                        "method": {"num_virtual_tokens": 20, "init": "labels"},
                        "train": {"steps": 60, "batch_size": 8, "eval_every": 60, "eval_examples": 100}})
    res = fit(cfg, backbone=gemma, splits=splits, quiet=True)
    method = sp.load_method(res.prompt_path, gemma)
    enc = task_encoder(load_task("rotten_tomatoes"), gemma, method.num_virtual_tokens)
    m = evaluate(sp.PromptedModel(gemma, method), enc, splits["test"][:200])
    assert m["accuracy"] >= 0.7, m
    with pytest.raises(sp.SoftPromptError, match="width 640.*'gemma3-270m'.*'smollm2-135m'.*576"):
        sp.load_method(res.prompt_path, sp.load_backbone("smollm2-135m"))
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    other = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=1000, hidden_size=640, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=16))
    other.config._name_or_path = "another-640-wide"
    with pytest.raises(sp.SoftPromptError, match="trained on backbone 'gemma3-270m'.*another-640-wide"):
        sp.load_method(res.prompt_path, sp.CausalLMBackbone(other))


def test_gemma_served_classifies_and_completes_as_offline(gemma, tmp_path):
    """The real Gemma behind the HTTP API: a classification prompt, a deep prompt and the bare model in one
    server; each answer equal to the same work done offline."""
    from fastapi.testclient import TestClient

    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine
    from softprompt.tasks.spec import BUILTIN_TASKS

    cls = sp.PromptTuning.create(gemma, num_virtual_tokens=8, init="labels",
                                 init_labels=[" positive", " negative"])
    deep = sp.DeepPrompt.create(gemma, num_virtual_tokens=4, init="random", seed=1)
    sp.save_prompt(tmp_path / "rt.safetensors", cls, gemma, task=BUILTIN_TASKS["rotten_tomatoes"].to_dict())
    sp.save_prompt(tmp_path / "deep.safetensors", deep, gemma)
    reviews = ["A warm, funny and beautifully acted film.", "Dull, lifeless and far too long."]
    engine = Engine(PromptBank(gemma, tmp_path), max_batch=8, window_ms=100).start()
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/classify", json={"model": "rt", "input": reviews})
            assert r.status_code == 200, r.text
            enc = task_encoder(load_task("rotten_tomatoes"), gemma, 8)
            with torch.no_grad():
                want = enc.label_scores(sp.PromptedModel(gemma, cls), enc.batch(
                    [{"text": t, "label": "positive"} for t in reviews]))
            for got, s in zip(r.json()["data"], want, strict=True):
                assert [got["scores"][k] for k in ("positive", "negative")] == pytest.approx(s.tolist(), abs=2e-3)
            for model, prompt in (("deep", deep), (gemma.name, None)):
                r = client.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                                          "max_tokens": 6, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == \
                    sp.generate(gemma, prompt, ["The capital of France is"], max_new_tokens=6).texts[0]
    finally:
        engine.stop()
