"""Serving under load and faults: continuous batching (requests join a running batch and answer as alone),
backpressure (503 + Retry-After), a supervised worker, timeouts, body limits, shutdown, incremental detokenisation
and the copy-on-write prompt bank. Tiny random models; nothing downloaded."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from conftest import make_backbone
from fastapi.testclient import TestClient
from test_serve import TEXTS, alone, error_of, make_bank, submit_all

import softprompt as sp
from softprompt.errors import SoftPromptError
from softprompt.fastpath import FastPathConfig
from softprompt.generation import Decoding, KVStore, Row, Sampling, _store, generate
from softprompt.serve.app import create_app
from softprompt.serve.engine import Engine
from softprompt.tasks.encode import left_pad


@pytest.fixture
def bank(tmp_path):
    return make_bank(tmp_path)


class Gate:
    """Holds the engine's worker inside its next prefill until opened (deterministic queue states)."""

    def __init__(self, engine: Engine):
        self.entered, self.open = threading.Event(), threading.Event()
        real = engine._prefill

        def held(jobs):
            self.entered.set()
            assert self.open.wait(30)
            return real(jobs)

        engine._prefill = held


# --- continuous batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("join", ["fresh", "picked", "in_step", "in_step_no_lean"])
def test_decoding_merge_gives_every_row_its_solo_tokens(join):
    """Rows prefilled later join a batch mid-decode (prompts of both kinds, different lengths) and each gets the
    greedy tokens it gets alone through the model's own forward (the fast path off: an independent reference); the
    running rows keep theirs. Both batches merge before their pick (fresh logits) or after it (the tokens they
    chose carried over: how the server sends a new row's first token before it joins); a batch merged at the
    other point is refused. `in_step`: the new rows' prefill rides in the running batch's step (one lean forward
    for both; `in_step_no_lean`: the lean forward off, the prefill runs first on its own)."""
    bb = make_backbone("llama")
    tok = bb.tokenizer
    prompts = [sp.PromptTuning.create(bb, num_virtual_tokens=3, seed=1)(), None,
               sp.PrefixTuning.create(bb, num_virtual_tokens=5, seed=2)(), sp.PromptTuning.create(bb, num_virtual_tokens=7, seed=3)()]
    texts = ["the movie was", "hello world", "what is the capital of france ?", "a"]
    lengths = [12, 5, 9, 6]
    rows = [Row(Sampling(max_new_tokens=n, ignore_eos=True)) for n in lengths]
    rt = sp.runtime(bb)
    rt.configure(FastPathConfig(enabled=False))
    wants = [sp.generate(bb, prompts[i], [texts[i]], max_new_tokens=lengths[i]).tokens[0] for i in range(4)]
    rt.configure(FastPathConfig(lean_decode=join != "in_step_no_lean"))
    assert (rt.joint_forward() is not None) == (join != "in_step_no_lean")

    def batch(idx, prefill=True):
        ids, mask = left_pad([tok(texts[i])["input_ids"] for i in idx], bb.pad_token_id, bb.device)
        return Decoding(bb, [prompts[i] for i in idx], ids, mask, [rows[i] for i in idx], prefill=prefill)

    with torch.no_grad():
        first = batch([0, 1])
        for _ in range(3):
            first.pick()
            first.advance()
        if join.startswith("in_step"):
            first.pick()
            late = batch([2, 3], prefill=False)
            first.advance(joining=late)  # the step and the new rows' prefill
            with pytest.raises(SoftPromptError, match="prefilled already"):
                first.advance(joining=late)
            late.pick()
            first.pick()
        else:
            late = batch([2, 3])
            if join == "picked":
                late.pick()  # the new rows' first tokens
                with pytest.raises(SoftPromptError, match="same point"):
                    first.merge(late)  # first holds fresh logits, late has picked
                first.pick()
        first.merge(late)
        if join != "fresh":
            first.advance()
        while first.running:
            first.pick()
            if first.running:
                first.advance()
        for i in range(4):
            assert rows[i].tokens[:len(wants[i])] == wants[i], i
            assert len(rows[i].tokens) == lengths[i]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_finished_rows_free_slots_that_merged_rows_fill_in_place(model_type, monkeypatch):
    """A finished row frees its slot without a copy; rows merged later are written into free slots (and slots
    after the last, within the buffers' room) without rebuilding the buffers; a merge of rows wider than the batch
    moves the batch's rows right in the same buffers; a merge past the buffers' room of rows rebuilds them; a batch
    more than half free is gathered within its buffers. Every row gets its solo greedy tokens throughout, on the
    lean decode step (Llama) and the model's own forward (GPT-2)."""
    bb = make_backbone(model_type)
    tok = bb.tokenizer
    prompts = [sp.PromptTuning.create(bb, num_virtual_tokens=3, seed=1)(), None,
               sp.PrefixTuning.create(bb, num_virtual_tokens=5, seed=2)(),
               sp.PromptTuning.create(bb, num_virtual_tokens=7, seed=3)(), None,
               sp.PrefixTuning.create(bb, num_virtual_tokens=2, seed=4)(), None]
    texts = ["the movie was great and long and the cast", "hello world", "what is", "a", "b c",
             "a much longer input than every other row here so that it is wider than the batch it joins, by several "
             "columns", "one more"]
    lengths = [14, 2, 9, 6, 3, 5, 4]
    rows = [Row(Sampling(max_new_tokens=n, ignore_eos=True)) for n in lengths]

    def batch(idx):
        ids, mask = left_pad([tok(texts[i])["input_ids"] for i in idx], bb.pad_token_id, bb.device)
        return Decoding(bb, [prompts[i] for i in idx], ids, mask, [rows[i] for i in idx], capacity=4)

    def buffer(dec):
        return dec.cache.layers[0].store.buf

    def one_store(dec):  # every layer's keys and values are views of the batch's one buffer, at their places
        buf = buffer(dec)
        assert _store(dec.cache) is not None
        for i, layer in enumerate(dec.cache.layers):
            for j, x in enumerate((layer.keys, layer.values)):
                assert x.data_ptr() == buf[2 * i + j].data_ptr() and x.shape[-2] == dec.width

    with torch.no_grad():
        failing = batch([0, 1])
        with monkeypatch.context() as m:  # a merge that fails (out of memory) leaves the batch as it was
            m.setattr(KVStore, "holding", classmethod(lambda *a, **k: (_ for _ in ()).throw(MemoryError)))
            with pytest.raises(MemoryError):
                failing.merge(batch([2, 3, 5]))  # five rows past the room of four: new buffers
        assert len(failing.rows) == 2 and failing.slots == [0, 1] and failing.mask.shape[0] == 2
        first = batch([0, 1])
        for _ in range(3):  # row 1 finishes after 2 tokens: its slot is freed, the batch keeps 2 slots
            first.pick()
            first.advance()
        assert first.slots == [0, None] and first.mask.shape[0] == 2
        assert first.position[1].item() == 0  # a free slot's position stays 0 (never past the model's positions)
        held = buffer(first)
        first.merge(batch([2, 3]))  # one into the free slot, one into a new slot within the room of 4 rows
        assert buffer(first) is held and first.slots == [0, 2, 3]
        one_store(first)
        first.pick()
        first.advance()
        first.merge(batch([4]))  # a fourth slot, still in place
        assert buffer(first) is held and len(first.slots) == 4
        first.pick()
        first.advance()
        for _ in range(3):  # row 4 finishes after 3 tokens: its slot is freed
            first.pick()
            first.advance()
        assert first.slots == [0, 2, 3, None]
        width = first.width

        def attended(dec, b):  # every layer's keys and values a slot attends to
            return buffer(dec)[:, b, :, :dec.width][:, :, dec.mask[b].bool()]
        before = {b: attended(first, b) for b in (0, 1, 2)}
        wide = batch([5])
        assert wide.width > width + 2
        first.merge(wide)  # wider than the batch: its rows moved right in the same buffers, the new row in slot 3
        assert buffer(first) is held and first.slots == [0, 2, 3, 5] and first.width == wide.width
        assert all(torch.equal(attended(first, b), x) for b, x in before.items())
        one_store(first)
        first.merge(batch([6]))  # a fifth row past the room of four: the buffers are rebuilt with the live rows
        assert buffer(first) is not held and None not in first.slots and len(first.slots) == 5
        one_store(first)
        while first.running:
            first.pick()
            assert 2 * len(first.running) >= len(first.slots) or not first.running  # mostly-free batches gathered
            if first.running:
                first.advance()
                one_store(first)
    for i in range(7):
        want = sp.generate(bb, prompts[i], [texts[i]], max_new_tokens=lengths[i]).tokens[0]
        assert rows[i].tokens[:len(want)] == want, i
        assert len(rows[i].tokens) == lengths[i]


