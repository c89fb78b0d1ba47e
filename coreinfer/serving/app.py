"""The HTTP side of `coreinfer serve`: OpenAI's request and response shapes on FastAPI.

Every request is checked here (auth, body size, JSON, field types and ranges, core options) before it
reaches the worker; every failure leaves as an OpenAI error object with a fitting status, never as a
traceback. The worker (server.py) owns the model; this side only waits for a job's events, and stops
the job when its client leaves or its deadline passes.
"""

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .jobs import core_info, make_job, usage
from .server import Job, RequestError, Settings, TokenInfo, Worker, log, server_core

POLL_S = 0.25  # how often a waiting request checks whether its client is still there
# OpenAI's fields this server does not do: refused unless empty (n and best_of: unless 1, in make_job);
# modalities ["text"] asks for what it does anyway. Every other OpenAI field is applied (docs/server.md)
UNSUPPORTED = ("echo", "suffix", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "user", "safety_identifier", "audio", "modalities", "prediction", "web_search_options",
               "reasoning_effort", "verbosity", "service_tier", "store", "metadata", "prompt_cache_key")
EMPTY = (None, False, [], "", {})
CHAT_PAGE = Path(__file__).parent / "static" / "index.html"  # the chat page at /: one file, no CDN
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's chat allows 20)


class Strict(BaseModel):
    # strict: no "16" for 16, no true for 1; unknown fields are ignored, as OpenAI clients send many
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None  # {"name": ..., "schema": {...}, "strict": ...}


class Common(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stream: bool = False
    # coreinfer's own options
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    dense: bool | None = None
    mode: str | None = None
    alpha: float | None = None
    beta: float | list[float] | None = None
    statistic: str | None = None
    ranking: str | None = None
    layers: str | list[int] | None = None


class CompletionRequest(Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the N likeliest tokens' log-probabilities


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ClientGone(Exception):
    """The client disconnected; nobody will read a response."""


def parse(model: type[Strict], body: dict) -> Strict:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # a union reports one error per member; the shared start of their locations is the field
        loc = errors[0]["loc"]
        for err in errors[1:]:
            n = next((i for i, (a, b) in enumerate(zip(loc, err["loc"])) if a != b), min(len(loc), len(err["loc"])))
            loc = loc[:n]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        detail = "; ".join(dict.fromkeys(err["msg"] for err in errors))
        raise RequestError(400, f"{param}: {detail}" if param else detail, param=param) from None


def reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length", "")
    too_big = RequestError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():  # chunked bodies carry no length: count as they come
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:  # nobody to answer: one line in the log, no traceback
        log.info("client %s left while sending its request body (%d bytes received)",
                 request.client.host if request.client else "?", len(body))
        raise ClientGone() from None
    try:
        data = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting
        raise RequestError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, "the request body must be a JSON object", code="invalid_json")
    check_unicode(data, "")
    for name in UNSUPPORTED:
        value = data.get(name)
        if value not in EMPTY and not (name == "modalities" and value == ["text"]):
            raise RequestError(400, f"{name} is not supported by this server", param=name)
    return data


def check_unicode(value, param: str) -> None:
    """A lone UTF-16 surrogate (JSON allows the escape "\\ud800") is no Unicode text a tokenizer can
    encode: refuse it, naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(400, f"{param or 'the body'}: the text holds a lone UTF-16 surrogate "
                                    f"(U+{ord(value[e.start]):04X}) at character {e.start}, which is not valid Unicode",
                               param=param or None, code="invalid_unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, param)
            check_unicode(v, f"{param}.{k}".lstrip("."))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{param}[{i}]")


def chat_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


class Reply:
    """OpenAI's response and chunk shapes for one request, text completion or chat. `logprobs`: the
    number of alternatives per token asked for, None when logprobs were not asked for."""

    def __init__(self, chat: bool, model: str, logprobs: int | None = None, include_usage: bool = False):
        self.chat, self.model, self.logprobs, self.include_usage = chat, model, logprobs, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.offset = 0  # completions' text_offset of the next token

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        """OpenAI's logprobs object: chat's {"content": [...]} or completions' parallel lists."""
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [{**chat_logprob(t.text, t.logprob),
                                 "top_logprobs": [chat_logprob(a, lp) for a, lp in t.top]} for t in tokens],
                    "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}

    def full(self, job: Job, c, tokens: list[TokenInfo]) -> dict:
        body = {"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}
        choice = {"index": 0, **body, "logprobs": self._logprobs(tokens), "finish_reason": c.finish_reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage=usage(c),
                              coreinfer=core_info(job, c))

    def chunk(self, text: str, finish: str | None = None, role: bool = False, tokens: list[TokenInfo] = (),
              **extra) -> dict:
        logprobs = self._logprobs(list(tokens)) if tokens else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text} if text or not finish else {}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, c) -> dict:
        """stream_options.include_usage: OpenAI's extra last chunk, usage and no choices."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(c))


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def job_events(request: Request, job: Job, deadline: float) -> AsyncIterator:
    """The job's StreamEvents up to the one with the Completion; the job is stopped on any way out."""
    getter = None  # one pending get is kept across polls: cancelling a get that just won can lose an item
    try:
        while True:
            getter = getter or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            if done:
                item, getter = getter.result(), None
                if isinstance(item, RequestError):
                    raise item
                yield item
                if item.completion is not None:
                    return
            elif time.monotonic() >= deadline:
                raise RequestError(504, "the request timed out", code="timeout")
            elif await request.is_disconnected():
                raise ClientGone()
    finally:
        if getter is not None:
            getter.cancel()
        job.cancel()


