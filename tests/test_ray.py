"""Scale-out on Ray Serve (the `ray` extra): a local Ray instance on loopback, two replicas of the tiny
random model, each holding at most one request (max_ongoing_requests=1) with two more waiting in Ray's
queue; driven by the official `openai` client and httpx. One module-scoped instance: Ray takes tens of
seconds to start on a small machine, so the tests share it and stay few.
"""

import concurrent.futures
import json
import shutil
import socket
import time

import httpx
import openai
import pytest

try:
    import ray
    from ray import serve

    from coreinfer.serving.ray_app import build, parse_args
except ImportError:  # need_ray skips each test: a test skip, which fails under CI (a module skip would not)
    ray = None

REPLICAS, ONGOING, QUEUED = 2, 1, 2
CHAT = [{"role": "user", "content": "The capital of France is"}]


def long(tokens: int) -> dict:
    return {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module", autouse=True)
def need_ray():  # autouse: set up before the module's other fixtures
    if ray is None:
        pytest.skip("ray is missing: pip install -e '.[ray]'")


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 4096-token context (rotary embeddings have no length of their own), so a
    stream lasts long enough to kill its replica in the middle of it on a fast machine too."""
    folder = tmp_path_factory.mktemp("tiny-llama-long") / "tiny-llama"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return folder


@pytest.fixture(scope="module")
def base(long_model_dir):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no network here, and none wanted
        t0 = time.monotonic()
        # address="local": a new instance of our own, even where a Ray cluster already runs on the machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build({"model": str(long_model_dir), "threads": "1", "replicas": str(REPLICAS),
                             "max_ongoing_requests": str(ONGOING), "max_queued_requests": str(QUEUED),
                             "num_cpus": "0.5", "queue_size": "4"}), name="coreinfer", route_prefix="/")
            print(f"Ray and {REPLICAS} replicas up in {time.monotonic() - t0:.1f} s")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def chat(base: str, **extra) -> httpx.Response:
    body = {"model": "coreinfer", "messages": CHAT, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def replica_actors() -> dict[str, str]:
    """Replica id -> the name of its Ray actor (SERVE_REPLICA::app#deployment#id)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1]: n for n in names if n.startswith("SERVE_REPLICA::coreinfer#")}


def how_it_ends(lines) -> str:
    """'cut' (the connection broke), 'ended' (closed without [DONE]) or 'done'."""
    try:
        rest = [line for line in lines if line]
    except httpx.HTTPError:
        return "cut"
    return "done" if rest[-1:] == ["data: [DONE]"] else "ended"


def test_args_map_onto_serve_flags():
    runtime, settings, options = parse_args({"beta": "0.6", "queue-size": "8", "replicas": "3", "weights": "int8"})
    assert runtime["weights"] == "int8" and settings.core.beta == 0.6 and settings.queue_size == 8
    assert options["replicas"] == 3 and options["max_ongoing_requests"] == settings.max_batch  # its batch can fill
    assert parse_args({"max_batch": "4"})[2]["max_ongoing_requests"] == 4
    assert parse_args({"dense": "true"})[1].core is None
    for bad, says in [({"replicas": "two"}, "replicas takes a number"), ({"nope": "1"}, "unrecognized"),
                      ({"dense": "yes"}, "dense takes true or false"), ({"port": "80"}, "Ray's side")]:
        with pytest.raises(ValueError, match=says):
            parse_args(bad)


def test_openai_client_on_two_replicas(base):
    c = client(base)
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    full = c.chat.completions.create(model="coreinfer", messages=CHAT, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert text and full.model_extra["coreinfer"]["decode_tok_s"] >= 0
    streamed = c.chat.completions.create(model="coreinfer", messages=CHAT, max_tokens=8, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == text
    # both replicas answer, with the same text: each holds its own copy of the same model
    replicas = {}
    for _ in range(12):
        r = chat(base)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
        replicas[r.headers["x-coreinfer-replica"]] = True
        if len(replicas) == REPLICAS:
            break
    assert set(replicas) == set(replica_actors()), "the requests did not reach both replicas"
    assert httpx.get(f"{base}/").text.startswith("<!doctype html>")


def test_requests_are_bounded(base):
    """2 replicas x 1 ongoing + 2 queued: of 8 concurrent long requests, the overflow gets 503 at once."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: chat(base, **long(400)), range(8)))
    codes = sorted(r.status_code for r in replies)
    print(f"8 concurrent requests: {codes}; a refusal says {next(r.text for r in replies if r.status_code != 200)!r}")
    # Ray counts a request as queued until a replica takes it, so fewer than replicas x ongoing + queued may pass
    assert set(codes) == {200, 503} and codes.count(200) >= REPLICAS * ONGOING


def test_killed_replica_mid_load(base):
    """Kill the replica serving an open stream: its stream breaks, the other replica keeps answering
    the load meanwhile, and requests keep succeeding after the kill."""
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{base}/v1/chat/completions", json={
            "model": "coreinfer", "messages": CHAT, "stream": True, **long(3000)}) as victim:
        assert victim.status_code == 200
        doomed = victim.headers["x-coreinfer-replica"]
        lines = victim.iter_lines()
        assert next(lines).startswith("data: ")  # generating now
        load = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: [chat(base) for _ in range(6)])
        ray.kill(ray.get_actor(replica_actors()[doomed], namespace="serve"), no_restart=True)
        ending = how_it_ends(lines)
        during = load.result(timeout=120)
    assert ending != "done", "the killed replica's stream finished"
    ok = [r for r in during if r.status_code == 200]
    assert len(ok) >= len(during) - 1 and {r.headers["x-coreinfer-replica"] for r in ok} - {doomed}
    after = [chat(base) for _ in range(4)]
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    assert doomed not in {r.headers["x-coreinfer-replica"] for r in after}
    print(f"kill: the stream was {ending}; {len(ok)}/{len(during)} answered during, 4/4 after; "
          f"{time.monotonic() - t0:.1f} s")