def test_a_step_after_rows_finish_waits_briefly_for_their_clients_next_requests(bank):
    """After a decode step that finished rows, the next step waits (up to the window, at most a tenth of the step)
    for as many new requests, so a client that sends its next request at once is prefilled in this step; with no
    row finished it takes what is there without waiting."""
    engine = Engine(bank, max_batch=8, window_ms=500)  # its worker not started: _take is called here
    job = engine.generation_job("alpha", "the movie", max_tokens=2, temperature=0)

    def late():
        time.sleep(0.05)
        with engine._cv:
            engine._waiting.append(job)
            engine._queued_tokens += job.queued_tokens
            engine._cv.notify_all()

    engine._freed, engine._step_s = 1, 2.0  # one row finished in a 2 s step: wait up to min(0.5, 0.2) s
    threading.Thread(target=late).start()
    assert engine._take(False) == [job] and engine._freed == 0
    engine._freed, engine._step_s = 1, 0.3  # a 0.3 s step: at most 30 ms, the request comes after 50 ms
    threading.Thread(target=late).start()
    start = time.perf_counter()
    assert engine._take(False) == [] and time.perf_counter() - start < 0.25  # not the 0.5 s window
    time.sleep(0.1)
    start = time.perf_counter()  # nothing finished: no wait
    assert engine._take(False) == [job] and time.perf_counter() - start < 0.25


