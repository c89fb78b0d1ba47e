"""`coreinfer serve`: the command. The engine side is server.py, the HTTP side app.py (imported only
when the server starts, so the rest of the CLI works without the `serve` extra)."""

import logging
import os
import signal
import socket
import sys

from ..cli.args import add_core_args, add_runtime_args, core_config, runtime_kwargs
from .server import API_KEY_ENV, Settings


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset: no auth)")
    g.add_argument("--model-id", default=None, help="the model's name in the API (default: the checkpoint's)")
    g.add_argument("--queue-size", type=int, default=Settings.queue_size,
                   help="requests that may wait for a row of the decode batch; more get HTTP 503")
    g.add_argument("--max-batch", type=int, default=Settings.max_batch,
                   help="requests decoding together (continuous batching: they join and leave between steps)")
    g.add_argument("--request-timeout", type=float, default=Settings.request_timeout,
                   help="seconds a request may take, waiting included; then HTTP 504 and it is stopped")
    g.add_argument("--max-body-bytes", type=int, default=Settings.max_body_bytes, help="larger bodies get HTTP 413")
    g.add_argument("--default-max-tokens", type=int, default=Settings.default_max_tokens,
                   help="max_tokens of chat requests that give none")
    g.add_argument("--prefill-tokens", type=int, default=Settings.prefill_tokens,
                   help="padded prompt tokens of waiting requests prefilled together before the next decode step")
    g.add_argument("--drain-timeout", type=float, default=Settings.drain_timeout,
                   help="on SIGTERM: seconds running requests get to finish; then each ends with an error")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_runtime_args(p), add_core_args(p)
    p.set_defaults(func=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, before the model loads: a port in use fails at once, in one line."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(info[4])
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(app, sock: socket.socket, log_level: str, drain_timeout: float) -> None:
    """Run uvicorn on `sock`. SIGTERM drains: the worker stops taking requests and gives the running
    ones `drain_timeout` seconds, then ends them with an error event; uvicorn waits for their streams."""
    import uvicorn

    worker = app.state.worker

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.drain(drain_timeout if sig == signal.SIGTERM else 0.0)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5)
    # uvicorn raises the signal again once it has shut down; a drained SIGTERM is an orderly exit (status 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        DrainingServer(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_serve(args) -> None:
    from ..api import LLM
    from .app import create_app

    settings = Settings(model_id=args.model_id, api_key=args.api_key, core=core_config(args),
                        queue_size=args.queue_size, max_batch=args.max_batch, request_timeout=args.request_timeout,
                        max_body_bytes=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
                        drain_timeout=args.drain_timeout, prefill_tokens=args.prefill_tokens)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"coreinfer: warning: listening on {args.host} without an API key", file=sys.stderr)
    sock = bind(args.host, args.port)
    with sock:
        logging.basicConfig(level=args.log_level.upper())
        app = create_app(LLM(**runtime_kwargs(args)), settings)
        print(f"coreinfer: serving {app.state.model_id} on http://{args.host}:{sock.getsockname()[1]}/v1 "
              f"(chat page: http://{args.host}:{sock.getsockname()[1]}/)", file=sys.stderr)
        serve(app, sock, args.log_level, settings.drain_timeout)
