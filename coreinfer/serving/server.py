"""`coreinfer serve`: the engine side of the OpenAI-compatible server (the HTTP side is app.py).

Requests become Jobs in a bounded queue. One Worker thread owns the model and batches continuously:
between two decode steps it takes the waiting jobs while the batch has free rows, prefills them
together (one padded forward per core setting, dense, each choosing its core set; at most
Settings.prefill_tokens at a time, so decoding rows wait for one such prefill), and moves them into the
running DecodeBatch (engine/batching.py); every step then decodes one token of every running job in
one forward, and each text piece goes back to its request's event loop. A Job's cancel flag (client
gone, deadline passed) is checked before every step, and a finished or cancelled job's row is freed
for the next one at once.
This module imports no web framework, so the rest of the CLI works without the `serve` extra.
"""

import asyncio
import logging
import queue
import resource
import threading
import time
from dataclasses import dataclass, field, replace

from ..api import Completion
from ..engine.batching import DecodeBatch, Row, prefill_group
from ..engine.generate import GenerationConfig
from ..engine.policy import CoreConfig
from ..engine.profile import AUTO
from ..engine.session import CoreStats, make_policy
from ..io.text import TextStream

log = logging.getLogger("coreinfer.server")

API_KEY_ENV = "COREINFER_API_KEY"
GEN_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")
CORE_FIELDS = ("alpha", "beta", "statistic", "ranking", "layers", "mode")  # CoreConfig's, settable per request