def test_pacing_spreads_a_burst_over_steps_and_holds_no_request_long(bank):
    """Beside a running batch whose rows live 8 steps, a step takes in (running + waiting) / 8 new generations
    once its prefill passes the floor; the rest wait, at most half a row's life; no pacing before a row has
    finished, with pacing off, or while the step's prefill is short. Classification is never held."""
    engine = Engine(bank, max_batch=64, window_ms=0, step_tokens=4096)  # its worker not started
    engine.pace_floor = 1

    def queue(n, kind="generate"):
        jobs = [engine.generation_job("alpha", "the movie", max_tokens=8, temperature=0) if kind == "generate"
                else engine.classify_job("sentiment", "the movie was fun") for _ in range(n)]
        with engine._cv:
            engine._waiting.extend(jobs)
            engine._queued_tokens += sum(j.queued_tokens for j in jobs)
        return jobs

    class Running:  # what _take reads of a running batch
        def __init__(self, n):
            self.running = list(range(n))

    engine._decoding = Running(21)
    burst = queue(12)
    assert engine._take(False) == burst  # no row has finished yet: the whole burst
    burst = queue(12)
    engine._lifetime = 8.0
    assert engine._take(False) == burst[:5]  # ceil((21 + 12) / 8)
    assert [j.held for j in burst[5:]] == [1] * 7
    engine._decoding = Running(26)
    assert engine._take(False) == burst[5:10]  # ceil((26 + 7) / 8)
    assert list(engine._waiting) == burst[10:]
    engine._waiting.clear()
    engine._lifetime, engine._decoding = 32.0, Running(20)  # a pace of one a step; a wait of at most 16 steps
    burst = queue(6)
    for job in burst[:4]:
        job.held = 16
    assert engine._take(False) == burst[:4]  # waited half a row's life: taken in past the pace
    assert list(engine._waiting) == burst[4:]
    engine._waiting.clear()
    engine._lifetime = 8.0
    burst, scored = queue(6), queue(3, "classify")
    engine.pace_floor = 10**6  # a short prefill is never held back
    assert engine._take(False) == burst + scored
    engine.pace_floor = 1
    engine._decoding, engine.max_batch = Running(2), 4
    burst, scored = queue(6), queue(5, "classify")
    # ceil(8 / 8); the classification behind the held ones is not held (up to max_batch of it)
    assert engine._take(False) == burst[:1] + scored[:4]
    assert list(engine._waiting) == burst[1:] + scored[4:]  # the held ones keep their place
    engine._waiting.clear()
    engine.pace = False
    burst = queue(5)
    assert engine._take(False) == burst[:2]  # max_batch


