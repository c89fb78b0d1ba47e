"""Load a running `coreinfer serve` with N concurrent clients x M requests each, and report.

Starts nothing itself: point it at a server you started, e.g.

    coreinfer serve --port 8011 &
    python benchmarks/load_server.py --url http://127.0.0.1:8011 --clients 16 --requests 4

Prints clients, requests, errors, p50/p95 latency (and time to first token when streaming), aggregate
completion tokens/s over the wall time, and the server's peak RSS from its /health. The run is bounded:
clients x requests requests, each with its own timeout.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def quicksort(xs):",
           "Explain in one sentence why the sky is blue.", "List three prime numbers:", "Once upon a time"]


def one_request(http: httpx.Client, args, i: int) -> dict:
    """One completion; returns its latency, time to first token (streaming) and completion tokens."""
    body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": 0, "stream": args.stream}
    prompt = PROMPTS[i % len(PROMPTS)]
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if args.chat else {"prompt": prompt})
    t0 = time.perf_counter()
    if not args.stream:
        r = http.post(path, json=body)
        r.raise_for_status()
        return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": r.json()["usage"]["completion_tokens"]}
    ttft, tokens = None, 0
    with http.stream("POST", path, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            ttft = ttft or time.perf_counter() - t0
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


def client(args, c: int, results: list, errors: list, lock: threading.Lock) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as http:
        for r in range(args.requests):
            try:
                out = one_request(http, args, c * args.requests + r)
            except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(out)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="coreinfer", help="model id (the server also accepts 'coreinfer')")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--stream", action="store_true", help="stream, and measure time to first token")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=os.environ.get("COREINFER_API_KEY"))
    args = p.parse_args()

    results, errors, lock = [], [], threading.Lock()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for c in range(args.clients):
            pool.submit(client, args, c, results, errors, lock)
    wall = time.perf_counter() - t0
    health = httpx.get(f"{args.url}/health", timeout=30).json()

    print(f"clients            {args.clients}")
    print(f"requests           {len(results)} ok, {len(errors)} failed (of {args.clients * args.requests})")
    if results:
        latency = [r["latency"] for r in results]
        tokens = sum(r["tokens"] for r in results)
        print(f"latency p50 / p95  {pct(latency, 50):.2f} s / {pct(latency, 95):.2f} s")
        if args.stream:
            ttft = [r["ttft"] for r in results if r["ttft"] is not None]
            print(f"first token p50/95 {pct(ttft, 50):.2f} s / {pct(ttft, 95):.2f} s")
        print(f"completion tokens  {tokens} in {wall:.1f} s = {tokens / wall:.1f} tok/s aggregate")
    print(f"server peak RSS    {health.get('peak_rss_mb')} MB (status {health.get('status')})")
    for e in sorted(set(errors))[:5]:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
