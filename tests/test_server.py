"""The OpenAI-compatible server, driven over loopback HTTP by the official `openai` client and httpx.

One real uvicorn server (in a background thread, on a free 127.0.0.1 port) serves the embedded model
for most tests; the auth, queue and timeout tests start their own short-lived server on the same LLM,
one at a time, while the shared one is idle (one model, one generation at a time).
"""

import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from coreinfer.engine.policy import CoreConfig
from coreinfer.serving.server import Settings
from coreinfer.serving.app import create_app

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
CHATS = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "What is 2+2?"}]]
GREEDY = dict(temperature=0, max_tokens=8)


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free loopback port in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm():
    import torch

    from coreinfer.api import LLM

    # one thread: on a shared 2-core machine, two spin-waiting threads run many times slower
    threads = torch.get_num_threads()
    yield LLM(progress=False, threads=1, weights="dense")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, Settings(queue_size=64, core=CoreConfig()))  # the paper's core sets (the default is dense
    # here: the embedded model's calibrated profile picks rows per token, which the batch does not do)


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


def wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/health").json()
        if not state["busy"] and state["queue_depth"] == 0:
            return state
        assert time.monotonic() < deadline, f"the server stayed busy: {state}"
        time.sleep(0.05)


def test_models_and_health(url, app):
    c = client(url)
    assert [m.id for m in c.models.list().data] == [app.state.model_id]
    assert c.models.retrieve(app.state.model_id).id == app.state.model_id
    state = httpx.get(f"{url}/health").json()
    assert state["status"] == "ok" and state["model"] == app.state.model_id
    assert state["peak_rss_mb"] > 0 and state["queue_size"] == 64