def test_requests_arriving_mid_decode_join_the_batch_and_answer_as_alone(bank):
    engine = Engine(bank, max_batch=8, window_ms=0).start()
    forward = bank.backbone.forward

    def slow(*a, **k):  # each step takes a while, so the late requests arrive while the long one decodes
        time.sleep(0.01)
        return forward(*a, **k)

    bank.backbone.forward = slow
    try:
        order, started = [], threading.Event()

        def emit_for(name):
            def emit(kind, value):
                if kind == "delta":
                    started.set()
                if kind in ("done", "error"):
                    order.append((name, kind, value))
            return emit

        long = engine.generation_job("alpha", TEXTS[0], max_tokens=40, temperature=0, ignore_eos=True,
                                     emit=emit_for("long"))
        engine.submit(long)
        assert started.wait(30)
        late = [("beta", TEXTS[1], 3), ("gamma", TEXTS[2], 4), ("tiny-llama-0", TEXTS[3], 2)]
        for task, text, n in late:
            engine.submit(engine.generation_job(task, text, max_tokens=n, temperature=0, emit=emit_for(task)))
        deadline = time.time() + 60
        while len(order) < 4 and time.time() < deadline:
            time.sleep(0.02)
        assert [o[0] for o in order][-1] == "long"  # the late, short requests did not wait for the long one
        got = {name: value for name, kind, value in order if kind == "done"}
        assert len(got) == 4
        bank.backbone.forward = forward
        want = alone(bank, "alpha", TEXTS[0], 40)  # alone it may stop at EOS; the long request ignores EOS
        assert got["long"].tokens[:len(want)] == want
        for task, text, n in late:
            assert got[task].tokens == alone(bank, None if task == "tiny-llama-0" else task, text, n), task
        assert engine.metrics.snapshot()["max_batch_rows"] == 3  # the late ones were prefilled together
    finally:
        bank.backbone.forward = forward
        engine.stop()


def test_classification_does_not_wait_for_generations(bank):
    engine = Engine(bank, max_batch=8, window_ms=0).start()
    forward = bank.backbone.forward
    bank.backbone.forward = lambda *a, **k: (time.sleep(0.01), forward(*a, **k))[1]
    try:
        done, started = {}, threading.Event()

        def emit_for(name):
            def emit(kind, value):
                if kind == "delta":
                    started.set()
                if kind == "done":
                    done[name] = time.perf_counter()
            return emit

        engine.submit(engine.generation_job("alpha", "the movie", max_tokens=60, temperature=0, ignore_eos=True,
                                            emit=emit_for("gen")))
        assert started.wait(30)
        engine.submit(engine.classify_job("sentiment", "the movie was great fun", emit_for("cls")))
        deadline = time.time() + 60
        while len(done) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert done["cls"] < done["gen"]
    finally:
        bank.backbone.forward = forward
        engine.stop()


def test_the_step_token_budget_keeps_a_long_prompt_for_a_later_step(bank):
    """A prompt whose prefill does not fit the step budget beside the running rows waits; alone it still runs."""
    engine = Engine(bank, max_batch=8, window_ms=50, step_tokens=8).start()
    try:
        jobs = [engine.generation_job("alpha", "the movie was very really fun", max_tokens=3, temperature=0),
                engine.generation_job("beta", "hello", max_tokens=3, temperature=0)]
        results = submit_all(engine, jobs)  # each over the budget with the other: two prefills
        assert [k for k, _ in results] == ["done", "done"]
        assert engine.metrics.snapshot()["batches"] == 2
        assert results[0][1].tokens == alone(bank, "alpha", "the movie was very really fun", 3)
    finally:
        engine.stop()


