"""Requests as the serving engines see them: a `Job` per request, its `Result`, the errors a request can meet, the
engine's `Metrics`, and `Frontend`, which turns API requests into jobs (tokenising, templates, limits, the task's
prompt and encoder) the same way for every engine: the built-in one (`engine.Engine`) and vLLM (`vllm.VLLMEngine`).
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
from ..generation import Row, Sampling
from ..tasks.encode import TaskEncoder
from ..tasks.spec import load_task
from .bank import PromptBank, TaskEntry

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
    objects: list[dict] | None = None  # detection: {"label", "score", "box": [x0, y0, x1, y1] in the image's pixels}


@dataclass
class Job:
    kind: str  # "generate" | "classify" | "detect"
    task: str  # the task name, or the backbone's name for the bare model
    entry: TaskEntry | None  # None: the bare backbone, no prompt
    ids: list[int]
    emit: Callable[[str, Any], None]
    sampling: Sampling | None = None
    encoder: TaskEncoder | None = None
    pixels: torch.Tensor | None = None  # an image task's request: (1, C, S, S) normalised
    image_size: tuple[int, int] | None = None  # a detection request's image (width, height): boxes come back in it
    threshold: float = 0.5  # a detection request's lowest score kept
    row: Row | None = None
    sent: int = 0  # characters of text already streamed
    held: int = 0  # steps the engine's pacing kept it waiting
    created: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    answered: bool = False  # "done" or "error" was emitted: nothing more is sent

    @property
    def prompt(self) -> torch.Tensor | None:
        return None if self.entry is None else self.entry.prompt

    @property
    def copies(self) -> int:
        """Rows it takes in a batch: one, or one per prompt of an ensemble task."""
        return len(self.entry.members) if self.entry is not None and self.entry.members else 1

    @property
    def cost(self) -> int:
        """Tokens this request adds to a step's budget when it is prefilled (its input and virtual tokens)."""
        if self.pixels is not None:
            return self.copies
        return (len(self.ids) + (0 if self.entry is None else self.entry.num_virtual_tokens)) * self.copies

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


class Frontend:
    """What every engine shares: the prompt bank, request building and validation, metrics and the preparation
    thread. An engine adds the lifecycle (`start`, `stop`, `alive`, `saturated`, `busy`, `queue_depth`) and
    `submit_all`, which queues a request's jobs (all or none) or raises `Overloaded`."""

    def __init__(self, bank: PromptBank, max_batch: int = 32, max_tokens_limit: int = 2048,
                 chat_max_tokens: int = 512):
        if max_batch < 1:
            raise SoftPromptError(f"max_batch must be at least 1 (got {max_batch})")
        self.bank, self.backbone = bank, bank.backbone
        self.max_batch = max_batch
        self.max_tokens_limit = max_tokens_limit
        self.chat_max_tokens = chat_max_tokens  # chat requests without max_tokens: at most this many (and what fits)
        self.max_positions = self.backbone.max_positions  # an engine may allow fewer (vLLM's max_model_len)
        self.metrics = Metrics()
        self._encoders: dict[tuple[str, str], TaskEncoder] = {}
        self.prep = ThreadPoolExecutor(1, thread_name_prefix="softprompt-prep")  # tokenising, off the event loop

    @property
    def model_name(self) -> str:
        return self.backbone.name

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
        if entry is not None and entry.members:
            raise RequestError(f"task {model!r} is an ensemble of {len(entry.members)} classification prompts: it "
                               "classifies (POST /v1/classify), it does not generate text", param="model")
        if self.backbone.kind not in ("causal_lm", "seq2seq"):
            what = "a text encoder" if self.backbone.kind == "encoder" else "an image model"
            raise RequestError(f"model {self.model_name!r} is {what}: it classifies (POST /v1/classify), it "
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
        limit = self.max_positions or 10**9
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
            if spec and spec.get("modality") in ("image", "detection"):
                from ..tasks.detection import DetectionEncoder
                from ..tasks.images import ImageEncoder

                cls = DetectionEncoder if spec["modality"] == "detection" else ImageEncoder
                enc = cls(load_task(dict(spec)), entry.metadata.get("preprocessing") or bb.preprocessing)
            elif not spec or not spec.get("verbalizer"):
                raise RequestError(f"task {model!r} is not a classification task (its prompt file has no "
                                   "verbalizer); use /v1/completions", param="model")
            elif bb.kind == "encoder":  # a task head, or the masked-LM head at {mask}
                from ..tasks.encode import EncoderTaskEncoder

                enc = EncoderTaskEncoder(load_task(dict(spec)), bb, entry.num_virtual_tokens)
            else:
                enc = TaskEncoder(load_task(dict(spec)), bb.tokenizer, entry.num_virtual_tokens, self.max_positions,
                                  bb.pad_token_id)
            self._encoders = {k: v for k, v in self._encoders.items() if k[0] != model} | {key: enc}
        return enc

    def classify_job(self, model: str, item: str | dict, emit: Callable[[str, Any], None] = lambda k, v: None) -> Job:
        entry = self.resolve(model)
        if entry is None:
            raise RequestError(f"{model!r} is the bare model; classification needs a task", param="model")
        enc = self.encoder(model, entry)
        if enc.task.kind == "detection":
            raise RequestError(f"task {model!r} detects objects; use /v1/detect", param="model")
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

    def detect_job(self, model: str, item: Any, threshold: float = 0.5,
                   emit: Callable[[str, Any], None] = lambda k, v: None) -> Job:
        """A detection task's request: one image, as for classification; objects scored >= threshold come back."""
        entry = self.resolve(model)
        enc = self.encoder(model, entry) if entry is not None else None
        if enc is None or enc.task.kind != "detection":
            raise RequestError(f"{model!r} is not a detection task; /v1/detect serves the detection tasks in the "
                               "prompts folder", param="model")
        if not 0.0 <= threshold <= 1.0:
            raise RequestError(f"threshold must be in [0, 1] (got {threshold})", param="threshold")
        try:
            pixels, size = enc.read(_image_bytes(model, item, "detects objects in images"),
                                    self.backbone.device)
        except SoftPromptError as e:
            raise RequestError(str(e), param="input") from None
        return Job("detect", model, entry, [], emit, encoder=enc, pixels=pixels, image_size=size,
                   threshold=threshold)

    def _image_job(self, model: str, entry: TaskEntry, enc: Any, item: Any, emit) -> Job:
        """An image task's request: {"image": base64 (or a data: URL)} in JSON, or the bytes of an upload."""
        try:
            pixels = enc.pixels([_image_bytes(model, item)], self.backbone.device)
        except SoftPromptError as e:
            raise RequestError(str(e), param="input") from None
        return Job("classify", model, entry, [], emit, encoder=enc, pixels=pixels)

    def submit(self, job: Job) -> Job:
        return self.submit_all([job])[0]

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        raise NotImplementedError


def _image_bytes(model: str, item: Any, what: str = "classifies images") -> bytes:
    """The image of a request item: {"image": base64 or a data: URL} in JSON, or the bytes of an upload."""
    import base64
    import binascii

    image = item.get("image") if isinstance(item, dict) else None
    if image is None:
        raise RequestError(f"task {model!r} {what}; send {{\"image\": \"<base64 PNG or JPEG>\"}} or a "
                           "multipart upload", param="input")
    if isinstance(image, str):
        data = image.split(",", 1)[1] if image.startswith("data:") else image
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image is not valid base64", param="input") from None
    return bytes(image)
