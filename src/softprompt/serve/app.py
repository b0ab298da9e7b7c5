"""The OpenAI-compatible HTTP API: `model` names a task (a prompt file in the bank), or the backbone itself.

    GET  /v1/models             the tasks (and the bare backbone)
    POST /v1/completions        text completion, streaming with server-sent events
    POST /v1/chat/completions   chat completion (the backbone's chat template), streaming
    POST /v1/classify           a classification task's label and per-label scores
    GET  /health, /metrics      liveness; Prometheus metrics (?format=json for JSON)
    POST /admin/reload          rescan the prompt folder (new, changed and deleted files)
    DELETE /admin/tasks/{name}  remove a task

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with 400 (bad request), 401 (API
key), 404 (unknown task), 413 (body too large), 503 with Retry-After (queue full, or shutting down: OpenAI's clients
retry), 504 (no answer within the request timeout) or 500; the server keeps serving after any of them. Requests are
tokenised off the event loop; a client that goes away (streaming or not) frees its row.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SoftPromptError
from ..runtime import runtime
from .bank import UnknownTask
from .engine import Engine
from .jobs import Frontend, Job, Overloaded, RequestError, Result

# --- request schemas ----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, penalties at 0)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | dict[str, str] | list[str | dict[str, str]]


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: dict[str, str] | list[dict[str, str]]  # {"image": base64 or a data: URL}
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # the lowest score of an object kept


def _body(schema: type[BaseModel]) -> dict:
    """The OpenAPI request body of an endpoint that reads its body itself (JSON, or a multipart upload)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