# --- backpressure, liveness ---------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after_and_recovers(bank):
    engine = Engine(bank, max_batch=1, window_ms=0, max_queue=2).start()
    gate = Gate(engine)
    try:
        with TestClient(create_app(engine)) as client:
            results = []

            def post():
                results.append(client.post("/v1/completions", json={"model": "alpha", "prompt": "the movie",
                                                                     "max_tokens": 2, "temperature": 0}))

            threads = [threading.Thread(target=post) for _ in range(3)]
            threads[0].start()
            assert gate.entered.wait(30)  # the first is in the worker, held
            for t in threads[1:]:
                t.start()
            deadline = time.time() + 30
            while engine.queue_depth() < 2 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.saturated
            r = client.post("/v1/completions", json={"model": "beta", "prompt": "a film", "max_tokens": 2})
            err = error_of(r, 503)
            assert err["code"] == "server_overloaded" and int(r.headers["retry-after"]) >= 1
            assert client.get("/health").status_code == 503
            gate.open.set()
            for t in threads:
                t.join(60)
            assert [x.status_code for x in results] == [200, 200, 200]
            assert client.get("/health").status_code == 200
            assert engine.metrics.snapshot()["rejected"] == 1
    finally:
        gate.open.set()
        engine.stop()


def test_the_worker_survives_errors_and_health_reports_a_dead_worker(bank, monkeypatch):
    engine = Engine(bank, max_batch=4, window_ms=0).start()
    try:
        with TestClient(create_app(engine)) as client:
            real = Decoding.advance  # a decode step runs outside any batch's guard: the worker's own handler
            calls = {"n": 0}

            def broken(self, joining=None):
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("boom")
                return real(self, joining)

            monkeypatch.setattr(Decoding, "advance", broken)
            err = error_of(client.post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": 3}),
                           500)
            assert "boom" in err["message"]
            ok = client.post("/v1/completions", json={"model": "alpha", "prompt": "the", "max_tokens": 3,
                                                       "temperature": 0})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            assert engine.metrics.snapshot()["worker_errors"] == 1
            # an emit that raises (the client's event loop is gone) is dropped; the worker goes on
            job = engine.generation_job("beta", "a film", max_tokens=2, temperature=0)
            job.emit = lambda kind, value: (_ for _ in ()).throw(RuntimeError("event loop is closed"))
            engine.submit(job)
            assert client.post("/v1/completions", json={"model": "beta", "prompt": "a", "max_tokens": 2}).status_code == 200
            assert client.get("/health").json()["worker_alive"] is True
            engine.stop()
            health = client.get("/health")
            assert health.status_code == 503 and "not running" in health.json()["reason"]
            err = error_of(client.post("/v1/completions", json={"model": "alpha", "prompt": "the"}), 503)
            assert "not running" in err["message"]
    finally:
        engine.stop()


def test_stop_fails_waiting_requests_and_drains_running_ones(bank):
    engine = Engine(bank, max_batch=1, window_ms=0).start()
    gate = Gate(engine)
    got = {}

    def emit_for(i):
        return lambda kind, value: got.setdefault(i, (kind, value)) if kind in ("done", "error") else None

    jobs = [engine.generation_job("alpha", "the movie", max_tokens=2, temperature=0, emit=emit_for(i))
            for i in range(3)]
    for job in jobs:
        engine.submit(job)
    assert gate.entered.wait(30)
    stopper = threading.Thread(target=engine.stop, kwargs={"drain_s": 0})
    stopper.start()
    time.sleep(0.2)
    gate.open.set()
    stopper.join(60)
    assert not engine.alive
    assert got[1][0] == got[2][0] == "error" and "shutting down" in got[1][1]
    assert got[0][0] in ("done", "error")  # the held one: finished or failed, never left unanswered
    with pytest.raises(sp.SoftPromptError):
        engine.submit(engine.generation_job("alpha", "the", max_tokens=1))