def test_completion_stream_reassembles(url, app):
    c = client(url)
    full = c.completions.create(model=app.state.model_id, prompt=PROMPTS[0], **GREEDY)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    info = full.model_extra["coreinfer"]
    assert not info["dense"] and info["beta"] == CoreConfig().beta
    tokens_after_first = full.usage.completion_tokens - 1  # the first token comes from the prefill
    assert info["decode_tok_s"] == pytest.approx(tokens_after_first / info["decode_s"], rel=0.01, abs=0.1)
    assert all(0 < k < info["ffn_width"] for k in info["core_sizes"].values())

    chunks = list(c.completions.create(model="coreinfer", prompt=PROMPTS[0], stream=True, **GREEDY))
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(ch.usage is None for ch in chunks)  # usage only when stream_options asks for it
    assert chunks[-1].model_extra["coreinfer"]["core_sizes"] == info["core_sizes"]
    with_usage = list(c.completions.create(model="coreinfer", prompt=PROMPTS[0], stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
    # OpenAI's shape: one extra last chunk with the usage and no choices; the others carry no usage
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(ch.usage is None and len(ch.choices) == 1 for ch in with_usage[:-1])
    assert "".join(ch.choices[0].text for ch in with_usage[:-1]) == choice.text


def test_chat_stream_reassembles(url, app):
    c = client(url)
    full = c.chat.completions.create(model=app.state.model_id, messages=CHATS[1], **GREEDY)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(c.chat.completions.create(model=app.state.model_id, messages=CHATS[1], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_core_options_ride_in_the_body(url, app):
    c = client(url)
    dense = c.completions.create(model=app.state.model_id, prompt=PROMPTS[3], extra_body={"dense": True}, **GREEDY)
    assert dense.model_extra["coreinfer"]["dense"] and "core_sizes" not in dense.model_extra["coreinfer"]
    half = c.completions.create(model=app.state.model_id, prompt=PROMPTS[3], **GREEDY,
                                extra_body={"beta": 0.5, "statistic": "norm", "layers": "2-5"})
    info = half.model_extra["coreinfer"]
    assert info["statistic"] == "norm" and sorted(info["core_sizes"]) == ["2", "3", "4", "5"]
    assert all(k == info["ffn_width"] // 2 for k in info["core_sizes"].values())


def test_concurrent_clients_get_their_own_outputs(url, app):
    """16 clients x 3 requests, greedy, decoded in one batch: every output equals what that prompt gets alone."""
    c = client(url)
    jobs = [("text", p) for p in PROMPTS] + [("chat", m) for m in CHATS]

    rows = []  # batch_rows_mean of each non-streamed answer

    def ask(kind, prompt, stream=False):
        if kind == "text":
            out = c.completions.create(model=app.state.model_id, prompt=prompt, stream=stream, **GREEDY)
            if not stream:
                rows.append(out.model_extra["coreinfer"]["batch_rows_mean"])
            return "".join(ch.choices[0].text for ch in out) if stream else out.choices[0].text
        out = c.chat.completions.create(model=app.state.model_id, messages=prompt, stream=stream, **GREEDY)
        if not stream:
            rows.append(out.model_extra["coreinfer"]["batch_rows_mean"])
        return "".join(ch.choices[0].delta.content or "" for ch in out) if stream else out.choices[0].message.content

    alone = [ask(*job) for job in jobs]
    failed_before = httpx.get(f"{url}/health").json()["requests_failed"]

    def session(i):
        picks = [(i + 5 * r) % len(jobs) for r in range(3)]
        return [(j, ask(*jobs[j], stream=(i + r) % 2 == 0)) for r, j in enumerate(picks)]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(session, range(16)) for r in rs]
    assert len(results) == 48
    for j, text in results:
        assert text == alone[j], jobs[j]
    assert max(rows) > 1  # they decoded in one batch, not one after another
    state = wait_idle(url)
    assert state["status"] == "ok" and state["requests_failed"] == failed_before


def test_batch_mixes_dense_core_and_sampling(url, app):
    """Dense, core (two keep ratios) and seeded-sampling requests share the decode batch: each gets what
    it gets alone, and reports how its steps ran (FFN path per layer-step, weight bytes per token)."""
    c = client(url)
    kinds = [{"extra_body": {"dense": True}}, {"extra_body": {"beta": 0.5}}, {},
             {"temperature": 0.8, "top_p": 0.9, "seed": 7}]

    def ask(i):
        kw = {"temperature": 0, **kinds[i % 4]}
        kw["extra_body"] = {"ignore_eos": True, **kw.get("extra_body", {})}
        out = c.completions.create(model=app.state.model_id, prompt=PROMPTS[i % 4], max_tokens=12, **kw)
        return out.choices[0].text, out.model_extra["coreinfer"]

    wait_idle(url)
    alone = [ask(i) for i in range(4)]
    layers = sum(alone[0][1]["ffn_layer_steps"].values()) // 11  # 11 decode steps after the prefill's token
    for text, info in alone:
        assert info["batch_rows_mean"] == 1
        # alone, per-sequence core rows read less than the whole FFN
        paths = {"dense": layers} if info["dense"] else {"compact": len(info["core_sizes"]),
                                                           "dense": layers - len(info["core_sizes"])}
        assert info["ffn_layer_steps"] == {k: 11 * v for k, v in paths.items()}
        want = 1.0 if info["dense"] else info["weight_bytes_fraction"]
        assert info["bytes_per_token_fraction"] == pytest.approx(want, abs=1e-3)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert [text for text, _ in together] == [alone[i % 4][0] for i in range(8)]
    shared = [info for _, info in together if info["batch_rows_mean"] > 1]
    assert shared, "no request shared the batch"
    # several sequences: the dense FFN with per-row masks reads less than each one's core rows
    assert all("masked" in info["ffn_layer_steps"] for info in shared if not info["dense"])
    assert all(info["bytes_per_token_fraction"] < 1 for info in shared)
    state = wait_idle(url)
    assert state["batch_rows"] == 0 and state["max_batch"] == Settings.max_batch


def post(url, body, path="/v1/completions", headers=None):
    data = json.dumps(body) if isinstance(body, dict) else body
    return httpx.post(f"{url}{path}", content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=60)


def ok(**extra):
    return {"model": "coreinfer", "prompt": "Hello", "max_tokens": 2, **extra}


BAD = [  # body, status, param (None: not checked), code
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (b'{"model": "coreinfer", "prompt": "Hi", "temperature": NaN}', 400, None, "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ({"prompt": "Hello"}, 400, "model", None),
    (ok(model="gpt-4"), 404, "model", "model_not_found"),
    ({"model": "coreinfer"}, 400, "prompt", None),
    (ok(prompt=42), 400, "prompt", None),
    (ok(prompt=""), 400, "prompt", None),
    (ok(prompt=["a", "b"]), 400, "prompt", None),
    (ok(max_tokens="16"), 400, "max_tokens", None),
    (ok(max_tokens=0), 400, "max_tokens", None),
    (ok(max_tokens=10 ** 9), 400, "max_tokens", None),
    (ok(max_tokens=True), 400, "max_tokens", None),
    (ok(temperature=-1), 400, "temperature", None),
    (ok(temperature=3.5), 400, "temperature", None),
    (ok(top_p=0), 400, "top_p", None),
    (ok(top_p="high"), 400, "top_p", None),
    (ok(n=2), 400, "n", None),
    (ok(seed=2 ** 80), 400, "seed", None),
    (ok(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (ok(stop=[1]), 400, "stop", None),
    (ok(stream="yes"), 400, "stream", None),
    (ok(beta=1.5), 400, "beta", None),
    (ok(statistic="median"), 400, "statistic", None),
    (ok(layers="99"), 400, "layers", None),
    (ok(mode="similarity"), 400, "mode", None),
    (ok(dense=True, beta=0.5), 400, "beta", None),
    (ok(logprobs=21), 400, "logprobs", None),
    (ok(logprobs=True), 400, "logprobs", None),
    (ok(best_of=2), 400, "best_of", None),
    (ok(tool_choice="auto"), 400, "tool_choice", None),
    (ok(user="user-1234"), 400, "user", None),
    (ok(echo=True), 400, "echo", None),
    (ok(audio={"voice": "alloy", "format": "wav"}), 400, "audio", None),
    (ok(modalities=["text", "audio"]), 400, "modalities", None),
    (ok(store=True), 400, "store", None),
    (ok(presence_penalty=2.5), 400, "presence_penalty", None),
    (ok(frequency_penalty="high"), 400, "frequency_penalty", None),
    (ok(logit_bias={"Paris": -100}), 400, "logit_bias", None),
    (ok(logit_bias={"99999999": -100}), 400, "logit_bias", None),
    (ok(logit_bias={"42": -101}), 400, "logit_bias", None),
    (ok(stream_options={"include_usage": True}), 400, "stream_options", None),
    (ok(response_format={"type": "xml"}), 400, "response_format.type", None),
    (ok(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format", None),
    (ok(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}), 400,
     "response_format", None),
    (b'{"model": "coreinfer", "prompt": "caf\\u00e9 \\ud800!", "max_tokens": 2}', 400, "prompt", "invalid_unicode"),
    (ok(prompt="word " * 9000), 400, "prompt", "context_length_exceeded"),
    (ok(max_tokens=8190, prompt="word " * 10), 400, "max_tokens", "context_length_exceeded"),
]
BAD_CHAT = [
    ({"model": "coreinfer", "messages": []}, 400, "messages", None),
    ({"model": "coreinfer", "messages": "hi"}, 400, "messages", None),
    ({"model": "coreinfer", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": "coreinfer", "messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ({"model": "coreinfer", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", None),
    (b'{"model": "coreinfer", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages[0].content",
     "invalid_unicode"),
    ({"model": "coreinfer", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ({"model": "coreinfer", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", None),
]


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize("body,status,param,code", BAD)
def test_bad_completion_requests(url, body, status, param, code):
    assert_error(post(url, body), status, param, code)


@pytest.mark.parametrize("body,status,param,code", BAD_CHAT)
def test_bad_chat_requests(url, body, status, param, code):
    assert_error(post(url, body, "/v1/chat/completions"), status, param, code)


def test_hostile_transport_and_then_still_serving(url):
    big = json.dumps(ok(prompt="x" * (2 << 20))).encode()
    assert_error(post(url, big), 413, code="request_too_large")
    chunked = post(url, iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))  # no Content-Length
    assert_error(chunked, 413, code="request_too_large")
    assert_error(httpx.get(f"{url}/v1/nowhere"), 404)
    assert_error(httpx.get(f"{url}/v1/completions"), 405)
    r = post(url, ok())
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_api_key(llm, url):
    wait_idle(url)  # the shared server must be idle: both servers run the same model
    with running(create_app(llm, Settings(api_key="s3cret"))) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert_error(httpx.get(f"{base}/v1/models"), 401, code="invalid_api_key")
        assert_error(post(base, ok(), headers={"Authorization": "Basic s3cret"}), 401, code="invalid_api_key")
        out = client(base, "s3cret").completions.create(model="coreinfer", prompt="Hi", max_tokens=2)
        assert out.choices[0].text
        assert httpx.get(f"{base}/health").status_code == 200  # liveness probes need no key


def test_full_queue_disconnect_and_timeout(llm, url):
    """With one batch row: one request runs, one waits, the next is refused; a client that leaves
    frees its row; a request past its deadline gets 504 and is stopped."""
    wait_idle(url)
    long = ok(max_tokens=2000, ignore_eos=True, temperature=0, stream=True)
    with running(create_app(llm, Settings(queue_size=1, max_batch=1, request_timeout=20))) as base:
        with httpx.Client(timeout=60) as h, h.stream("POST", f"{base}/v1/completions", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")  # it is generating now
            waiting = concurrent.futures.ThreadPoolExecutor(1).submit(post, base, ok(max_tokens=4))
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/health").json()["queue_depth"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = post(base, ok())
            assert_error(refused, 503, code="queue_full")
            assert refused.headers["retry-after"] == "1"
        # the streaming client left: the worker must stop its 2000 tokens and serve the waiting request
        assert waiting.result(timeout=60).status_code == 200
        state = wait_idle(base, timeout=20)
        assert state["requests_cancelled"] == 1
    with running(create_app(llm, Settings(request_timeout=2.0))) as base:  # a 2-token request fits, 2000 do not
        t0 = time.monotonic()
        assert_error(post(base, ok(max_tokens=2000, ignore_eos=True)), 504, code="timeout")
        assert time.monotonic() - t0 < 10
        assert wait_idle(base, timeout=20)["requests_cancelled"] == 1
        assert post(base, ok()).status_code == 200


def test_core_options_over_server_defaults():
    """Request options lay over the server's core settings; a dense server turns sparse when asked."""
    from types import SimpleNamespace

    from coreinfer.engine.policy import CoreConfig
    from coreinfer.serving.jobs import core_for
    from coreinfer.serving.server import RequestError

    def req(**kw):
        return SimpleNamespace(**{k: None for k in ("dense", "alpha", "beta", "statistic", "ranking", "layers",
                                                    "mode")} | kw)

    assert core_for(None, req(), 30) is None
    assert core_for(None, req(beta=0.5), 30) == CoreConfig(beta=0.5)
    assert core_for(CoreConfig(beta=0.6, statistic="norm"), req(alpha=0.3), 30) == \
        CoreConfig(alpha=0.3, beta=0.6, statistic="norm")
    assert core_for(CoreConfig(), req(dense=True), 30) is None
    with pytest.raises(RequestError) as e:
        core_for(CoreConfig(), req(beta=[0.5, 0.6]), 30)  # two betas for the default 25 sparse layers
    assert e.value.status == 400 and "keep ratios" in e.value.message
    with pytest.raises(ValueError, match="continuously"):  # the batch decodes plain core sets
        Settings(core=CoreConfig(refine=0.3))