# --- errors -----------------------------------------------------------------------------------------------


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def _check_supported(req: _Request) -> None:
    if req.n != 1:
        raise RequestError("only n=1 is supported; send the request again for more choices", param="n")
    if req.logprobs not in (None, False, 0):
        raise RequestError("logprobs are not supported", param="logprobs")
    if req.presence_penalty or req.frequency_penalty:
        raise RequestError("presence/frequency penalties are not supported; leave them at 0",
                           param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if isinstance(req, CompletionRequest):
        if req.echo or (req.best_of or 1) != 1 or req.suffix:
            raise RequestError("echo, best_of and suffix are not supported", param="echo")


def _message_text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError("only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# --- the app ----------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app sees it (by its Content-Length, or
    while a chunked body is read), so an oversized upload never fills memory; a body that has not fully arrived
    `timeout` seconds after its headers gets 408 (a slow client holds its connection, never the worker)."""

    def __init__(self, app, limit: int, timeout: float = 30.0):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            return await self._refuse(scope, receive, send)
        chunks, total = [], 0
        deadline = time.monotonic() + self.timeout
        while True:  # read the body here, at most `limit` bytes within `timeout`, then hand it on
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                response = error(408, f"the request body did not arrive within {self.timeout:g} s; send it "
                                 "at once", code="request_timeout")
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error(413, f"request body over the server's limit of {self.limit} bytes; send less per request",
                         code="request_too_large")
        await response(scope, receive, send)


def create_app(engine: Frontend, api_key: str | None = None, prompts_dir: str | None = None, *,
               request_timeout: float = 600.0, max_body_bytes: int = 16 * 2**20,
               body_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app around a running engine. `api_key`: when set, /v1 and /admin need `Authorization:
    Bearer <key>`. `request_timeout`: seconds a request may wait for its answer (504 after, its row freed).
    `max_body_bytes`: larger bodies are refused (413) before they are read; `body_timeout`: seconds a body may take
    to arrive (408 after). The app never stops the engine: its
    owner does (`softprompt serve` after uvicorn's graceful shutdown)."""
    app = FastAPI(title="softprompt", version="0.1.0",
                  description="Many prompt-tuned tasks on one frozen backbone; `model` names a task.")
    app.state.engine = engine

    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout=body_timeout)

    async def prepare(fn, *args, **kwargs):
        """Build jobs (tokenising, chat templates, image decoding) on the engine's preparation thread."""
        return await asyncio.get_running_loop().run_in_executor(engine.prep, lambda: fn(*args, **kwargs))

    async def answers(jobs: list[Job], events: asyncio.Queue, request: Request | None):
        """(index, kind, value) events of the jobs until each is answered; a client that went away, or the request
        timeout, cancels them (their rows leave the batch)."""
        deadline = time.monotonic() + request_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            try:
                yield await asyncio.wait_for(events.get(), timeout=min(left, 1.0))
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    for job in jobs:
                        job.cancel()
                    return

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
            raise StarletteHTTPException(401, "invalid or missing API key; send 'Authorization: Bearer <key>'")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('msg', '')}", code="invalid_json")
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        return error(400, f"invalid request: {'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}",
                     param=".".join(loc) or None, code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(UnknownTask)
    async def _unknown(request: Request, exc: UnknownTask) -> JSONResponse:
        return error(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return error(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        response = error(503, str(exc), type_="server_error", code="server_overloaded")
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response

    @app.exception_handler(SoftPromptError)
    async def _soft(request: Request, exc: SoftPromptError) -> JSONResponse:
        return error(400, str(exc))

    @app.get("/health")
    async def health():
        """200 when the worker runs and the queue has room; 503 (not ready) otherwise, with the reason."""
        body = {"status": "ok", "model": engine.model_name, "tasks": len(engine.bank),
                "queue_depth": engine.queue_depth(), "worker_alive": engine.alive}
        if not engine.alive:
            return JSONResponse(body | {"status": "unavailable", "reason": "the serving worker is not running"}, 503)
        if engine.saturated:
            return JSONResponse(body | {"status": "unavailable", "reason": "the request queue is full"}, 503,
                                headers={"Retry-After": "1"})
        return body

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        snap = engine.metrics.snapshot()
        bb = engine.backbone
        cache = runtime(bb).cache
        snap |= {"prompt_kv_hits": cache.hits, "prompt_kv_misses": cache.misses,
                 "queue_depth": engine.queue_depth(), "tasks": len(engine.bank)}
        if format == "json":
            return snap
        lines = []
        for kind, n in sorted(snap.pop("requests").items()):
            lines.append(f'softprompt_requests_total{{kind="{kind}"}} {n}')
        for key, value in snap.items():
            name = key.replace("_s", "_seconds") if key.endswith("_s") else key
            lines.append(f"softprompt_{name} {value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        created = int(time.time())
        data = [{"id": engine.model_name, "object": "model", "created": created, "owned_by": "softprompt",
                 "softprompt": {"kind": "backbone"}}]
        for name in engine.bank.names():
            try:
                entry = engine.bank.get(name)
            except UnknownTask:  # removed meanwhile
                continue
            task = entry.task or {}
            labels = list(task.get("verbalizer") or {}) or list(task.get("labels") or []) or None  # text / images
            kind = "detection" if task.get("modality") == "detection" else \
                "classification" if labels else "generation"
            data.append({"id": name, "object": "model", "created": created, "owned_by": "softprompt",
                         "parent": engine.model_name, "softprompt": {
                             "kind": kind, "modality": task.get("modality", "text"), "labels": labels,
                             "method": entry.metadata.get("method", "prompt_tuning"),
                             "prompt_kind": entry.prompt.kind,
                             "num_virtual_tokens": entry.num_virtual_tokens,
                             **({"ensemble": {"members": len(entry.members), "combine": entry.combine}}
                                if entry.members else {})}})
        return {"object": "list", "data": data}

    def listen(jobs: list[Job]) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.emit = lambda kind, value, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))
        return events

    def timed_out() -> JSONResponse:
        return error(504, f"no answer within the server's request timeout of {request_timeout:g} s; retry with less "
                     "work (fewer max_tokens)", type_="server_error", code="timeout")

    async def collect(jobs: list[Job], events: asyncio.Queue, request: Request) -> dict[int, Result] | JSONResponse:
        """Every job's result (index -> Result), or the error response: a failed job (500), the client gone (499),
        the request timeout (504). Unfinished jobs are cancelled either way."""
        results: dict[int, Result] = {}
        try:
            async for i, kind, value in answers(jobs, events, request):
                if kind == "error":
                    return error(500, value, type_="server_error")
                if kind == "done":
                    results[i] = value
                    if len(results) == len(jobs):
                        return results
            return error(499, "the client closed the request", type_="server_error", code="cancelled")
        except TimeoutError:
            return timed_out()
        finally:
            for job in jobs:
                job.cancel()

    async def run(jobs: list[Job], chat: bool, req: _Request, request: Request):
        """Submit the (validated) jobs and answer: JSON when done, or server-sent events as tokens come."""
        events = listen(jobs)
        engine.submit_all(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(results: dict[int, Result]) -> dict:
            p = sum(r.prompt_tokens for r in results.values())
            c = sum(len(r.tokens) for r in results.values())
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req.stream:
            results = await collect(jobs, events, request)
            if isinstance(results, JSONResponse):
                return results
            choices = []
            for i in range(len(jobs)):
                r = results[i]
                choice = {"index": i, "finish_reason": r.finish_reason, "logprobs": None}
                choice |= {"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text}
                choices.append(choice)
            return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices,
                    "usage": usage(results)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text is not None else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": req.model,
                    "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def stream():
            results: dict[int, Result] = {}
            try:
                if chat:
                    for i in range(len(jobs)):
                        yield chunk(i, None, None, first=True)
                async for i, kind, value in answers(jobs, events, None):  # a gone client: the stream ends
                    if kind == "delta":
                        yield chunk(i, value, None)
                    elif kind == "done":
                        results[i] = value
                        yield chunk(i, None, value.finish_reason)
                    else:
                        err = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    if len(results) == len(jobs):
                        break
                if include_usage:
                    body = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                            "model": req.model, "choices": [], "usage": usage(results)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            except TimeoutError:
                err = {"error": {"message": f"no answer within the server's request timeout of {request_timeout:g} s",
                                 "type": "server_error", "param": None, "code": "timeout"}}
                yield f"data: {json.dumps(err)}\n\n"
            finally:  # the client went away (or we are done): unfinished rows leave their batch
                for job in jobs:
                    job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def sampling_args(req: _Request, max_tokens: int | None) -> dict:
        return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                "stop": req.stop, "ignore_eos": req.ignore_eos}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        _check_supported(req)
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            items = [p]
        elif isinstance(p, list) and p:
            items = list(p)
        else:
            raise RequestError("prompt is empty; send some text", param="prompt")
        if len(items) > engine.max_batch:
            raise RequestError(f"at most {engine.max_batch} prompts per request", param="prompt")
        args = sampling_args(req, req.max_tokens)
        jobs = await prepare(lambda: [engine.generation_job(req.model, item, **args) for item in items])
        return await run(jobs, False, req, request)  # every prompt validated before any is queued

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatRequest, request: Request):
        _check_supported(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
                    for m in req.messages]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = await prepare(engine.generation_job, req.model, messages=messages,
                            default_max_tokens=engine.chat_max_tokens, **sampling_args(req, max_tokens))
        return await run([job], True, req, request)

    async def read_items(request: Request, schema: type[BaseModel]) -> tuple[BaseModel, list]:
        """A JSON body of `schema`, or a multipart upload (a `model` field, one or more `image` files, the other
        fields of the schema as form fields): the request and its input items."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            files = form.getlist("image")
            if not isinstance(form.get("model"), str) or not files:
                raise RequestError("a multipart request needs a 'model' field and at least one 'image' file",
                                   param="image")
            fields = {k: v for k, v in form.items() if k not in ("model", "image") and isinstance(v, str)}
            try:
                req = schema.model_validate({**fields, "model": form["model"],
                                             "input": [{"image": "upload"} for _ in files]})
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            items = [{"image": await f.read() if hasattr(f, "read") else str(f).encode()} for f in files]
        else:
            try:  # the same answers as a JSON body FastAPI validates itself
                req = schema.model_validate(json.loads(await request.body()))
            except ValidationError as e:
                raise RequestValidationError(e.errors()) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:  # not JSON, or not text at all
                raise RequestValidationError([{"type": "json_invalid", "msg": str(e), "loc": ("body",)}]) from None
            items = req.input if isinstance(req.input, list) else [req.input]
        if not items:
            raise RequestError("input is empty; send some text or an image", param="input")
        if len(items) > engine.max_batch:
            raise RequestError(f"at most {engine.max_batch} inputs per request", param="input")
        return req, items

    async def answer_all(jobs: list[Job], request: Request) -> dict[int, Result] | JSONResponse:
        events = listen(jobs)
        engine.submit_all(jobs)
        return await collect(jobs, events, request)

    @app.post("/v1/classify", dependencies=[Depends(authorize)], openapi_extra=_body(ClassifyRequest))
    async def classify(request: Request):
        """JSON {"model", "input"} (text, fields, or {"image": base64}); or a multipart upload: a `model` field
        and one or more `image` files."""
        req, items = await read_items(request, ClassifyRequest)
        jobs = await prepare(lambda: [engine.classify_job(req.model, item) for item in items])
        results = await answer_all(jobs, request)
        if isinstance(results, JSONResponse):
            return results
        data = [{"index": i, "label": results[i].label, "scores": results[i].scores} for i in range(len(jobs))]
        return {"object": "list", "model": req.model, "data": data,
                "usage": {"prompt_tokens": sum(r.prompt_tokens for r in results.values())}}

    @app.post("/v1/detect", dependencies=[Depends(authorize)], openapi_extra=_body(DetectRequest))
    async def detect(request: Request):
        """Objects in images for a detection task: JSON {"model", "input": {"image": base64}, "threshold"} (a list
        of inputs too), or a multipart upload (`model`, optional `threshold`, `image` files). Each image's objects:
        label, score, box [x0, y0, x1, y1] in the image's pixels, best first."""
        req, items = await read_items(request, DetectRequest)
        jobs = await prepare(lambda: [engine.detect_job(req.model, item, req.threshold) for item in items])
        results = await answer_all(jobs, request)
        if isinstance(results, JSONResponse):
            return results
        return {"object": "list", "model": req.model,
                "data": [{"index": i, "objects": results[i].objects} for i in range(len(jobs))]}

    @app.post("/admin/reload", dependencies=[Depends(authorize)])
    async def reload() -> dict:
        folder = prompts_dir or engine.bank.folder
        if folder is None:
            raise RequestError("the server was started without a prompt folder (--prompts)")
        return await asyncio.to_thread(engine.bank.sync_folder, folder)

    @app.delete("/admin/tasks/{name}", dependencies=[Depends(authorize)])
    async def remove(name: str) -> dict:
        engine.bank.remove(name)
        return {"removed": name}

    return app


def build_server(model: str, prompts: str | None = None, *, dtype: str | None = None, device: str | None = None,
                 max_batch: int = 32, window_ms: float = 5.0, reuse_prompt_cache: bool = True,
                 engine: str = "builtin", vllm_python: str | None = None, vllm_url: str | None = None,
                 vllm_args: tuple[str, ...] = (), **engine_args: Any) -> Frontend:
    """Load the backbone and the prompt folder; an engine ready to start (refused files in engine.bank.refused).
    engine="vllm": a vLLM server runs the model, at `vllm_url`, or started from `vllm_python` on the backbone's
    folder when `start()` is called."""
    from ..backbones import load_backbone
    from .bank import PromptBank

    if engine not in ("builtin", "vllm"):
        raise SoftPromptError(f"unknown engine {engine!r}; use builtin or vllm")
    bb = load_backbone(model, dtype=dtype, device=device)
    if bb.kind not in ("causal_lm", "seq2seq", "encoder", "vit", "image", "clip", "detector"):
        raise SoftPromptError(f"serving needs a language model, a text encoder or an image model; {model!r} is a "
                              f"{bb.kind}")
    if engine == "vllm" and bb.kind != "causal_lm":
        raise SoftPromptError(f"--engine vllm serves causal LMs; {model!r} is a {bb.kind} model: use the built-in engine")
    bank = PromptBank(bb, prompts)
    if engine == "builtin":
        return Engine(bank, max_batch=max_batch, window_ms=window_ms, reuse_prompt_cache=reuse_prompt_cache,
                      **engine_args)
    from .vllm import VLLMEngine, VLLMServer, default_vllm_python, vllm_model_source

    server = None
    if vllm_url is None:
        python = vllm_python or default_vllm_python()
        if python is None:
            raise SoftPromptError("--engine vllm needs a vLLM server: --vllm-url URL of a running one, or "
                                  "--vllm-python PATH of a Python with vLLM installed (or SOFTPROMPT_VLLM_PYTHON)")
        server = VLLMServer(python, vllm_model_source(bb), bb.name, dtype=str(bb.dtype).removeprefix("torch."),
                            args=tuple(vllm_args))
        vllm_url = server.url
    allowed = {"max_queue", "max_tokens_limit", "chat_max_tokens"}
    return VLLMEngine(bank, vllm_url, server=server, max_batch=max_batch,
                      **{k: v for k, v in engine_args.items() if k in allowed})


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SoftPromptError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
