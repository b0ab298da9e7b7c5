"""The serving engine: requests for many tasks, batched together on one backbone by one worker thread.

Requests (generation or classification, any task) wait in one bounded queue. The worker runs continuous
batching: at every decode step it takes in waiting requests while the step's token budget allows (a new
generation's prefill tokens plus one token per running row), scores the classification requests at once (they never
wait for generations), prefills the new generations as their own forward and merges them into the running
batch, then runs one decode step for every running row, each attending to its own task's cached prompt
key/values. Finished rows leave at once. ``continuous=False`` keeps the earlier policy (a batch runs until its last
row finishes; requests that arrive meanwhile form the next batch), for comparison.

Results go back through each request's ``emit`` callback, called from the worker thread: ``("delta", text)``
while streaming, then ``("done", Result)``, or ``("error", message)``. A full queue refuses new requests with
`Overloaded` (HTTP 503 with Retry-After); an exception in the worker fails the requests it was running and the
worker goes on; `stop()` fails whatever is still waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SoftPromptError
from ..generation import Decoding, Row, Sampling
from ..model import MixedPromptedModel
from ..tasks.encode import TaskEncoder, left_pad
from ..tasks.spec import load_task
from .bank import PromptBank, TaskEntry
from .score import score_mixed

log = logging.getLogger("softprompt.serve")


class Overloaded(SoftPromptError):
    """The queue is full, or the engine is stopping (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(SoftPromptError):
    """A request the server refuses (HTTP 400), with the OpenAI error `param` and `code` when there is one."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    label: str | None = None
    scores: dict[str, float] | None = None  # classification: label -> log-likelihood of its words


@dataclass
class Job:
    kind: str  # "generate" | "classify"
    task: str  # the task name, or the backbone's name for the bare model
    entry: TaskEntry | None  # None: the bare backbone, no prompt
    ids: list[int]
    emit: Callable[[str, Any], None]
    sampling: Sampling | None = None
    encoder: TaskEncoder | None = None
    pixels: torch.Tensor | None = None  # an image task's request: (1, C, S, S) normalised
    row: Row | None = None
    sent: int = 0  # characters of text already streamed
    created: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    answered: bool = False  # "done" or "error" was emitted: nothing more is sent

    @property
    def prompt(self) -> torch.Tensor | None:
        return None if self.entry is None else self.entry.prompt

    @property
    def cost(self) -> int:
        """Tokens this request adds to a step's budget when it is prefilled (its input and virtual tokens)."""
        if self.pixels is not None:
            return 1
        return len(self.ids) + (0 if self.entry is None else self.entry.num_virtual_tokens)

    @property
    def queued_tokens(self) -> int:
        """What it holds of the queue's token budget: its input and every token it may generate."""
        return self.cost + (self.sampling.max_new_tokens if self.sampling is not None else 0)

    def cancel(self) -> None:
        """The client went away: a waiting request is dropped, a running row leaves its batch at the next step."""
        self.cancelled = True
        if self.row is not None:
            self.row.cancelled = True

    def send(self, kind: str, value: Any) -> None:
        """Emit an event; the request is answered once ("done" or "error"). An emit that fails (the client's event
        loop closed) is logged and dropped: it must not take the worker down."""
        if self.answered:
            return
        if kind in ("done", "error"):
            self.answered = True
        try:
            self.emit(kind, value)
        except Exception:
            log.warning("could not deliver a %s event for task %r (the client went away?)", kind, self.task,
                        exc_info=True)


class Metrics:
    """Counters and recent latencies; `snapshot()` for /metrics."""

    def __init__(self, keep: int = 2000):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors = 0
        self.cancelled = 0
        self.rejected = 0  # refused with 503: the queue was full
        self.worker_errors = 0  # exceptions in the worker outside a batch's forward
        self.batches = 0
        self.batch_rows = 0
        self.max_batch_rows = 0
        self.generated_tokens = 0
        self.latency: deque[float] = deque(maxlen=keep)
        self.ttft: deque[float] = deque(maxlen=keep)

    def count(self, kind: str) -> None:
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def batch(self, rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows += rows
            self.max_batch_rows = max(self.max_batch_rows, rows)

    def finished(self, job: Job, tokens: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.generated_tokens += tokens
            self.latency.append(now - job.created)
            if job.first_token is not None:
                self.ttft.append(job.first_token - job.created)

    @staticmethod
    def _quantile(xs: list[float], q: float) -> float:
        if not xs:
            return 0.0
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def snapshot(self) -> dict:
        with self.lock:
            lat, ttft = list(self.latency), list(self.ttft)
            return {
                "requests": dict(self.requests), "errors": self.errors, "cancelled": self.cancelled,
                "rejected": self.rejected, "worker_errors": self.worker_errors,
                "batches": self.batches,
                "mean_batch_rows": self.batch_rows / self.batches if self.batches else 0.0,
                "max_batch_rows": self.max_batch_rows, "generated_tokens": self.generated_tokens,
                "latency_p50_s": self._quantile(lat, 0.5), "latency_p99_s": self._quantile(lat, 0.99),
                "ttft_p50_s": self._quantile(ttft, 0.5), "ttft_p99_s": self._quantile(ttft, 0.99),
            }


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of a streamed text to hold back: an unfinished multi-byte character, or the
    start of a stop string (sent only once it is clear the stop string does not follow)."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


class Engine:
    """One worker thread running requests on the bank's backbone, continuously batched.

    max_batch: most rows decoding at once. step_tokens: a step's token budget (new prefill tokens + running rows);
    a request whose prefill alone exceeds it still runs, by itself. Default: 512 on a CPU, where a 2,048-token
    prefill stalls the running rows for seconds (benchmarks/serving.py could not separate the two on 2 cores:
    their requests/s differ less than runs of one cell do), 2,048 on an accelerator. max_queue / max_queued_tokens: most requests,
    and most tokens (inputs + max_tokens), waiting; past either, `submit` raises `Overloaded`.
    """

    def __init__(self, bank: PromptBank, max_batch: int = 32, window_ms: float = 5.0,
                 reuse_prompt_cache: bool = True, mix_tasks: bool = True, max_tokens_limit: int = 2048,
                 chat_max_tokens: int = 512, continuous: bool = True, step_tokens: int | None = None,
                 max_queue: int = 256, max_queued_tokens: int = 1_000_000):
        if step_tokens is None:
            step_tokens = 512 if bank.backbone.device.type == "cpu" else 2048
        for name, value in (("max_batch", max_batch), ("step_tokens", step_tokens), ("max_queue", max_queue),
                            ("max_queued_tokens", max_queued_tokens)):
            if value < 1:
                raise SoftPromptError(f"{name} must be at least 1 (got {value})")
        self.bank, self.backbone = bank, bank.backbone
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.reuse_prompt_cache = reuse_prompt_cache
        self.mix_tasks = mix_tasks  # False: a batch holds one task's requests (the per-adapter baseline)
        self.max_tokens_limit = max_tokens_limit
        self.chat_max_tokens = chat_max_tokens  # chat requests without max_tokens: at most this many (and what fits)
        self.continuous, self.step_tokens = continuous, step_tokens
        self.max_queue, self.max_queued_tokens = max_queue, max_queued_tokens
        self.metrics = Metrics()
        self._waiting: deque[Job] = deque()
        self._queued_tokens = 0
        self._cv = threading.Condition()
        self._encoders: dict[tuple[str, str], TaskEncoder] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self._rows: list[Job] = []  # a job per row of the batch being decoded (finished ones until compacted)
        self._decoding: Decoding | None = None
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="softprompt-prep")  # tokenising, off the event loop

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping, self._accepting = False, True
            self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop taking requests; wait up to `drain_s` for the waiting and running ones to finish, then fail what is
        left ("the server is shutting down") and end the worker."""
        self._accepting = False
        if self._thread is None:
            return
        deadline = time.perf_counter() + drain_s
        while self.busy() and time.perf_counter() < deadline:
            time.sleep(0.02)
        with self._cv:
            self._stopping = True
            left = list(self._waiting)
            self._waiting.clear()
            self._queued_tokens = 0
            self._cv.notify_all()
        for job in left:
            job.send("error", "the server is shutting down; send the request again later")
        self._thread.join(timeout=60)
        for job in self._rows:  # rows a stopped decode left unanswered
            job.send("error", "the server is shutting down; send the request again later")
        self._rows, self._decoding, self._thread = [], None, None

    @property
    def alive(self) -> bool:
        """The worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def saturated(self) -> bool:
        return len(self._waiting) >= self.max_queue or self._queued_tokens >= self.max_queued_tokens

    def busy(self) -> bool:
        return bool(self._waiting) or bool(self._rows)

    @property
    def model_name(self) -> str:
        return self.backbone.name

    def queue_depth(self) -> int:
        return len(self._waiting)

    # --- building requests ----------------------------------------------------------------------------
    def resolve(self, model: str) -> TaskEntry | None:
        """A task by name (the bare backbone by its own name)."""
        if model == self.model_name:
            return None
        return self.bank.get(model)

    def generation_job(self, model: str, text: str | list[int] | None = None, *, messages: list[dict] | None = None,
                       max_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                       seed: int | None = None, stop: str | list[str] | None = None, ignore_eos: bool = False,
                       emit: Callable[[str, Any], None] = lambda kind, value: None,
                       default_max_tokens: int = 16) -> Job:
        entry = self.resolve(model)
        if self.backbone.kind != "causal_lm":
            raise RequestError(f"model {self.model_name!r} is an image model: it classifies (POST /v1/classify), it "
                               "does not generate text", param="model")
        tok = self.backbone.tokenizer
        if messages is not None:
            if not messages:
                raise RequestError("messages is empty; send at least one message", param="messages")
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"model {self.model_name!r} has no chat template; use /v1/completions",
                                   param="messages")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        elif isinstance(text, str):
            if not text.strip():
                raise RequestError("prompt is empty; send some text", param="prompt")
            ids = tok(text)["input_ids"]
        else:
            ids = list(text or [])
            if any(not isinstance(t, int) or not 0 <= t < self.backbone.config.vocab_size for t in ids):
                raise RequestError("prompt token ids must be integers in the vocabulary", param="prompt")
        if not ids:
            raise RequestError("prompt is empty; send some text", param="prompt")
        P = 0 if entry is None else entry.num_virtual_tokens
        limit = self.backbone.max_positions or 10**9
        room = limit - P - len(ids)
        if room < 1:
            raise RequestError(f"prompt of {len(ids)} tokens + {P} virtual tokens of task {model!r} leaves no room "
                               f"in the model's {limit} positions; shorten the prompt",
                               param="messages" if messages is not None else "prompt",
                               code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        if max_tokens < 1 or max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens must be between 1 and {self.max_tokens_limit} (got {max_tokens})",
                               param="max_tokens")
        if max_tokens > room:
            raise RequestError(f"prompt of {len(ids)} tokens + {P} virtual tokens + max_tokens {max_tokens} exceeds "
                               f"the model's {limit} positions; at most {room} new tokens fit",
                               param="max_tokens", code="context_length_exceeded")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4:
            raise RequestError("at most 4 stop sequences", param="stop")
        try:
            sampling = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stops, ignore_eos=ignore_eos)
        except SoftPromptError as e:
            raise RequestError(str(e)) from None
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.backbone.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return Job("generate", model, entry, ids, emit, sampling=sampling, row=Row(sampling, generator))

    def encoder(self, model: str, entry: TaskEntry) -> TaskEncoder:
        key = (model, entry.digest)
        enc = self._encoders.get(key)
        if enc is None:
            spec = entry.task
            bb = self.backbone
            if spec and spec.get("modality") == "image":
                from ..tasks.images import ImageEncoder

                enc = ImageEncoder(load_task(dict(spec)), entry.metadata.get("preprocessing") or bb.preprocessing)
            elif not spec or not spec.get("verbalizer"):
                raise RequestError(f"task {model!r} is not a classification task (its prompt file has no "
                                   "verbalizer); use /v1/completions", param="model")
            else:
                enc = TaskEncoder(load_task(dict(spec)), bb.tokenizer, entry.num_virtual_tokens, bb.max_positions,
                                  bb.pad_token_id)
            self._encoders = {k: v for k, v in self._encoders.items() if k[0] != model} | {key: enc}
        return enc

    def classify_job(self, model: str, item: str | dict, emit: Callable[[str, Any], None] = lambda k, v: None) -> Job:
        entry = self.resolve(model)
        if entry is None:
            raise RequestError(f"{model!r} is the bare model; classification needs a task", param="model")
        enc = self.encoder(model, entry)
        if getattr(enc.task, "modality", "text") == "image":
            return self._image_job(model, entry, enc, item, emit)
        fields = enc.task.fields
        if isinstance(item, str):
            if len(fields) != 1:
                raise RequestError(f"task {model!r} has fields {fields}; send an object with them", param="input")
            item = {fields[0]: item}
        missing = [f for f in fields if not isinstance(item.get(f), str)]
        if missing:
            raise RequestError(f"input lacks text field(s) {missing} of task {model!r}", param="input")
        if not any(item[f].strip() for f in fields):
            raise RequestError("input is empty; send some text", param="input")
        try:
            ids = enc.encode_input(item)  # cut to the task's max_length like in training
        except SoftPromptError as e:
            raise RequestError(str(e), param="input") from None
        return Job("classify", model, entry, ids, emit, encoder=enc)

    def _image_job(self, model: str, entry: TaskEntry, enc: Any, item: Any, emit) -> Job:
        """An image task's request: {"image": base64 (or a data: URL)} in JSON, or the bytes of an upload."""
        import base64
        import binascii

        image = item.get("image") if isinstance(item, dict) else None
        if image is None:
            raise RequestError(f"task {model!r} classifies images; send {{\"image\": \"<base64 PNG or JPEG>\"}} or a "
                               "multipart upload", param="input")
        if isinstance(image, str):
            data = image.split(",", 1)[1] if image.startswith("data:") else image
            try:
                image = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("image is not valid base64", param="input") from None
        try:
            pixels = enc.pixels([bytes(image)], self.backbone.device)
        except SoftPromptError as e:
            raise RequestError(str(e), param="input") from None
        return Job("classify", model, entry, [], emit, encoder=enc, pixels=pixels)

    def submit(self, job: Job) -> Job:
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue the requests of one HTTP call together (all or none); `Overloaded` when the queue is full."""
        if self._thread is None:
            raise Overloaded("the serving engine is not running (stopped, or start() not called)", retry_after=30)
        tokens = sum(j.queued_tokens for j in jobs)
        with self._cv:
            if not self._accepting or self._stopping:
                raise Overloaded("the server is shutting down; send the request again later", retry_after=5)
            if not self.alive:
                raise Overloaded("the server's worker has stopped; it cannot take requests", retry_after=30)
            if len(self._waiting) + len(jobs) > self.max_queue or (
                    self._waiting and self._queued_tokens + tokens > self.max_queued_tokens):
                with self.metrics.lock:
                    self.metrics.rejected += len(jobs)
                raise Overloaded(f"the server is busy ({len(self._waiting)} requests waiting); retry shortly")
            for job in jobs:
                self.metrics.count(job.kind)
                self._waiting.append(job)
            self._queued_tokens += tokens
            self._cv.notify_all()
        return jobs

    # --- the worker -----------------------------------------------------------------------------------
    def _take(self, block: bool) -> list[Job] | None:
        """Waiting requests for this step, in arrival order, within the step's budget (None: stop). With nothing
        running, waits for a first request and then up to the window for more."""
        with self._cv:
            if block:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return None
                deadline = time.perf_counter() + self.window
                while len(self._waiting) < self.max_batch and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            if self._stopping:
                return None
            rows = len(self._decoding.running) if self._decoding is not None else 0
            budget = self.step_tokens - rows
            taken: list[Job] = []
            classify = 0
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    self._queued_tokens -= job.queued_tokens
                    with self.metrics.lock:
                        self.metrics.cancelled += 1
                    continue
                if job.kind == "classify":
                    if classify >= self.max_batch or (job.cost > budget and taken):
                        break
                    classify += 1
                else:
                    if rows >= self.max_batch or (job.cost > budget and (taken or self._decoding is not None)):
                        break
                    rows += 1
                budget -= job.cost
                taken.append(self._waiting.popleft())
                self._queued_tokens -= job.queued_tokens
            return taken

    def _run(self) -> None:
        while True:
            try:
                block = self._decoding is None
                if not self.continuous and not block:
                    jobs: list[Job] | None = []  # the earlier policy: no one joins a running batch
                else:
                    jobs = self._take(block)
                if jobs is None:
                    break
                self._admit(jobs)
                if self._decoding is not None:
                    self._decode_step()
            except Exception as e:  # the worker must survive anything: fail what it was running, go on
                log.exception("the serving worker hit an error; failing its running requests")
                with self.metrics.lock:
                    self.metrics.worker_errors += 1
                self._fail(self._rows, e)
                self._rows, self._decoding = [], None

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        with self.metrics.lock:
            self.metrics.errors += sum(not j.answered for j in jobs)
        for job in jobs:
            job.send("error", f"internal error: {type(e).__name__}: {e}")

    def _admit(self, jobs: list[Job]) -> None:
        """Score the classification requests now; prefill the generations and merge them into the running batch."""
        groups = [([j for j in jobs if j.kind == "classify"], self._classify),
                  ([j for j in jobs if j.kind == "generate" and not j.row.cancelled], self._prefill)]
        if not self.mix_tasks:  # the per-adapter baseline: a batch per task, each decoded to its end
            groups = [([j for j in group if j.task == task], runner) for group, runner in groups
                      for task in dict.fromkeys(j.task for j in group)]
        for group, runner in groups:
            if group:
                self._guarded(group, runner)
                while not self.mix_tasks and self._decoding is not None:
                    self._decode_step()

    def _guarded(self, group: list[Job], runner) -> None:
        self.metrics.batch(len(group))
        try:
            with torch.inference_mode():
                runner(group)
        except Exception as e:  # one bad batch must not stop the server
            log.exception("batch failed")
            self._fail(group, e)
            if runner == self._prefill:
                self._rows = [j for j in self._rows if j not in group]

    def _classify(self, jobs: list[Job]) -> None:
        text = [j for j in jobs if j.pixels is None]
        scores = score_mixed(self.backbone, [(j.prompt, j.ids, j.encoder) for j in text],
                             self.reuse_prompt_cache) if text else []
        by_size: dict[tuple, list[Job]] = {}
        for j in jobs:
            if j.pixels is not None:
                by_size.setdefault(tuple(j.pixels.shape), []).append(j)
        images = [j for group in by_size.values() for j in group]
        for group in by_size.values():  # each size in one forward, the tasks' prompts mixed
            logits = MixedPromptedModel(self.backbone, [j.prompt for j in group]).classify(
                torch.cat([j.pixels for j in group]))
            scores += [x.float().log_softmax(-1) for x in logits]
        for job, s in zip(text + images, scores, strict=True):
            labels = job.encoder.task.labels
            values = s.tolist()
            job.first_token = time.perf_counter()
            self.metrics.finished(job, 0)
            job.send("done", Result(prompt_tokens=len(job.ids), label=labels[int(s.argmax())],
                                    scores=dict(zip(labels, values, strict=True))))

    def _prefill(self, jobs: list[Job]) -> None:
        ids, mask = left_pad([j.ids for j in jobs], self.backbone.pad_token_id, self.backbone.device)
        dec = Decoding(self.backbone, [j.prompt for j in jobs], ids, mask, [j.row for j in jobs],
                       reuse_prompt_cache=self.reuse_prompt_cache)
        if self._decoding is None:
            self._decoding, self._rows = dec, list(jobs)
        else:
            self._decoding.merge(dec)
            self._rows = self._rows + list(jobs)

    def _decode_step(self) -> None:
        """Pick every running row's next token, stream it, drop finished rows, and run the next forward."""
        dec, jobs = self._decoding, self._rows
        with torch.inference_mode():
            changed = dec.pick()
        now = time.perf_counter()
        for i in changed:
            job, row = jobs[i], jobs[i].row
            if job.first_token is None:
                job.first_token = now
            if row.finish_reason == "cancelled":
                with self.metrics.lock:
                    self.metrics.cancelled += 1
                job.answered = True
                continue
            upto = len(row.text) if row.done else len(row.text) - _holdback(row.text, row.sampling.stop)
            if upto > job.sent:
                job.send("delta", row.text[job.sent:upto])
                job.sent = upto
            if row.done:
                self.metrics.finished(job, len(row.tokens))
                job.send("done", Result(text=row.text, tokens=list(row.tokens), finish_reason=row.finish_reason,
                                        prompt_tokens=len(job.ids)))
        if not dec.running:
            self._decoding, self._rows = None, []
            return
        with torch.inference_mode():
            dec.advance()
        if len(dec.rows) > 4 * self.max_batch:  # forget finished rows so the lists stay short
            self._compact()

    def _compact(self) -> None:
        dec = self._decoding
        keep = dec.running
        dec.rows = [dec.rows[i] for i in keep]
        self._rows = [self._rows[i] for i in keep]
        dec.running = list(range(len(keep)))
