"""`coreinfer serve` as a process: a port in use fails before anything is announced, a client that
leaves mid-body costs one log line, and SIGTERM drains: the short stream finishes, the long one ends
with an error event and [DONE], and the process exits 0."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

SERVE = [sys.executable, "-m", "coreinfer.cli.main", "serve", "--threads", "1", "--dense"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_fails_before_announcing(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([*SERVE, "--model", str(tiny_model_dir), "--port", str(port)], capture_output=True,
                             text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [f"coreinfer: error: cannot listen on 127.0.0.1:{port}: "
                                               "Address already in use"]


def stream(port: int, body: dict, lines: list, started: threading.Event) -> None:
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
                started.set()


def test_disconnect_mid_body_and_sigterm_drain():
    port = free_port()
    proc = subprocess.Popen([*SERVE, "--port", str(port), "--drain-timeout", "6", "--log-level", "info"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port)) as s:  # promises 500 bytes, sends 20, leaves
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 500\r\n\r\n" + b'{"model": "coreinfer"')
            time.sleep(0.5)
        time.sleep(0.5)
        runs = {}
        for name, tokens in (("long", 4000), ("short", 6)):
            body = {"model": "coreinfer", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            lines, started = [], threading.Event()
            thread = threading.Thread(target=stream, args=(port, body, lines, started))
            thread.start()
            assert started.wait(120)
            runs[name] = (thread, lines)
        proc.send_signal(signal.SIGTERM)
        for thread, _ in runs.values():
            thread.join(60)
        code = proc.wait(60)
    finally:
        proc.kill()
    log = proc.stderr.read()
    assert code == 0, log
    short, long = runs["short"][1], runs["long"][1]
    assert short[-1] == "data: [DONE]" and "error" not in short[-2]  # it finished within the drain
    assert json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "data: [DONE]"
    assert json.loads(long[-2][6:])["error"]["code"] == "shutting_down"
    assert "Traceback" not in log, log
    assert sum("left while sending its request body" in line for line in log.splitlines()) == 1, log
