"""`coreinfer serve`: the engine side of the OpenAI-compatible server (the HTTP side is app.py).

Requests become Jobs in a bounded queue. One Worker thread owns the model and batches continuously:
between two decode steps it takes waiting jobs while the batch has a free row, prefills each alone
(dense, choosing its core set), and moves it into the running DecodeBatch (engine/batching.py); every
step then decodes one token of every running job in one forward, and each text piece goes back to
its request's event loop. A Job's cancel flag (client gone, deadline passed) is checked before every
step, and a finished or cancelled job's row is freed for the next one at once.
This module imports no web framework, so the rest of the CLI works without the `serve` extra.
"""

import asyncio
import logging
import queue
import resource
import threading
import time
from dataclasses import dataclass, field, replace

from ..api import Completion, StreamEvent
from ..engine.batching import DecodeBatch, Row, prefill_one
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

    def __post_init__(self):
        checks = [
            (self.queue_size >= 1, f"queue size must be >= 1, got {self.queue_size}"),
            (self.max_batch >= 1, f"max batch must be >= 1, got {self.max_batch}"),
            (self.request_timeout > 0, f"request timeout must be > 0, got {self.request_timeout}"),
            (self.max_body_bytes >= 1024, f"max body bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.default_max_tokens >= 1, f"default max tokens must be >= 1, got {self.default_max_tokens}"),
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
    """One request's generation. `events` lives on the request's loop and receives StreamEvents, then
    ends with an event carrying the Completion, or with a RequestError."""

    prompt: str | list[dict]
    chat: bool
    gen: GenerationConfig
    core: CoreConfig | None
    loop: asyncio.AbstractEventLoop
    prompt_param: str = "prompt"  # the request field a too-long prompt is blamed on
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
class Live:
    """A job whose sequence is in the decode batch: its text so far and its clocks."""

    job: Job
    text: TextStream
    prompt_tokens: int
    stats: CoreStats | None
    t0: float  # prefill start
    t_first: float  # first token


class Worker:
    """The one thread that touches the model (see the module docstring). Counters and the batch are
    written only by that thread."""

    def __init__(self, llm, queue_size: int, max_batch: int = Settings.max_batch):
        self.llm = llm
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.batch = DecodeBatch(llm.model, max_batch)
        self.live: dict[Row, Live] = {}
        self.current: Job | None = None  # the job being prefilled
        self.prefill_caches = None  # the last prefill's KV caches, reused by the next of the same shape
        self.completed = self.failed = self.cancelled = 0
        self.started_at = time.time()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coreinfer-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; "
                                    "retry later", code="queue_full") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running jobs, refuse the waiting ones, end the thread."""
        self._stopping.set()
        for live in list(self.live.values()):
            live.job.cancel()
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)  # may wait for room: the thread frees it, refusing jobs as it goes
        self._thread.join(timeout)

    def _loop(self) -> None:
        while self._admit():
            if self.live:
                self._step()

    def _admit(self) -> bool:
        """Start waiting jobs while the batch has a free row (wait for one while it is empty); False
        once the stop sentinel arrives."""
        while len(self.live) < self.batch.capacity:
            try:
                job = self.jobs.get(block=not self.live)
            except queue.Empty:
                return True
            if job is None:
                return False
            if self._stopping.is_set():
                job.push(RequestError(503, "the server is shutting down", code="shutting_down"))
            elif job.cancelled.is_set():  # its client left (or timed out) while it waited
                self.cancelled += 1
            else:
                job.queue_s = time.perf_counter() - job.queued_at
                self.current = job
                try:
                    self._start(job)
                finally:
                    self.current = None
        return True

    def _start(self, job: Job) -> None:
        """Prefill the job alone and move it into the batch; its first token comes from the prefill."""
        llm = self.llm
        try:
            ids = llm.encode(job.prompt, job.chat)
            gen = self._fit(job, len(ids))
            policy = make_policy(job.core, llm.model, llm.load_clusters)
            t0 = time.perf_counter()
            session, logits, selection, stats = prefill_one(llm.model, ids, policy, llm.tokenizer.pad_id,
                                                            self.prefill_caches)
            self.prefill_caches = session.caches
            row, token = self.batch.add(session, logits, gen, llm.tokenizer.eos_ids, selection)
        except Exception as e:
            self._fail(job, e)
            return
        self.live[row] = Live(job, TextStream(llm.tokenizer, gen.stop), len(ids), stats, t0, time.perf_counter())
        self._emit(row, token)

    def _step(self) -> None:
        """Free the rows of cancelled jobs, then decode one token of every running job."""
        for row, live in list(self.live.items()):
            if live.job.cancelled.is_set():
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

    def _emit(self, row: Row, token: int) -> None:
        """Hand a job its new token's text; finish it on EOS, a stop string or its token limit."""
        live = self.live[row]
        if token in self.llm.tokenizer.eos_ids and not row.gen.ignore_eos:
            return self._finish(row, "stop")
        piece = live.text.push(token)
        if piece:
            live.job.push(StreamEvent(0, piece))
        if live.text.stopped or row.done:
            self._finish(row, "stop" if live.text.stopped else "length")

    def _finish(self, row: Row, reason: str) -> None:
        live = self._drop(row)
        t_end = time.perf_counter()
        tail = live.text.finish()
        done = Completion(live.text.text, live.text.ids, reason, live.prompt_tokens, prefill_s=live.t_first - live.t0,
                          decode_s=t_end - live.t_first, stats=live.stats)
        live.job.batching = row.stats.report(self.batch.dense_bytes)
        live.job.push(StreamEvent(0, tail, done))
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
        return {"status": "ok" if self.alive() else "unavailable", "busy": rows > 0 or self.current is not None,
                "queue_depth": self.jobs.qsize(), "queue_size": self.jobs.maxsize,
                "batch_rows": rows, "max_batch": batch.capacity, "ffn_layers": dict(batch.layer_paths),
                "step_bytes_per_sequence": round(batch.step_bytes / rows) if rows else None,
                "requests_completed": self.completed, "requests_failed": self.failed,
                "requests_cancelled": self.cancelled, "uptime_s": round(time.time() - self.started_at, 1),
                "peak_rss_mb": round(peak_kib / 1024, 1)}


def value_error(e: ValueError, fields: tuple, rename: dict) -> RequestError:
    """The engine's config checks mostly say 'FIELD must ...': blame that field of the request."""
    first = str(e).split(" ", 1)[0]
    return RequestError(400, str(e), param=rename.get(first, first if first in fields else None))


def server_core(llm, core: CoreConfig | None) -> CoreConfig | None:
    """The server's default core setting with profile "auto" resolved (LLM.default_core), logged.
    Continuous batching runs a profile's per-token plans row by row (engine/batching.py)."""
    if core is None or core.profile != AUTO:
        return core
    _, line = llm.default_core()
    log.info("%s", line)
    return llm.resolve(core)


def core_for(default: CoreConfig | None, req, num_layers: int) -> CoreConfig | None:
    """The server's core settings with the request's options laid over them; None decodes dense."""
    given = {k: getattr(req, k) for k in CORE_FIELDS if getattr(req, k) is not None}
    # naming any core option asks for core neurons even when the server decodes dense by default
    dense = req.dense if req.dense is not None else default is None and not given
    if dense:
        if given:
            raise RequestError(400, f"{', '.join(given)} cannot be used with dense decoding", param=next(iter(given)))
        return None
    try:
        # keeps the server's cluster set, if any; a request's own options replace a profile's budgets
        base = default if default is not None and not (given and default.profile) else CoreConfig()
        core = replace(base, **given)
        core.keep(num_layers)  # checks the layer spec and the number of betas now, not mid-generation
    except ValueError as e:
        raise value_error(e, CORE_FIELDS, {"similarity": "mode", "bad": "layers"}) from None
    return core


def make_job(llm, settings: Settings, req, prompt, chat: bool, default_max: int) -> Job:
    """A checked request (app.py's Common) as a Job; raises RequestError on values out of range."""
    if req.n != 1:
        raise RequestError(400, "only n=1 is supported", param="n")
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if asked is not None and asked > llm.model.max_context:
        raise RequestError(400, f"max_tokens must be <= the context of {llm.model.max_context} tokens, got {asked}",
                           param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        gen = GenerationConfig(max_new_tokens=asked or default_max, temperature=req.temperature, top_k=req.top_k,
                               top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed,
                               stop=stop, ignore_eos=req.ignore_eos)
    except ValueError as e:
        raise value_error(e, GEN_FIELDS, {"max_new_tokens": "max_tokens"}) from None
    core = core_for(settings.core, req, len(llm.model.layers))
    return Job(prompt, chat, gen, core, asyncio.get_running_loop(), prompt_param="messages" if chat else "prompt",
               fit_max_tokens=asked is None)


def core_info(job: Job, completion) -> dict:
    """What the request ran with and how it went: echoed as the response's `coreinfer` object."""
    info = {"dense": job.core is None}
    if job.core is not None:
        info.update({k: getattr(job.core, k) for k in CORE_FIELDS})
    stats = completion.stats
    if stats is not None:
        info.update(core_sizes={str(k): v for k, v in stats.core_sizes.items()}, ffn_width=stats.ffn_width,
                    weight_bytes_fraction=round(stats.share, 4),
                    select_ms=round(stats.select_ms, 2), compact_ms=round(stats.compact_ms, 2))
        if stats.cluster is not None:  # similarity mode
            info.update(cluster=stats.cluster[0], cluster_score=round(stats.cluster_score[0], 4))
    info.update(job.batching or {})
    info.update(queue_s=round(job.queue_s, 4), prefill_s=round(completion.prefill_s, 4),
                decode_s=round(completion.decode_s, 4), prefill_tok_s=round(completion.prefill_tok_s, 1),
                decode_tok_s=round(completion.decode_tok_s, 1))
    return info


def usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}
