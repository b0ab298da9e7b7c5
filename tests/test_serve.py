"""The serving engine and the OpenAI-compatible HTTP API, on a tiny random Llama (no downloads)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import fastapi  # noqa: F401  (a runtime dependency: its absence fails, never skips)
import pytest
import torch
from conftest import SYNTH_TASK, make_backbone
from fastapi.testclient import TestClient

import softprompt as sp
from softprompt.runtime import threads
from softprompt.serve import PromptBank
from softprompt.serve.app import create_app
from softprompt.serve.engine import Engine, RequestError
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import load_task

TEXTS = ["the movie was", "a film is", "what is the capital of france ?", "hello world", "the plot and actors",
         "it was very really fun"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}answer : {% endif %}")


@pytest.fixture
def bank(tmp_path):
    return make_bank(tmp_path)


def make_bank(tmp_path):
    """Three generation tasks (2, 5 and 8 virtual tokens), a classifier, and a foreign prompt outside the folder."""
    bb = make_backbone("llama")
    bb.tokenizer.chat_template = CHAT_TEMPLATE
    folder = tmp_path / "prompts"
    folder.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        sp.save_prompt(folder / f"{name}.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=2 + 3 * i, seed=i),
                       bb)
    sp.save_prompt(folder / "sentiment.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=9), bb,
                   task=SYNTH_TASK)
    other = make_backbone("llama", seed=5)
    sp.save_prompt(tmp_path / "foreign.safetensors", sp.PromptTuning.create(other, num_virtual_tokens=2), other)
    return PromptBank(bb, folder)


@pytest.fixture
def engine(bank):
    eng = Engine(bank, max_batch=8, window_ms=30).start()
    yield eng
    eng.stop()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine)) as c:  # the prompt folder (for /admin/reload) is the bank's
        yield c


def alone(bank, task, text, n):
    prompt = None if task is None else bank.get(task).prompt
    return sp.generate(bank.backbone, prompt, [text], max_new_tokens=n, reuse_prompt_cache=False).tokens[0]


def submit_all(engine, jobs):
    """Submit jobs at once (so they share batches) and wait for every result."""
    results, done = {}, threading.Event()

    def emitter(i):
        def emit(kind, value):
            if kind in ("done", "error"):
                results[i] = (kind, value)
                if len(results) == len(jobs):
                    done.set()
        return emit

    for i, job in enumerate(jobs):
        job.emit = emitter(i)
        engine.submit(job)
    assert done.wait(60)
    return [results[i] for i in range(len(jobs))]


def test_starting_the_engine_ends_the_starting_threads_openmp_pool_and_answers_stay_equal(bank):
    """A thread that ran parallel operations keeps a pool of OpenMP workers; beside the engine worker's own pool,
    libgomp stops spinning between parallel regions and every parallel operation of the worker wakes its threads
    through the kernel (runtime/threads.py). Starting the engine ends the starting thread's pool: the process holds
    the worker's thread more and that pool's helpers fewer; answers and later parallel operations stay right."""
    helpers = torch.get_num_threads() - 1
    if helpers < 1 or threads._pause() is None:
        pytest.skip("torch runs one thread here, or not on libgomp: no pool to end")
    x = torch.arange(1 << 20, dtype=torch.float32)
    assert float((x * 2).sum()) == float(x.sum()) * 2  # a parallel region on this thread: its pool exists
    before = len(os.listdir("/proc/self/task"))
    eng = Engine(bank, max_batch=8).start()
    try:
        assert len(os.listdir("/proc/self/task")) == before - helpers + 1
        [(kind, result)] = submit_all(eng, [eng.generation_job("alpha", "the cat sat", max_tokens=5, temperature=0)])
        assert kind == "done" and result.tokens == alone(bank, "alpha", "the cat sat", 5)
    finally:
        eng.stop()
    assert torch.equal(x * 2, x + x)  # this thread's next parallel regions: a new pool


# --- engine: mixed-task batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("reuse,mix", [(True, True), (False, True), (True, False)])
def test_mixed_task_batches_give_each_request_its_solo_greedy_tokens(bank, reuse, mix):
    engine = Engine(bank, max_batch=16, window_ms=200, reuse_prompt_cache=reuse, mix_tasks=mix).start()
    try:
        tasks = ["alpha", "beta", "gamma", "tiny-llama-0", "alpha", "gamma"]  # the last: the bare backbone
        lengths = [5, 9, 3, 7, 1, 6]
        jobs = [engine.generation_job(t, text, max_tokens=n, temperature=0)
                for t, text, n in zip(tasks, TEXTS, lengths, strict=True)]
        results = submit_all(engine, jobs)
        snap = engine.metrics.snapshot()
        assert (snap["batches"], snap["max_batch_rows"]) == ((1, len(jobs)) if mix else (4, 2))  # per task: 4
        for t, text, n, (kind, res) in zip(tasks, TEXTS, lengths, results, strict=True):
            assert kind == "done"
            task = None if t == engine.model_name else t
            assert res.tokens == alone(bank, task, text, n)
            assert res.finish_reason == "length" and len(res.tokens) == n
    finally:
        engine.stop()


def test_classification_and_generation_share_a_batch(bank, engine):
    enc = TaskEncoder(load_task(SYNTH_TASK), bank.backbone.tokenizer, 4, bank.backbone.max_positions,
                      bank.backbone.pad_token_id)
    texts = ["the movie was great fun", "boring and bad plot", "it was awful"]
    jobs = [engine.classify_job("sentiment", t) for t in texts] + [engine.generation_job("beta", "the film", max_tokens=4,
                                                                                         temperature=0)]
    results = submit_all(engine, jobs)
    model = sp.PromptedModel(bank.backbone, sp.PromptTuning(bank.get("sentiment").prompt.embeddings.clone()))
    with torch.no_grad():
        want = enc.label_scores(model, enc.classification_batch([{"text": t, "label": "positive"} for t in texts]))
    for (kind, res), w in zip(results[:3], want, strict=True):
        assert kind == "done"
        assert res.label == enc.task.labels[int(w.argmax())]
        assert torch.allclose(torch.tensor([res.scores[lab] for lab in enc.task.labels]), w, atol=1e-5)
    assert results[3][1].tokens == alone(bank, "beta", "the film", 4)


def test_seeded_sampling_does_not_depend_on_the_batch(bank, engine):
    one = submit_all(engine, [engine.generation_job("alpha", "the movie", max_tokens=8, temperature=1.3, seed=5)])
    many = submit_all(engine, [engine.generation_job("alpha", "the movie", max_tokens=8, temperature=1.3, seed=5)] +
                      [engine.generation_job("beta", t, max_tokens=8, temperature=0.9, seed=i) for i, t in enumerate(TEXTS)])
    assert one[0][1].tokens == many[0][1].tokens


def test_bad_generation_requests_are_refused_before_they_queue(engine):
    with pytest.raises(sp.SoftPromptError, match="unknown task 'nope'"):
        engine.generation_job("nope", "the")
    with pytest.raises(RequestError, match="max_tokens must be between 1"):
        engine.generation_job("alpha", "the", max_tokens=0)
    with pytest.raises(RequestError, match="positions; shorten the prompt"):
        engine.generation_job("gamma", "the " * 126)  # 126 tokens + 8 virtual > 128
    with pytest.raises(RequestError, match="at most 123 new tokens fit"):
        engine.generation_job("alpha", "the movie was", max_tokens=200)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.generation_job("alpha", "  ")
    with pytest.raises(RequestError, match="not a classification task"):
        engine.classify_job("alpha", "the movie")


# --- HTTP -------------------------------------------------------------------------------------------------


def test_models_lists_every_task_and_the_backbone(client, bank):
    data = client.get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids == ["tiny-llama-0", "alpha", "beta", "gamma", "sentiment"]
    sent = data[-1]["softprompt"]
    assert sent["kind"] == "classification" and sent["labels"] == ["positive", "negative"]


def test_completion_equals_the_offline_result(client, bank):
    r = client.post("/v1/completions", json={"model": "beta", "prompt": "the movie was", "max_tokens": 6,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = alone(bank, "beta", "the movie was", 6)
    assert body["choices"][0]["text"] == bank.backbone.tokenizer.decode(want, skip_special_tokens=True)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert body["object"] == "text_completion" and body["model"] == "beta"


def sse(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_streaming_sends_the_same_text_in_pieces(client, bank):
    req = {"model": "alpha", "prompt": "what is the capital", "max_tokens": 10, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=req | {"stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 10
    pieces = [e["choices"][0]["text"] for e in events[:-2]]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == full
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_text_and_are_never_streamed(client, bank):
    req = {"model": "gamma", "prompt": "the movie was", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    word = full.split()[3]
    stopped = client.post("/v1/completions", json=req | {"stop": [word]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full[: full.index(word)]
    with client.stream("POST", "/v1/completions", json=req | {"stop": word, "stream": True}) as r:
        streamed = "".join(e["choices"][0]["text"] for e in sse(r)[:-1])
    assert streamed == stopped["text"]


def test_chat_completion_uses_the_chat_template(client, bank):
    msgs = [{"role": "user", "content": "what is the capital of france ?"}]
    r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": msgs, "max_tokens": 5,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    tok = bank.backbone.tokenizer
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    want = alone(bank, "alpha", ids, 5)
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(want, skip_special_tokens=True)}
    with client.stream("POST", "/v1/chat/completions", json={"model": "alpha", "messages": msgs, "max_tokens": 5,
                                                             "temperature": 0, "stream": True}) as s:
        events = sse(s)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == choice["message"]["content"]
    assert events[0]["object"] == "chat.completion.chunk"


def test_classify_returns_the_label_and_scores(client, bank):
    """Over HTTP, each input's scores are the log-likelihoods of its label words that the plain model gives with the
    prompt prepended by hand (full logits, no cache), and its label is their best."""
    texts = ["the movie was great", "boring plot"]
    r = client.post("/v1/classify", json={"model": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    bb = bank.backbone
    prompt = bank.get("sentiment").prompt.embeddings
    words = {"positive": bb.tokenizer(" yes", add_special_tokens=False)["input_ids"][0],
             "negative": bb.tokenizer(" no", add_special_tokens=False)["input_ids"][0]}
    for d, text in zip(data, texts, strict=True):
        ids = torch.tensor(bb.tokenizer(f"{text} sentiment :")["input_ids"])
        with torch.no_grad():
            embeds = torch.cat([prompt, bb.embed(ids)])[None]
            logp = bb.model(inputs_embeds=embeds).logits[0, -1].log_softmax(-1)
        want = {label: float(logp[i]) for label, i in words.items()}
        assert set(d["scores"]) == set(want)
        for label in want:
            assert abs(d["scores"][label] - want[label]) < 1e-4
        assert d["label"] == max(want, key=want.get)


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_input_gets_openai_shaped_errors_and_the_server_keeps_serving(client):
    post = client.post
    err = error_of(post("/v1/completions", json={"model": "nope", "prompt": "the"}), 404)
    assert err["code"] == "model_not_found" and "unknown task 'nope'" in err["message"]
    err = error_of(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = error_of(post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens"
    error_of(post("/v1/completions", json={"model": "alpha"}), 400)  # prompt missing
    err = error_of(post("/v1/completions", json={"model": "alpha", "prompt": "the " * 130}), 400)
    assert err["code"] == "context_length_exceeded" and "128 positions" in err["message"]
    for bad in (0, -3, 10**6):
        assert error_of(post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": bad}),
                        400)["param"] == "max_tokens"
    assert error_of(post("/v1/completions", json={"model": "alpha", "prompt": ""}), 400)["param"] == "prompt"
    assert error_of(post("/v1/completions", json={"model": "alpha", "prompt": []}), 400)["param"] == "prompt"
    assert error_of(post("/v1/completions", json={"model": "alpha", "prompt": "the", "n": 3}), 400)["param"] == "n"
    error_of(post("/v1/completions", json={"model": "alpha", "prompt": "the", "temperature": 5}), 400)
    error_of(post("/v1/chat/completions", json={"model": "alpha", "messages": []}), 400)
    error_of(post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}),
             400)
    error_of(post("/v1/classify", json={"model": "alpha", "input": "the movie"}), 400)  # not a classifier
    error_of(post("/v1/classify", json={"model": "sentiment", "input": ""}), 400)
    error_of(post("/v1/classify", json={"model": "sentiment", "input": {"review": "x"}}), 400)
    error_of(post("/v1/completions", json={"model": "../../etc/passwd", "prompt": "the"}), 404)
    error_of(client.delete("/admin/tasks/..%2F..%2Fetc"), 404)
    ok = post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_api_key_is_required_when_set(engine):
    with TestClient(create_app(engine, api_key="s3cret")) as c:
        err = error_of(c.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key"
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"  # liveness needs no key


def test_health_and_metrics(client):
    client.post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": 3})
    client.post("/v1/completions", json={"model": "alpha", "prompt": "a film", "max_tokens": 3})
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-llama-0", "tasks": 4, "queue_depth": 0,
                                            "worker_alive": True}
    m = client.get("/metrics", params={"format": "json"}).json()
    assert m["requests"]["generate"] == 2 and m["generated_tokens"] == 6 and m["batches"] == 2
    assert m["prompt_kv_hits"] >= 1 and m["latency_p50_s"] > 0
    text = client.get("/metrics").text
    assert 'softprompt_requests_total{kind="generate"} 2' in text and "softprompt_latency_p99_seconds" in text
    assert client.get("/openapi.json").json()["paths"]["/v1/classify"]


def test_reload_adds_replaces_and_removes_prompts_at_run_time(client, bank, tmp_path):
    folder = bank.folder
    before = client.post("/v1/completions", json={"model": "alpha", "prompt": "the movie", "max_tokens": 5,
                                                  "temperature": 0}).json()["choices"][0]["text"]
    sp.save_prompt(folder / "delta.safetensors", sp.PromptTuning.create(bank.backbone, num_virtual_tokens=3, seed=42), bank.backbone)
    sp.save_prompt(folder / "alpha.safetensors", sp.PromptTuning.create(bank.backbone, num_virtual_tokens=5, seed=43), bank.backbone,
                   overwrite=True)
    (folder / "beta.safetensors").unlink()
    shutil.copy(tmp_path / "foreign.safetensors", folder / "foreign.safetensors")
    report = client.post("/admin/reload").json()
    assert report["added"] == ["delta"] and report["replaced"] == ["alpha"] and report["removed"] == ["beta"]
    assert "trained on backbone" in report["refused"]["foreign.safetensors"]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama-0", "alpha", "delta", "gamma",
                                                                         "sentiment"]
    after = client.post("/v1/completions", json={"model": "alpha", "prompt": "the movie", "max_tokens": 5,
                                                 "temperature": 0}).json()["choices"][0]["text"]
    want = alone(bank, "alpha", "the movie", 5)
    assert after == bank.backbone.tokenizer.decode(want, skip_special_tokens=True) != before
    error_of(client.post("/v1/completions", json={"model": "beta", "prompt": "the"}), 404)
    assert client.delete("/admin/tasks/delta").json() == {"removed": "delta"}
    error_of(client.delete("/admin/tasks/delta"), 404)


def test_hot_add_and_remove_while_requests_are_in_flight(client, bank):
    failures, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            r = client.post("/v1/completions", json={"model": "gamma", "prompt": "the movie", "max_tokens": 3,
                                                     "temperature": 0})
            if r.status_code != 200:
                failures.append(r.text)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(5):
        bank.add(f"hot{i}", bank.get("alpha").source)
        r = client.post("/v1/completions", json={"model": f"hot{i}", "prompt": "the", "max_tokens": 2})
        assert r.status_code == 200, r.text
        bank.remove(f"hot{i}")
    stop.set()
    for t in threads:
        t.join()
    assert not failures


# --- a live server on loopback: the official openai client, and a client that goes away mid-stream ------


@pytest.fixture
def live(engine):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key="k"), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_official_openai_client_works_unchanged(live, bank):
    import openai  # a dev dependency: CI installs it; missing, the test fails instead of skipping
    client = openai.OpenAI(base_url=live + "/v1", api_key="k", max_retries=0)
    assert "sentiment" in [m.id for m in client.models.list()]
    c = client.completions.create(model="beta", prompt="the movie was", max_tokens=6, temperature=0)
    want = bank.backbone.tokenizer.decode(alone(bank, "beta", "the movie was", 6), skip_special_tokens=True)
    assert c.choices[0].text == want and c.usage.completion_tokens == 6
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=4, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("length", "stop")
    stream = client.completions.create(model="beta", prompt="the movie was", max_tokens=6, temperature=0,
                                       stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == want
    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=4, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="beta", prompt="x", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_client_leaving_mid_stream_frees_its_row(live, engine, monkeypatch):
    import httpx

    forward = engine.backbone.forward

    def slow(*a, **k):  # make each decode step take a while, so the stream is still running when we leave
        time.sleep(0.02)
        return forward(*a, **k)

    monkeypatch.setattr(engine.backbone, "forward", slow)
    req = {"model": "alpha", "prompt": "the movie", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(base_url=live, headers={"Authorization": "Bearer k"}) as c:
        with c.stream("POST", "/v1/completions", json=req) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
    deadline = time.time() + 10
    while engine.metrics.snapshot()["cancelled"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    snap = engine.metrics.snapshot()
    assert snap["cancelled"] == 1 and snap["generated_tokens"] == 0  # it never ran to its 100 tokens
    with httpx.Client(base_url=live, headers={"Authorization": "Bearer k"}) as c:
        r = c.post("/v1/completions", json=req | {"stream": False, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_serve_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    import socket

    from softprompt.cli import main

    bb = make_backbone("llama")
    bb.model.save_pretrained(tmp_path / "model")
    bb.tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "model"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "--port" in err[0]
    assert main(["serve", "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "nope"), "--port",
                 str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt folder" in err[0] and "does not exist" in err[0]


def test_completion_from_token_ids_and_a_list_of_prompts(client, bank):
    ids = bank.backbone.tokenizer("the movie was")["input_ids"]
    by_text = client.post("/v1/completions", json={"model": "beta", "prompt": "the movie was", "max_tokens": 4,
                                                   "temperature": 0}).json()["choices"][0]["text"]
    by_ids = client.post("/v1/completions", json={"model": "beta", "prompt": ids, "max_tokens": 4,
                                                  "temperature": 0}).json()["choices"][0]["text"]
    assert by_ids == by_text
    many = client.post("/v1/completions", json={"model": "beta", "prompt": ["the movie was", "hello world"],
                                                "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1] and many["choices"][0]["text"] == by_text
    error_of(client.post("/v1/completions", json={"model": "beta", "prompt": [10**9]}), 400)


def test_prefix_and_prompt_tuned_tasks_share_batches_and_answer_as_alone(tmp_path):
    """A prefix-tuned (per-layer key/value) task, a P-tuned classifier and a prompt-tuned task in one bank: mixed
    generation batches give each row its solo greedy tokens, /v1/classify on the P-tuned classifier equals offline
    scoring, and /v1/models says each task's method and prompt kind."""
    bb = make_backbone("llama")
    folder = tmp_path / "prompts"
    folder.mkdir()
    methods = {"prefix": sp.PrefixTuning.create(bb, num_virtual_tokens=5, seed=1),
               "deep": sp.DeepPrompt.create(bb, num_virtual_tokens=3, seed=2),
               "plain": sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=3)}
    for name, m in methods.items():
        sp.save_prompt(folder / f"{name}.safetensors", m, bb)
    clf = sp.PTuning.create(bb, num_virtual_tokens=4, seed=4)
    sp.save_prompt(folder / "clf.safetensors", clf, bb, task=SYNTH_TASK)
    bank = PromptBank(bb, folder)
    engine = Engine(bank, max_batch=16, window_ms=200).start()
    try:
        tasks = ["prefix", "plain", "deep", "tiny-llama-0", "prefix"]
        jobs = [engine.generation_job(t, text, max_tokens=5, temperature=0) for t, text in zip(tasks, TEXTS, strict=False)]
        results = submit_all(engine, jobs)
        assert engine.metrics.snapshot()["batches"] == 1
        for t, text, (kind, res) in zip(tasks, TEXTS, results, strict=False):
            prompt = None if t == "tiny-llama-0" else bank.get(t).prompt
            assert kind == "done" and res.tokens == sp.generate(bb, prompt, [text], max_new_tokens=5).tokens[0]
        with TestClient(create_app(engine)) as client:
            models = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
            assert (models["prefix"]["method"], models["prefix"]["prompt_kind"]) == ("prefix_tuning", "kv")
            assert (models["clf"]["method"], models["clf"]["prompt_kind"]) == ("p_tuning", "embeddings")
            r = client.post("/v1/classify", json={"model": "clf", "input": ["the movie was great", "boring plot"]})
            assert r.status_code == 200, r.text
            enc = TaskEncoder(load_task(SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
            model = sp.PromptedModel(bb, sp.load_method(folder / "clf.safetensors", bb)).eval()
            with torch.no_grad():
                want = enc.label_scores(model, enc.classification_batch(
                    [{"text": t, "label": "positive"} for t in ["the movie was great", "boring plot"]]))
            for d, w in zip(r.json()["data"], want, strict=True):
                assert torch.allclose(torch.tensor([d["scores"][lab] for lab in enc.task.labels]), w, atol=1e-5)
    finally:
        engine.stop()