class JobStream(StreamingResponse):
    """An SSE response that stops its job however the response ends (done, disconnect, shutdown)."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            await self.body_iterator.aclose()


async def stream_chunks(reply: Reply, job: Job, first, events: AsyncIterator) -> AsyncIterator[str]:
    try:
        if reply.chat:
            yield sse(reply.chunk("", role=True))
        event = first
        while True:
            if event.text:
                yield sse(reply.chunk(event.text, tokens=event.tokens))
            if (c := event.completion) is not None:
                tokens = () if event.text else event.tokens  # tokens whose text was held back, then dropped
                yield sse(reply.chunk("", c.finish_reason, tokens=tokens, coreinfer=core_info(job, c)))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(c))
                break
            event = await anext(events)
    except RequestError as e:  # the status line is gone already: the error travels as an event
        yield sse(e.body())
    except ClientGone:
        return
    finally:
        await events.aclose()
    yield sse("[DONE]")


async def respond(request: Request, job: Job, reply: Reply, stream: bool, deadline: float) -> Response:
    events = job_events(request, job, deadline)
    # wait for the first event before choosing the status, so errors found by the worker keep theirs
    first = await anext(events)
    if stream:
        return JobStream(stream_chunks(reply, job, first, events), job)
    tokens = list(first.tokens)
    async for event in events:
        first = event
        tokens += event.tokens
    return JSONResponse(reply.full(job, first.completion, tokens))


def default_model_id(llm) -> str:
    """The checkpoint's file or folder name without .gguf (the embedded model: SmolLM2-135M-Instruct.Q4_1)."""
    source = llm.runtime.model or str(llm.name).split(" (", 1)[0]  # name may add " (converted to ...)"
    return Path(source).name.removesuffix(".gguf")


def error_response(e: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, lambda _, e: error_response(e))
    app.add_exception_handler(ClientGone, lambda _, e: Response(status_code=499))
    app.add_exception_handler(HTTPException, lambda r, e: error_response(
        RequestError(e.status_code, f"{e.detail}: {r.method} {r.url.path}", code="not_found" if e.status_code == 404
                     else None)))

    def internal(_, e: Exception) -> JSONResponse:
        log.error("unhandled %s: %s", type(e).__name__, e)
        return error_response(RequestError(500, "internal server error", code="internal_error"))
    app.add_exception_handler(Exception, internal)


def create_app(llm, settings: Settings | None = None) -> FastAPI:
    """The app serving `llm`. One app per LLM: its worker is the only thing that may run the model."""
    settings = settings or Settings()
    settings = replace(settings, core=server_core(llm, settings.core))
    model_id = settings.model_id or default_model_id(llm)
    names = {model_id, "coreinfer"}
    worker = Worker(llm, settings.queue_size, settings.max_batch, settings.prefill_tokens)
    key = settings.api_key.encode() if settings.api_key else None
    page = CHAT_PAGE.read_text(encoding="utf-8")  # read now: a missing page fails the start, not a visit

    @asynccontextmanager
    async def lifespan(_):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    async def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is not None and not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)):
            raise RequestError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    def checked_model(name: str) -> None:
        if name not in names:
            raise RequestError(404, f"the model {name!r} does not exist; this server has {model_id!r}",
                               param="model", code="model_not_found")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(worker.started_at), "owned_by": "coreinfer"}

    async def complete(request: Request, model: type[Common], chat: bool) -> Response:
        deadline = time.monotonic() + settings.request_timeout
        req = parse(model, await read_json(request, settings.max_body_bytes))
        checked_model(req.model)
        if chat:
            prompt, default_max = [m.plain() for m in req.messages], settings.default_max_tokens
        else:
            if isinstance(req.prompt, list) and len(req.prompt) != 1:
                raise RequestError(400, "send exactly one prompt per request", param="prompt")
            prompt, default_max = req.prompt if isinstance(req.prompt, str) else req.prompt[0], 16  # OpenAI's
            if not prompt:
                raise RequestError(400, "the prompt is empty", param="prompt")
        if req.stream_options is not None and not req.stream:  # as OpenAI's API answers
            raise RequestError(400, "stream_options is only allowed with stream: true", param="stream_options")
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        job = make_job(llm, settings, req, prompt, chat, default_max)
        worker.submit(job)
        return await respond(request, job, Reply(chat, model_id, job.gen.logprobs, include_usage), req.stream,
                             deadline)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    def model(name: str) -> dict:
        checked_model(name)
        return model_card()

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatRequest, chat=True)

    app = FastAPI(title="coreinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(v1)

    @app.get("/")
    def chat_page() -> HTMLResponse:  # no key needed: the page holds no data, and its requests send the key
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> JSONResponse:
        state = {"model": model_id, **worker.health()}
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    add_error_handlers(app)
    app.state.model_id, app.state.worker = model_id, worker
    return app
