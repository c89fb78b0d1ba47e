"""Load `coreinfer serve` with N concurrent clients x M requests each, and report one markdown table.

Either point it at a server you started (one row per client count):

    coreinfer serve --port 8011 &
    python benchmarks/load_server.py --url http://127.0.0.1:8011 --clients 1,4,16 --requests 2 --stream

or let it start a fresh server per (checkout, client count), e.g. before and after a change, from a
git worktree of the old commit (`git worktree add /tmp/before 3cc350c`):

    python benchmarks/load_server.py --serve before=/tmp/before --serve after=. --clients 1,4,16 --stream

Each row: aggregate completion tokens/s over the wall time, p50/p95 latency, p50/p95 time to first
token (streaming), the server's peak RSS (from its /health), errors. With several checkouts it also
counts the greedy outputs that differ from the first checkout's. The run is bounded: clients x
requests requests per row, each with its own timeout.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def quicksort(xs):",
           "Explain in one sentence why the sky is blue.", "List three prime numbers:", "Once upon a time"]


def one_request(http: httpx.Client, args, i: int) -> dict:
    """One completion; returns its prompt, text, latency, time to first token (streaming) and tokens."""
    body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0, "stream": args.stream}
    if args.stream:  # usage rides on OpenAI's extra last chunk (servers before it put it on the last one)
        body["stream_options"] = {"include_usage": True}
    prompt = PROMPTS[i % len(PROMPTS)]
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt})
    t0 = time.perf_counter()
    if not args.stream:
        r = http.post(path, json=body)
        r.raise_for_status()
        out = r.json()
        choice = out["choices"][0]
        text = choice["message"]["content"] if args.chat else choice["text"]
        return {"prompt": prompt, "text": text, "latency": time.perf_counter() - t0, "ttft": None,
                "tokens": out["usage"]["completion_tokens"]}
    ttft, tokens, text = None, 0, []
    with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            ttft = ttft or time.perf_counter() - t0
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            text.append((choice.get("delta") or {}).get("content") or "" if args.chat else choice.get("text") or "")
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return {"prompt": prompt, "text": "".join(text), "latency": time.perf_counter() - t0, "ttft": ttft,
            "tokens": tokens}


def client(url: str, args, c: int, results: list, errors: list, lock: threading.Lock) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as http:
        for r in range(args.requests):
            try:
                out = one_request(http, args, c * args.requests + r)
            except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(out)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(url: str, args, clients: int) -> dict:
    """Run `clients` concurrent clients against `url`: their results, errors, wall time and the RSS."""
    results, errors, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for c in range(clients):
            pool.submit(client, url, args, c, results, errors, lock)
    wall = time.perf_counter() - t0
    health = httpx.get(f"{url}/health", timeout=30).json()
    for e in sorted(set(errors))[:5]:
        print(f"error: {e}", file=sys.stderr)
    return {"clients": clients, "results": results, "errors": errors, "wall": wall, "rss": health.get("peak_rss_mb")}


def summary(runs: list[dict]) -> dict:
    """The figures of one table row, over the rounds `runs` of one server and client count."""
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall"] for run in runs)
    row = {"clients": runs[0]["clients"], "ok": len(results), "errors": sum(len(run["errors"]) for run in runs),
           "wall": wall, "rss": max((run["rss"] for run in runs if run["rss"] is not None), default=None),
           "texts": {(r["prompt"], r["text"]) for r in results}}
    if results:
        latency, ttft = [r["latency"] for r in results], [r["ttft"] for r in results if r["ttft"] is not None]
        row.update(tok_s=sum(r["tokens"] for r in results) / wall, p50=pct(latency, 50), p95=pct(latency, 95),
                   ttft50=pct(ttft, 50) if ttft else None, ttft95=pct(ttft, 95) if ttft else None)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkout: str, args, port: int) -> subprocess.Popen:
    """`coreinfer serve` from `checkout` (its package first on the path) on `port`, once /health answers."""
    root = str(Path(checkout).resolve())
    cmd = [sys.executable, "-c", "import sys; from coreinfer.cli.main import main; sys.exit(main())", "serve",
           "--port", str(port), "--threads", str(args.threads), "--log-level", "warning", *args.serve_args]
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server from {root} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server from {root} did not answer within 300 s")


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (ignored with --serve)")
    p.add_argument("--serve", action="append", default=[], metavar="LABEL=CHECKOUT",
                   help="start `coreinfer serve` from this checkout for each client count (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="--threads of the servers --serve starts")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                   help="further `coreinfer serve` flags for --serve (must come last)")
    p.add_argument("--model", default="coreinfer", help="model id (the server also accepts 'coreinfer')")
    p.add_argument("--clients", default="16", help="concurrent clients; a comma list gives one row each")
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole run; servers alternate within each round, a row pools its rounds")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--stream", action="store_true", help="stream, and measure time to first token")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("COREINFER_API_KEY"))
    args = p.parse_args()
    try:
        counts = [int(c) for c in args.clients.split(",")]
        servers = [tuple(s.split("=", 1)) for s in args.serve]
        if any(c < 1 for c in counts) or any(len(s) != 2 for s in servers):
            raise ValueError
    except ValueError:
        p.error("--clients takes positive integers like 1,4,16; --serve takes LABEL=CHECKOUT")

    load_before = os.getloadavg()[0]
    runs: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for clients in counts:  # checkouts alternate per client count: a shared machine's load drifts
            for label, checkout in servers or [("server", None)]:
                proc = None
                if checkout is not None:
                    port = free_port()
                    proc = serve(checkout, args, port)
                url = f"http://127.0.0.1:{port}" if proc else args.url
                try:
                    run = load(url, args, clients)
                finally:
                    if proc is not None:
                        proc.terminate()
                        proc.wait(60)
                runs.setdefault((label, clients), []).append(run)
                r = summary([run])
                print(f"{label} {clients} clients: {fmt(r.get('tok_s'), '.1f')} tok/s, p50 first token "
                      f"{fmt(r.get('ttft50'), '.2f')} s", file=sys.stderr)
    rows = [{"label": label, **summary(rs)} for (label, _), rs in runs.items()]

    rows.sort(key=lambda r: [label for label, _ in servers].index(r["label"]) if servers else 0)
    first = {r["clients"]: r["texts"] for r in rows if r["label"] == rows[0]["label"]}
    print(f"\n{len(counts)} client counts x {args.requests} requests per client x {args.rounds} rounds, "
          f"{args.max_tokens} tokens each, "
          f"temperature 0{', streamed' if args.stream else ''}; servers with --threads {args.threads}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| server | clients | requests ok | errors | aggregate tok/s | p50 latency s | p95 latency s "
          "| p50 first token s | p95 first token s | peak RSS MB | outputs differing from the first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        differ = len(r["texts"] - first.get(r["clients"], r["texts"]))
        print(f"| {r['label']} | {r['clients']} | {r['ok']} | {r['errors']} | {fmt(r.get('tok_s'), '.1f')} "
              f"| {fmt(r.get('p50'), '.2f')} | {fmt(r.get('p95'), '.2f')} | {fmt(r.get('ttft50'), '.2f')} "
              f"| {fmt(r.get('ttft95'), '.2f')} | {r['rss']} | {differ} |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