def test_a_request_past_its_timeout_gets_504_and_leaves_the_queue(bank):
    engine = Engine(bank, max_batch=1, window_ms=0).start()
    gate = Gate(engine)
    try:
        with TestClient(create_app(engine, request_timeout=0.5)) as client:
            first = threading.Thread(target=client.post, args=("/v1/completions",),
                                     kwargs={"json": {"model": "alpha", "prompt": "the", "max_tokens": 2}})
            first.start()
            assert gate.entered.wait(30)
            err = error_of(client.post("/v1/completions", json={"model": "beta", "prompt": "a", "max_tokens": 2}),
                           504)
            assert err["code"] == "timeout"
            gate.open.set()
            first.join(30)
            deadline = time.time() + 10
            while engine.metrics.snapshot()["cancelled"] < 2 and time.time() < deadline:
                time.sleep(0.02)
            assert engine.metrics.snapshot()["cancelled"] == 2  # both timed out: the held row left, the other never ran
    finally:
        gate.open.set()
        engine.stop()


def test_oversized_bodies_are_refused_before_they_are_read(bank):
    engine = Engine(bank).start()
    try:
        with TestClient(create_app(engine, max_body_bytes=1000)) as client:
            big = {"model": "alpha", "prompt": "the " * 400}
            assert error_of(client.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

            def chunks():  # no Content-Length: a chunked body
                yield b'{"model": "alpha", "prompt": "'
                for _ in range(100):
                    yield b"the " * 10
                yield b'"}'

            r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert error_of(r, 413)["code"] == "request_too_large"
            small = client.post("/v1/completions", content=iter([b'{"model": "alpha", "prompt": "the", ',
                                                                 b'"max_tokens": 2}']),
                                headers={"content-type": "application/json"})
            assert small.status_code == 200, small.text
    finally:
        engine.stop()


# --- text, bank ---------------------------------------------------------------------------------------------


def test_incremental_detokenisation_equals_decoding_the_whole_row():
    """A byte-level BPE (as SmolLM2, GPT-2) over text with multi-byte characters: after every token, the row's text
    is the whole decode (minus an unfinished character at the end); the final text equals it exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["naïve café crème brûlée — 日本語のテキスト 🙂 emoji 🚀 and plain words " * 3,
              "Über straße façade Ελληνικά русский текст ✓ ✗ → ←"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        ids = torch.randint(0, tok.vocab_size, (40,), generator=gen).tolist() if trial % 2 else \
            tok(corpus[trial % 2][trial:trial + 60])["input_ids"]
        row = Row(Sampling(max_new_tokens=100))
        for n, t in enumerate(ids, 1):
            row.add_token(t, tok)
            whole = tok.decode(ids[:n], skip_special_tokens=True)
            assert whole.startswith(row.text), (trial, n)
            if not whole.endswith("\ufffd"):
                assert row.text == whole, (trial, n)
        row.finish_reason = "length"
        row.settle(tok)
        assert row.text == tok.decode(ids, skip_special_tokens=True)


def test_stop_strings_are_found_across_token_boundaries():
    tok = make_backbone("llama").tokenizer
    row = Row(Sampling(max_new_tokens=50, stop=("capital of",)))
    for t in tok("what is the capital of france")["input_ids"]:
        row.add_token(t, tok)
        if row.done:
            break
    assert row.finish_reason == "stop" and row.text == "what is the "


def test_the_bank_is_safe_to_read_while_it_changes(bank, tmp_path):
    bb = bank.backbone
    src = tmp_path / "extra.safetensors"
    sp.save_prompt(src, sp.PromptTuning.create(bb, num_virtual_tokens=2, seed=4), bb)
    stop, errors = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                for name in bank.names():
                    try:
                        bank.get(name)
                    except sp.SoftPromptError:
                        pass  # removed meanwhile: a clean 404
            except Exception as e:  # a half-changed table would show here
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(200):
        bank.add(f"extra{i % 5}", src, replace=True)
        if i % 3 == 0:
            bank.remove(f"extra{i % 5}")
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors


@contextlib.contextmanager
def served(tmp_path, *args: str):
    """`softprompt serve` on a tiny model in its own process; yields (process, base URL) once /health answers."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    bb = make_backbone("llama")
    bb.model.save_pretrained(tmp_path / "model")
    bb.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts").mkdir()
    sp.save_prompt(tmp_path / "prompts" / "alpha.safetensors", sp.PromptTuning.create(bb, num_virtual_tokens=3), bb)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(tmp_path / "model"),
                             "--prompts", str(tmp_path / "prompts"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError(proc.stderr.read() if proc.poll() is not None else "server did not start")
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_lets_the_running_request_finish_and_exits_0(tmp_path):
    """`softprompt serve` in its own process: SIGTERM mid-stream; the stream still ends with [DONE], new
    connections are refused, and the process exits 0."""
    import json
    import signal

    import httpx

    with served(tmp_path, "--drain-s", "20") as (proc, base):
        req = {"model": "alpha", "prompt": "the movie", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
               "stream": True}
        pieces, signalled = [], False
        with httpx.stream("POST", base + "/v1/completions", json=req, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not signalled:
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
                pieces.append(line)
        assert pieces[-2:] == ["data: [DONE]", ""] or pieces[-1] == "data: [DONE]", pieces[-3:]
        chunks = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0


def test_slow_loris_clients_hold_connections_not_the_worker(tmp_path):
    """80 clients that never finish their request (40 stop inside the headers, 40 send a few bytes of a 5,000-byte
    body): the server still answers a normal request and /health; the slow bodies get 408 after --body-timeout."""
    import socket

    import httpx

    with served(tmp_path, "--body-timeout", "2") as (proc, base):
        port = int(base.rsplit(":", 1)[1])
        slow_headers, slow_bodies = [], []
        for i in range(80):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i % 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
                slow_headers.append(s)
            else:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 5000\r\n\r\n{\"model\": ")
                slow_bodies.append(s)
        try:
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": "alpha", "prompt": "the movie", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert httpx.get(base + "/health", timeout=10).status_code == 200
            answer = b""  # the status line and headers may come in one segment and the body in another
            while b"request_timeout" not in answer:
                chunk = slow_bodies[0].recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert answer.decode().startswith("HTTP/1.1 408") and b"request_timeout" in answer, answer
        finally:
            for s in slow_headers + slow_bodies:
                s.close()
        assert proc.poll() is None


@pytest.mark.parametrize("products", ["default", "packed"])
def test_warm_up_makes_every_weight_copy_the_decode_steps_use_before_the_first_request(bank, products):
    """`softprompt serve` warms its engine before taking requests: a generation at each row count whose decode steps
    have weights of their own (packed per row bucket), so that no weight copy is made in the middle of the load (the
    server's memory after start is what it holds under load): after the warm-up, generations at other row counts,
    and new rows joining a running batch, make none. With the default products (oneDNN's with AVX-512, weight-first
    without) and with packed decode steps; either way the engine is left idle."""
    engine = Engine(bank, max_batch=16)
    bb = engine.backbone
    config = FastPathConfig(transposed_products=False, dnnl_decode=False) if products == "packed" else None
    rt = sp.runtime(bb)
    if config is not None:
        rt.configure(config)
    try:
        fp = rt.fastpath
        fp.packed.clear()
        engine.warm_up()
        assert not engine.busy()
        made = set(fp.packed.store)
        if products == "packed":
            assert {b for (_, b) in made if b != "dnnl"} == {8, 16}
        for rows in (3, 5, 11, 16):
            generate(bb, None, ["more words here"] * rows, max_new_tokens=3)
        ids, mask = left_pad([bb.tokenizer("a new row")["input_ids"]] * 3, bb.pad_token_id, bb.device)
        with torch.inference_mode():  # rows joining a running batch: their prefill rides in its step
            running = Decoding(bb, [None] * 3, ids, mask, [Row(Sampling(max_new_tokens=4)) for _ in range(3)])
            running.pick()
            running.advance(Decoding(bb, [None] * 3, ids, mask, [Row(Sampling(max_new_tokens=4)) for _ in range(3)],
                                     prefill=False))
        assert set(fp.packed.store) == made
    finally:
        rt.configure(FastPathConfig())
