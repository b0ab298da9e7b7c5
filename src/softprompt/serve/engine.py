"""The serving engine: requests for many tasks, batched together on one backbone by one worker thread.

Requests (generation or classification, any task) wait in one bounded queue. The worker runs continuous
batching: at every decode step it takes in waiting requests while the step's token budget allows (a new
generation's prefill tokens plus one token per running row) and pacing does (about as many new generations as finish
per step in a steady state, so that a burst spreads over steps), scores the classification requests at once (they never
wait for generations), and runs one decode step for every running row, each attending to its own task's cached
prompt key/values, with the new generations' prefill riding in the same forward (with nothing running, the
prefill is a forward of its own). The new rows' first tokens are sent as soon as that forward ends; they then join
the running batch, and each running row's token is sent. Finished rows leave at once; the next step waits
briefly for their clients' next requests. ``continuous=False`` keeps the earlier policy (a batch runs until its last
row finishes; requests that arrive meanwhile form the next batch), for comparison.

Results go back through each request's ``emit`` callback, called from the worker thread: ``("delta", text)``
while streaming, then ``("done", Result)``, or ``("error", message)``. A full queue refuses new requests with
`Overloaded` (HTTP 503 with Retry-After); an exception in the worker fails the requests it was running and the
worker goes on; `stop()` fails whatever is still waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from ..ensemble import combine
from ..errors import SoftPromptError
from ..generation import Decoding
from ..model import MixedPromptedModel
from ..runtime.threads import release_openmp_threads
from ..tasks.encode import left_pad
from .bank import PromptBank
from .jobs import Frontend, Job, Overloaded, RequestError, Result, _holdback, log  # noqa: F401 (re-exported)
from .score import score_mixed


class Engine(Frontend):
    """One worker thread running requests on the bank's backbone, continuously batched.

    max_batch: most rows decoding at once. step_tokens: a step's token budget (new prefill tokens + running rows);
    a request whose prefill alone exceeds it still runs, by itself. Default: 512 on a CPU, where a 2,048-token
    prefill stalls the running rows for seconds (benchmarks/serving.py could not separate the two on 2 cores:
    their requests/s differ less than runs of one cell do), 2,048 on an accelerator. max_queue / max_queued_tokens: most requests,
    and most tokens (inputs + max_tokens), waiting; past either, `submit` raises `Overloaded`. pace: beside a running
    batch, take in about as many new generations per step as finish per step in a steady state (`_pace`), so that
    requests that arrived together are prefilled over several steps and their clients, answered in different steps,
    ask again in different steps: steps stay even instead of a few long ones (every prefill at once) between
    decode-only ones.
    """

    def __init__(self, bank: PromptBank, max_batch: int = 32, window_ms: float = 5.0,
                 reuse_prompt_cache: bool = True, mix_tasks: bool = True, max_tokens_limit: int = 2048,
                 chat_max_tokens: int = 512, continuous: bool = True, step_tokens: int | None = None,
                 max_queue: int = 256, max_queued_tokens: int = 1_000_000, pace: bool = True):
        if step_tokens is None:
            step_tokens = 512 if bank.backbone.device.type == "cpu" else 2048
        for name, value in (("step_tokens", step_tokens), ("max_queue", max_queue),
                            ("max_queued_tokens", max_queued_tokens)):
            if value < 1:
                raise SoftPromptError(f"{name} must be at least 1 (got {value})")
        super().__init__(bank, max_batch, max_tokens_limit, chat_max_tokens)
        self.window = window_ms / 1000
        self.reuse_prompt_cache = reuse_prompt_cache
        self.mix_tasks = mix_tasks  # False: a batch holds one task's requests (the per-adapter baseline)
        self.continuous, self.step_tokens = continuous, step_tokens
        self.max_queue, self.max_queued_tokens = max_queue, max_queued_tokens
        self._waiting: deque[Job] = deque()
        self._queued_tokens = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self._rows: list[Job] = []  # a job per row of the batch being decoded (finished ones until compacted)
        self._decoding: Decoding | None = None
        self._joining: tuple[Decoding, list[Job]] | None = None  # new rows whose prefill rides in the next step
        self._freed, self._step_s = 0, 0.0  # rows the last decode step finished; how long its forward took
        self.pace = pace and continuous
        self.pace_floor = step_tokens // 4  # prefill tokens a step takes in before pacing holds any back
        self._lifetime: float | None = None  # steps a finished generation decoded (a moving average)

    # --- lifecycle ------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run a short generation at each row count whose decode steps may use their own weight copies (float32 on a
        CPU: oneDNN's reordered weights, or with packed decode steps a copy per row bucket of 8, 16 and 32 rows), so
        that they are made before the first request: the first requests are not slowed by them, and the server's
        memory after start is what it holds under load (made on first use, a bucket's copy appeared in the middle of
        a load test)."""
        if self.backbone.kind != "causal_lm":
            return
        from ..fastpath.packed import BUCKETS
        from ..generation import generate

        for rows in dict.fromkeys(min(b, self.max_batch) for b in BUCKETS):
            generate(self.backbone, None, ["warm up"] * rows, max_new_tokens=2)

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping, self._accepting = False, True
            # this thread (which loaded and warmed the model) hands its OpenMP workers back: beside the worker's
            # own, they would make every parallel operation of the worker wake its threads through the kernel
            # (runtime/threads.py)
            release_openmp_threads()
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

    def queue_depth(self) -> int:
        return len(self._waiting)

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
        running, waits for a first request and then up to the window for more. When rows just finished, waits up
        to the window (at most a tenth of the last decode step) for as many new requests: a client that got its answer
        often sends its next request at once, and a request that misses this step waits a whole step longer."""
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
            elif self._freed:
                deadline = time.perf_counter() + min(self.window, self._step_s / 10)
                want = len(self._waiting) + self._freed  # (requests pacing holds back are waiting already)
                while len(self._waiting) < want and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            self._freed = 0
            if self._stopping:
                return None
            running = rows = len(self._decoding.running) if self._decoding is not None else 0
            budget = self.step_tokens - rows
            pace, hold = self._pace()
            prefill = 0
            taken: list[Job] = []
            held: list[Job] = []  # generations pacing keeps for a later step, in order
            classify = 0
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled:
                    self._waiting.popleft()
                    self._queued_tokens -= job.queued_tokens
                    with self.metrics.lock:
                        self.metrics.cancelled += 1
                    continue
                if job.kind != "generate":  # classification and detection: scored in this step, no running row
                    if (classify and classify + job.copies > self.max_batch) or (job.cost > budget and taken):
                        break
                    classify += job.copies
                else:
                    if rows >= self.max_batch or (job.cost > budget and (taken or self._decoding is not None)):
                        break
                    # paced: the rest wait for the next step (classification behind them does not), unless this
                    # step's prefill is still short (a quarter of the budget costs about a decode step on a CPU:
                    # holding it back gains nothing)
                    if rows - running >= pace and prefill >= self.pace_floor and job.held < hold:
                        job.held += 1
                        held.append(self._waiting.popleft())
                        continue
                    prefill += job.cost
                    rows += 1
                budget -= job.cost
                taken.append(self._waiting.popleft())
                self._queued_tokens -= job.queued_tokens
            self._waiting.extendleft(reversed(held))
            return taken

    def _pace(self) -> tuple[int, int]:
        """The generations this step may take in, and the most steps pacing may keep a request waiting. In a
        steady state as many rows join per step as finish: the rows running and waiting over the steps a row lives
        (from the rows that finished lately). Taking in about that many spreads a burst over steps (a burst taken
        in at once makes one long step, which every running row waits for, and its rows finish together and come
        back together). No pacing until a row has finished, or with nothing running; a request waits at most half
        a row's life."""
        life = self._lifetime
        if not self.pace or life is None or self._decoding is None:
            return 1 << 30, 0
        steps = max(1, round(life))
        waiting = sum(j.kind == "generate" for j in self._waiting)
        return -(-(len(self._decoding.running) + waiting) // steps), max(1, steps // 2)

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
                self._fail(self._rows + (self._joining[1] if self._joining else []), e)
                self._rows, self._decoding, self._joining = [], None, None

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        with self.metrics.lock:
            self.metrics.errors += sum(not j.answered for j in jobs)
        for job in jobs:
            job.send("error", f"internal error: {type(e).__name__}: {e}")

    def _admit(self, jobs: list[Job]) -> None:
        """Score the classification requests now; prefill the generations and merge them into the running batch."""
        generate = self._generate_whole if self.backbone.kind == "seq2seq" else self._prefill
        groups = [([j for j in jobs if j.kind == "classify"], self._classify),
                  ([j for j in jobs if j.kind == "detect"], self._detect),
                  ([j for j in jobs if j.kind == "generate" and not j.row.cancelled], generate)]
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
        """Every request's rows in one mixed batch (one forward per image size): a task's row under its prompt, an
        ensemble task's row once under each of its prompts, their label probabilities combined afterwards."""
        units = [(j, m.prompt) for j in jobs for m in (j.entry.members or (j.entry,))]
        text = [u for u in units if u[0].pixels is None]
        scores = score_mixed(self.backbone, [(p, j.ids, j.encoder) for j, p in text],
                             self.reuse_prompt_cache) if text else []
        by_size: dict[tuple, list] = {}
        for u in units:
            if u[0].pixels is not None:
                by_size.setdefault(tuple(u[0].pixels.shape), []).append(u)
        images = [u for group in by_size.values() for u in group]
        for group in by_size.values():  # each size in one forward, the tasks' prompts mixed
            logits = MixedPromptedModel(self.backbone, [p for _, p in group]).classify(
                torch.cat([j.pixels for j, _ in group]))
            scores += [x.float().log_softmax(-1) for x in logits]
        per_job: dict[int, list[torch.Tensor]] = {}
        for (job, _), s in zip(text + images, scores, strict=True):
            per_job.setdefault(id(job), []).append(s)
        for job in jobs:
            s = per_job[id(job)]
            if job.entry.members:  # the members' label log-probabilities, combined as `softprompt eval` does
                logp = torch.stack(s).float().log_softmax(-1)
                best, s = int(combine(logp, job.entry.combine).argmax()), logp.exp().mean(0).log()
            else:
                s = s[0]
                best = int(s.argmax())
            labels = job.encoder.task.labels
            job.first_token = time.perf_counter()
            self.metrics.finished(job, 0)
            job.send("done", Result(prompt_tokens=len(job.ids), label=labels[best],
                                    scores=dict(zip(labels, s.tolist(), strict=True))))

    def _detect(self, jobs: list[Job]) -> None:
        """Every detection request in one mixed batch (one forward per image size and prompt length), each row under
        its task's prompt and class head."""
        by_size: dict[tuple, list[Job]] = {}
        for job in jobs:
            by_size.setdefault(tuple(job.pixels.shape), []).append(job)
        for group in by_size.values():
            out = MixedPromptedModel(self.backbone, [j.prompt for j in group]).detect(
                torch.cat([j.pixels for j in group]))
            for job, (logits, boxes) in zip(group, out, strict=True):
                objects = job.encoder.objects(logits, boxes, *job.image_size, threshold=job.threshold)
                job.first_token = time.perf_counter()
                self.metrics.finished(job, 0)
                job.send("done", Result(objects=objects))

    def _generate_whole(self, jobs: list[Job]) -> None:
        """An encoder-decoder: requests generated to their end by transformers' generate on their prompted encoder
        inputs (no continuous batching: the encoder-decoder has no running batch to join), greedy requests of the
        same length and stop strings in one call (each task's rows together), a sampled one alone (its seed then
        gives the same text as offline); each text arrives as one delta, then done."""
        from ..generation import generate

        calls: dict[Any, list[Job]] = {}
        for job in jobs:
            s = job.sampling
            calls.setdefault((s.max_new_tokens, s.stop) if s.temperature == 0 else id(job), []).append(job)
        for group in calls.values():
            s = group[0].sampling
            out = generate(self.backbone, [j.prompt for j in group], [j.ids for j in group],
                           max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
                           temperature=s.temperature or 1.0, top_p=s.top_p, seed=s.seed, stop=list(s.stop))
            for job, text, tokens, reason in zip(group, out.texts, out.tokens, out.stats["finish_reasons"],
                                                 strict=True):
                job.first_token = time.perf_counter()
                self.metrics.finished(job, len(tokens))
                if text:
                    job.send("delta", text)
                job.send("done", Result(text=text, tokens=tokens, finish_reason=reason, prompt_tokens=len(job.ids)))

    def _prefill(self, jobs: list[Job]) -> None:
        """The new generations' prefill. Beside a running batch (continuous batching) it rides in that batch's next
        step (one forward for both, `Decoding.advance(joining=...)`); otherwise it runs now. Either way the new
        rows' first tokens are sent at once, then they join the running batch."""
        ids, mask = left_pad([j.ids for j in jobs], self.backbone.pad_token_id, self.backbone.device)
        joint = self._decoding is not None and self.continuous and self.mix_tasks
        dec = Decoding(self.backbone, [j.prompt for j in jobs], ids, mask, [j.row for j in jobs],
                       reuse_prompt_cache=self.reuse_prompt_cache, capacity=self.max_batch, prefill=not joint)
        if joint:
            self._joining = (dec, list(jobs))
            return
        self._send(dec.pick(), jobs)
        self._join(dec, jobs)

    def _join(self, dec: Decoding, jobs: list[Job]) -> None:
        if not dec.running:
            return
        if self._decoding is None or not self._decoding.running:
            self._decoding, self._rows = dec, list(jobs)
        else:
            self._decoding.merge(dec)
            self._rows = self._rows + list(jobs)

    def _decode_step(self) -> None:
        """One forward for every running row (and the prefill of the rows joining, if any); then the new rows'
        first tokens picked and sent at once, the running rows' next tokens picked (finished rows leave), the new
        rows merged in, and the running rows' tokens sent (before any prefill of the next step)."""
        dec = self._decoding
        joining = self._joining
        running = len(dec.running)
        start = time.perf_counter()
        rows = self._rows
        with torch.inference_mode():
            dec.advance(joining[0] if joining else None)
            self._step_s = time.perf_counter() - start
            theirs = joining[0].pick() if joining else []
        if joining:  # a first token waits for nothing else (a first token rarely finishes a row: few clients wake)
            self._send(theirs, joining[1])
        with torch.inference_mode():
            changed = dec.pick()
            self._freed = running - len(dec.running)
            if joining:  # merged before the sends: the clients the sends wake would slow the merge's many small ops
                self._join(*joining)
                self._joining = None
        self._send(changed, rows)
        if not self._decoding.running:
            self._decoding, self._rows = None, []
        elif len(self._decoding.rows) > 4 * self.max_batch:  # forget finished rows so the lists stay short
            self._compact()

    def _send(self, changed: list[int], jobs: list[Job]) -> None:
        """Stream what the rows `changed` (indices into `jobs`) got at this pick; answer the ones that finished."""
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
                life = len(row.tokens) + (row.finish_reason == "stop")  # the steps it decoded
                self._lifetime = life if self._lifetime is None else 0.8 * self._lifetime + 0.2 * life
                self.metrics.finished(job, len(row.tokens))
                job.send("done", Result(text=row.text, tokens=list(row.tokens), finish_reason=row.finish_reason,
                                        prompt_tokens=len(job.ids)))

    def _compact(self) -> None:
        keep = self._decoding.forget_finished()
        self._rows = [self._rows[i] for i in keep]
