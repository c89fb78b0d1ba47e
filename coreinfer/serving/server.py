"""`coreinfer serve`: the engine side of the OpenAI-compatible server (the HTTP side is app.py).

The model owns its KV cache and compacted FFNs, so exactly one generation runs at a time: requests
become Jobs in a bounded queue, and one Worker thread runs them in order, handing each text piece
back to the request's event loop. A Job's cancel flag (client gone, deadline passed) is checked
between pieces, and closing the engine's generator frees the worker for the next job.
This module imports no web framework, so the rest of the CLI works without the `serve` extra.
"""

import asyncio
import logging
import queue
import resource
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field, replace

from ..engine.generate import GenerationConfig
from ..engine.policy import CoreConfig

log = logging.getLogger("coreinfer.server")

API_KEY_ENV = "COREINFER_API_KEY"
GEN_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")
CORE_FIELDS = ("alpha", "beta", "statistic", "ranking", "layers", "mode")  # CoreConfig's, settable per request


@dataclass(frozen=True)
class Settings:
    """How the server behaves. core None: dense by default (requests may still ask for core neurons)."""

    model_id: str | None = None  # None: the checkpoint's name
    api_key: str | None = None  # None: no authentication
    core: CoreConfig | None = field(default_factory=CoreConfig)
    queue_size: int = 64  # jobs waiting behind the running one
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256  # chat requests without max_tokens (OpenAI's completions default is 16)

    def __post_init__(self):
        checks = [
            (self.queue_size >= 1, f"queue size must be >= 1, got {self.queue_size}"),
            (self.request_timeout > 0, f"request timeout must be > 0, got {self.request_timeout}"),
            (self.max_body_bytes >= 1024, f"max body bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.default_max_tokens >= 1, f"default max tokens must be >= 1, got {self.default_max_tokens}"),
            (self.api_key is None or self.api_key.strip() != "", "the API key is empty"),
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

    def cancel(self) -> None:
        self.cancelled.set()

    def push(self, item) -> None:
        """Hand an item to the request's loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


class Worker:
    """The one thread that touches the model. Counters are written only by that thread."""

    def __init__(self, llm, queue_size: int):
        self.llm = llm
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.current: Job | None = None
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
        """Stop the running job, refuse the waiting ones, end the thread."""
        self._stopping.set()
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)  # may wait for room: the thread frees it, refusing jobs as it goes
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self._stopping.is_set():
                job.push(RequestError(503, "the server is shutting down", code="shutting_down"))
            elif job.cancelled.is_set():  # its client left (or timed out) while it waited
                self.cancelled += 1
            else:
                job.queue_s = time.perf_counter() - job.queued_at
                self.current = job
                try:
                    self._run(job)
                finally:
                    self.current = None

    def _run(self, job: Job) -> None:
        try:
            gen = self._fit(job)
            with closing(self.llm.stream(job.prompt, gen, job.core, chat=job.chat)) as events:
                for event in events:
                    if job.cancelled.is_set():
                        self.cancelled += 1
                        return
                    job.push(event)
            self.completed += 1
        except RequestError as e:
            self.failed += 1
            job.push(e)
        except ValueError as e:  # the engine's own checks of a request it was handed
            self.failed += 1
            job.push(RequestError(400, str(e)))
        except Exception:  # a bug: log it here, tell the client no more than that it failed
            self.failed += 1
            log.exception("generation failed")
            job.push(RequestError(500, "internal error while generating", code="internal_error"))

    def _fit(self, job: Job) -> GenerationConfig:
        """Check prompt + max_tokens against the context (tokenizing here keeps the tokenizer on one thread)."""
        n = len(self.llm.encode(job.prompt, job.chat))
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
        return {"status": "ok" if self.alive() else "unavailable", "busy": self.current is not None,
                "queue_depth": self.jobs.qsize(), "queue_size": self.jobs.maxsize,
                "requests_completed": self.completed, "requests_failed": self.failed,
                "requests_cancelled": self.cancelled, "uptime_s": round(time.time() - self.started_at, 1),
                "peak_rss_mb": round(peak_kib / 1024, 1)}


def value_error(e: ValueError, fields: tuple, rename: dict) -> RequestError:
    """The engine's config checks mostly say 'FIELD must ...': blame that field of the request."""
    first = str(e).split(" ", 1)[0]
    return RequestError(400, str(e), param=rename.get(first, first if first in fields else None))


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
        core = replace(default or CoreConfig(), **given)  # keeps the server's cluster set, if any
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
    info.update(queue_s=round(job.queue_s, 4), prefill_s=round(completion.prefill_s, 4),
                decode_s=round(completion.decode_s, 4), prefill_tok_s=round(completion.prefill_tok_s, 1),
                decode_tok_s=round(completion.decode_tok_s, 1))
    return info


def usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}