@dataclass(frozen=True)
class Settings:
    """How the server behaves. core None: dense by default (requests may still ask for core neurons);
    the default, profile "auto", is resolved when the app starts (`server_core`)."""

    model_id: str | None = None  # None: the checkpoint's name
    api_key: str | None = None  # None: no authentication
    core: CoreConfig | None = field(default_factory=lambda: CoreConfig(profile=AUTO))
    queue_size: int = 64  # jobs waiting for a row of the decode batch
    max_batch: int = 16  # jobs decoding together
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256  # chat requests without max_tokens (OpenAI's completions default is 16)
    drain_timeout: float = 10.0  # on SIGTERM: seconds running requests may take to finish, then they end
    prefill_tokens: int = 512  # padded prompt tokens prefilled together between two decode steps (soft)

    def __post_init__(self):
        checks = [
            (self.queue_size >= 1, f"queue size must be >= 1, got {self.queue_size}"),
            (self.max_batch >= 1, f"max batch must be >= 1, got {self.max_batch}"),
            (self.request_timeout > 0, f"request timeout must be > 0, got {self.request_timeout}"),
            (self.max_body_bytes >= 1024, f"max body bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.default_max_tokens >= 1, f"default max tokens must be >= 1, got {self.default_max_tokens}"),
            (self.drain_timeout >= 0, f"drain timeout must be >= 0, got {self.drain_timeout}"),
            (self.prefill_tokens >= 1, f"prefill tokens must be >= 1, got {self.prefill_tokens}"),
            (self.api_key is None or self.api_key.strip() != "", "the API key is empty"),
            (self.core is None or (self.core.refine, self.core.input_keep, self.core.drift_period) == (None, 1, 0),
             "the server batches requests continuously, which decodes plain core sets: --refine, --input-keep and "
             "--drift-period are not supported by coreinfer serve"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class RequestError(Exception):
    """A failure the client caused or must hear about, rendered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation. `events` lives on the request's loop and receives Events, then
    ends with an event carrying the Completion, or with a RequestError."""

    prompt: str | list[dict]
    chat: bool
    gen: GenerationConfig
    core: CoreConfig | None
    loop: asyncio.AbstractEventLoop
    prompt_param: str = "prompt"  # the request field a too-long prompt is blamed on
    grammar: str | None = None  # structured output (engine/structured.py); None: free text
    fit_max_tokens: bool = False  # max_tokens was not given: shrink it to what the context leaves
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    queue_s: float = 0.0
    batching: dict | None = None  # how its decode steps were shared, once it has finished

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, item) -> None:
        """Hand an item to the request's loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


@dataclass
class TokenInfo:
    """A generated token's text and log-probability, and the likeliest alternatives' (logprobs)."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What a job's request receives: a piece of text, the logprobs of the tokens it completes (when
    asked), and on the last one the Completion."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    completion: Completion | None = None


@dataclass
class Ready:
    """A job taken from the queue, tokenized and checked, about to be prefilled."""

    job: Job
    ids: list[int]
    gen: GenerationConfig
    constraint: object | None  # engine/structured.py's Constraint


@dataclass
class Live:
    """A job whose sequence is in the decode batch: its text so far and its clocks."""

    job: Job
    text: TextStream
    prompt_tokens: int
    stats: CoreStats | None
    t0: float  # prefill start
    t_first: float  # first token
    tokens: list[TokenInfo] = field(default_factory=list)  # logprobs not yet sent (their text is held back)


class Worker:
    """The one thread that touches the model (see the module docstring). Counters and the batch are
    written only by that thread."""

    def __init__(self, llm, queue_size: int, max_batch: int = Settings.max_batch,
                 prefill_tokens: int = Settings.prefill_tokens):
        self.llm, self.prefill_tokens = llm, prefill_tokens
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.batch = DecodeBatch(llm.model, max_batch)
        self.live: dict[Row, Live] = {}
        self.starting: list[Job] = []  # the jobs being prefilled
        self.prefill_caches = None  # the last prefill's KV caches, reused by the next of the same shape
        self.grammars = None  # engine/structured.py's Grammars, built on the first request that needs it (~1 s)
        self.completed = self.failed = self.cancelled = 0
        self.started_at = time.time()
        self._stopping = threading.Event()
        self._drain_until: float | None = None  # monotonic deadline once draining (SIGTERM)
        self._thread = threading.Thread(target=self._loop, name="coreinfer-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set() and self._drain_until is None

    def submit(self, job: Job) -> None:
        if self._stopping.is_set() or self._drain_until is not None:
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                                    "retry later", code="queue_full") from None

    def drain(self, seconds: float) -> None:
        """Take no more jobs; let the running ones finish for `seconds`, then end them with an error
        (their streams get an error event, then [DONE]). Safe from any thread, a signal handler's too."""
        if self._drain_until is None:
            self._drain_until = time.monotonic() + seconds
            log.info("shutting down: running requests get %.0f s to finish", seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running jobs, refuse the waiting ones, end the thread."""
        self._stopping.set()
        for live in list(self.live.values()):
            live.job.cancel()
        for job in self.starting:
            job.cancel()
        self.jobs.put(None)  # may wait for room: the thread frees it, refusing jobs as it goes
        self._thread.join(timeout)

    def _loop(self) -> None:
        while self._admit():
            if self.live:
                self._step()

    def _admit(self) -> bool:
        """Take waiting jobs while the batch has free rows (wait for one while it is empty) and prefill
        them together, about `prefill_tokens` padded prompt tokens at most, so that arrivals fill the
        batch at once while the running rows wait for one such prefill between two decode steps.
        False once the stop sentinel arrives."""
        ready: list[Ready] = []
        while len(self.live) + len(ready) < self.batch.capacity:
            try:
                job = self.jobs.get(block=not self.live and not ready)
            except queue.Empty:
                break
            if job is None:
                self._start(ready)
                return False
            if self._stopping.is_set() or self._drain_until is not None:
                job.push(RequestError(503, "the server is shutting down", code="shutting_down"))
            elif job.cancelled.is_set():  # its client left (or timed out) while it waited
                self.cancelled += 1
            elif (r := self._prepare(job)) is not None:
                ready.append(r)
                if max(len(r.ids) for r in ready) * len(ready) >= self.prefill_tokens:
                    break
        self._start(ready)
        return True

    def _prepare(self, job: Job) -> "Ready | None":
        """Tokenize and check a job (tokenizing on this thread keeps the tokenizer on one thread);
        None once it has failed."""
        job.queue_s = time.perf_counter() - job.queued_at
        try:
            ids = self.llm.encode(job.prompt, job.chat)
            gen = self._fit(job, len(ids))
            constraint = None if job.grammar is None else self._constraint(job.grammar)
        except Exception as e:
            self._fail(job, e)
            return None
        return Ready(job, ids, gen, constraint)

    def _start(self, ready: list["Ready"]) -> None:
        """Prefill the ready jobs, those with the same core settings together, and move each into the
        batch; a job's first token comes from its prefill."""
        groups: list[list[Ready]] = []
        for r in ready:
            group = next((g for g in groups if g[0].job.core == r.job.core), None)
            if group is None:
                groups.append([r])
            else:
                group.append(r)
        self.starting = [r.job for r in ready]
        try:
            for group in groups:
                self._prefill(group)
        finally:
            self.starting = []

    def _prefill(self, group: list["Ready"]) -> None:
        llm = self.llm
        t0 = time.perf_counter()
        try:
            policy = make_policy(group[0].job.core, llm.model, llm.load_clusters)
            session, logits, selection, stats = prefill_group(llm.model, [r.ids for r in group], policy,
                                                              llm.tokenizer.pad_id, self.prefill_caches)
            self.prefill_caches = session.caches
        except Exception as e:
            for r in group:
                self._fail(r.job, e)
            return
        for b, r in enumerate(group):
            try:
                row, token = self.batch.add(session, logits, r.gen, llm.tokenizer.eos_ids, selection, r.constraint,
                                            seq=b)
            except Exception as e:
                self._fail(r.job, e)
                continue
            self.live[row] = Live(r.job, TextStream(llm.tokenizer, r.gen.stop), len(r.ids), stats[b], t0,
                                  time.perf_counter())
            self._emit(row, token)

    def _step(self) -> None:
        """Free the rows of cancelled jobs (all of them once a drain's time is up), then decode one
        token of every running job."""
        drained = self._drain_until is not None and time.monotonic() >= self._drain_until
        for row, live in list(self.live.items()):
            if drained:
                self._drop(row)
                self.failed += 1
                live.job.push(RequestError(503, "the server shut down before this request finished",
                                           code="shutting_down"))
            elif live.job.cancelled.is_set():
                self._drop(row)
                self.cancelled += 1
        if not self.live:
            return
        try:
            out = self.batch.step()
        except Exception as e:  # a bug: every running job fails with it, the batch starts afresh
            for row, live in list(self.live.items()):
                self._drop(row)
                self._fail(live.job, e)
            return
        for row, token in out:
            self._emit(row, token)

    def _grammars(self):
        if self.grammars is None:
            from ..engine.structured import Grammars  # llguidance loads only once a request needs it

            llm = self.llm
            self.grammars = Grammars(llm.tokenizer.hf, llm.model.embed_tokens.weight.shape[0], llm.tokenizer.eos_ids)
        return self.grammars

    def _constraint(self, grammar: str):
        try:
            return self._grammars().constraint(grammar)
        except ValueError as e:
            raise RequestError(400, str(e), param="response_format") from None

    def _emit(self, row: Row, token: int) -> None:
        """Hand a job its new token's text; finish it on EOS, a stop string or its token limit."""
        live = self.live[row]
        # a grammar's document ends at EOS even under ignore_eos (engine/batching.py's Row.append)
        eos = token in self.llm.tokenizer.eos_ids and (not row.gen.ignore_eos or row.constraint is not None)
        if row.logprobs:
            if not eos:  # the EOS token's entry is not sent, as OpenAI's API does not
                live.tokens += [self._token_info(*entry) for entry in row.logprobs]
            row.logprobs.clear()
        if eos:
            return self._finish(row, "stop")
        piece = live.text.push(token)
        if piece:
            live.job.push(Event(piece, live.tokens))
            live.tokens = []
        if live.text.stopped or row.done:
            self._finish(row, "stop" if live.text.stopped else "length")

    def _token_info(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenInfo:
        decode = self.llm.tokenizer.hf.decode
        return TokenInfo(decode([token]), logprob, [(decode([i]), lp) for i, lp in top])

    def _finish(self, row: Row, reason: str) -> None:
        live = self._drop(row)
        t_end = time.perf_counter()
        tail = live.text.finish()
        done = Completion(live.text.text, live.text.ids, reason, live.prompt_tokens, prefill_s=live.t_first - live.t0,
                          decode_s=t_end - live.t_first, stats=live.stats)
        live.job.batching = row.stats.report(self.batch.dense_bytes)
        live.job.push(Event(tail, live.tokens, done))
        self.completed += 1

    def _drop(self, row: Row) -> Live:
        self.batch.remove(row)
        return self.live.pop(row)

    def _fail(self, job: Job, e: Exception) -> None:
        self.failed += 1
        if isinstance(e, RequestError):
            job.push(e)
        elif isinstance(e, ValueError):  # the engine's own checks of a request it was handed
            job.push(RequestError(400, str(e)))
        else:  # a bug: log it here, tell the client no more than that it failed
            log.error("generation failed", exc_info=e)
            job.push(RequestError(500, "internal error while generating", code="internal_error"))

    def _fit(self, job: Job, n: int) -> GenerationConfig:
        """Check the prompt's n tokens + max_tokens against the context (tokenizing on this thread keeps
        the tokenizer on one thread)."""
        context = self.llm.model.max_context
        if n >= context:
            raise RequestError(400, f"the prompt is {n} tokens; this model's context is {context} tokens",
                               param=job.prompt_param, code="context_length_exceeded")
        if job.fit_max_tokens:
            return replace(job.gen, max_new_tokens=min(job.gen.max_new_tokens, context - n))
        if n + job.gen.max_new_tokens > context:
            raise RequestError(400, f"the prompt ({n} tokens) + max_tokens ({job.gen.max_new_tokens}) exceeds this "
                                    f"model's context of {context} tokens", param="max_tokens",
                               code="context_length_exceeded")
        return job.gen

    def health(self) -> dict:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rows, batch = len(self.live), self.batch
        return {"status": "ok" if self.alive() else "unavailable", "busy": rows > 0 or bool(self.starting),
                "queue_depth": self.jobs.qsize(), "queue_size": self.jobs.maxsize,
                "batch_rows": rows, "max_batch": batch.capacity, "ffn_layers": dict(batch.layer_paths),
                "step_bytes_per_sequence": round(batch.step_bytes / rows) if rows else None,
                "requests_completed": self.completed, "requests_failed": self.failed,
                "requests_cancelled": self.cancelled, "uptime_s": round(time.time() - self.started_at, 1),
                "peak_rss_mb": round(peak_kib / 1024, 1)}


def server_core(llm, core: CoreConfig | None) -> CoreConfig | None:
    """The server's default core setting with profile "auto" resolved (LLM.default_core), logged.
    Continuous batching runs a profile's per-token plans row by row (engine/batching.py)."""
    if core is None or core.profile != AUTO:
        return core
    _, line = llm.default_core()
    log.info("%s", line)
    return llm.resolve(core)
