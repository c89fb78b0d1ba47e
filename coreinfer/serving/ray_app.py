"""Scale-out: coreinfer replicas behind Ray Serve (the `ray` extra), started by Ray's own command:

    serve run coreinfer.serving.ray_app:app replicas=2 beta=0.7 model=path/to/model.gguf

Each replica is a Ray actor that loads its own copy of the model and serves the same FastAPI app as
`coreinfer serve` (create_app: the OpenAI routes, the chat page, /health); Ray's proxy spreads requests
over the replicas, routes around a dead one and restarts it. Arguments after the import path are
`coreinfer serve`'s flags without their dashes, parsed by that command's own parser (`queue_size=8`,
`beta=0.6`; a switch takes true or false: `dense=true`), plus Ray's per-deployment knobs in
RAY_OPTIONS. The API key comes from $COREINFER_API_KEY, as for `coreinfer serve`.
"""

from dataclasses import fields

from ray import serve

from ..cli.args import Parser, core_config, runtime_kwargs
from .cli import add_parser
from .server import Settings

# Ray's knobs as (type, default): replicas; requests one replica holds at a time, more wait in Ray's
# queue (None: the server's max_batch, so that a replica's decode batch can fill); requests that may
# wait in Ray's queue (-1: no bound; more get HTTP 503); CPUs Ray reserves per replica
RAY_OPTIONS = {"replicas": (int, 1), "max_ongoing_requests": (int, None), "max_queued_requests": (int, 64),
               "num_cpus": (float, 1.0)}
RAYS_OWN = ("host", "port", "log_level")  # set on Ray's side: its proxy listens, its logging config logs


class ArgsError(Parser):
    """`coreinfer serve`'s parser, failing with an exception instead of exiting the Ray process."""

    def error(self, message):
        raise ValueError(f"coreinfer.serving.ray_app: {message}")


@serve.ingress()
class Replica:
    """One model copy and the app serving it; the app is built once the model is loaded."""

    def __init__(self, runtime: dict, settings: Settings):
        from ..api import LLM

        self.llm = LLM(**runtime, progress=False)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from .app import create_app

        app = create_app(self.llm, self.settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        self.worker = app.state.worker
        return app

    def check_health(self) -> None:
        """Ray calls this every 10 s; raising makes it replace the replica (its worker thread died)."""
        if not self.worker.alive():
            raise RuntimeError("the coreinfer worker thread is not running")


class ReplicaHeader:
    """ASGI middleware: every HTTP response says which replica answered (X-Coreinfer-Replica), for logs and
    load tests. Plain ASGI, so streams and disconnect checks pass through untouched."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (b"x-coreinfer-replica", replica.encode())

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)
        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


def parse_args(args: dict[str, str]) -> tuple[dict, Settings, dict]:
    """`key=value` arguments as (LLM keyword arguments, server Settings, Ray options)."""
    ray, flags = {name: default for name, (_, default) in RAY_OPTIONS.items()}, {}
    for key, value in args.items():
        name = key.replace("-", "_")
        if name in RAY_OPTIONS:
            try:
                ray[name] = RAY_OPTIONS[name][0](value)
            except ValueError:
                raise ValueError(f"coreinfer.serving.ray_app: {key} takes a number, got {value!r}") from None
        elif name in RAYS_OWN:
            raise ValueError(f"coreinfer.serving.ray_app: {key} is set on Ray's side (`serve start --http-host "
                             f"--http-port` before `serve run`; Ray's logging config)")
        else:
            flags[name] = value
    parser = ArgsError(prog="serve run coreinfer.serving.ray_app:app")
    add_parser(parser.add_subparsers())
    defaults = parser.parse_args(["serve"])
    argv = ["serve"]
    for name, value in flags.items():
        if isinstance(getattr(defaults, name, None), bool):  # a switch: key=true or key=false
            if value.lower() not in ("true", "false"):
                raise ValueError(f"coreinfer.serving.ray_app: {name} takes true or false, got {value!r}")
            argv += [f"--{name.replace('_', '-')}"] if value.lower() == "true" else []
        else:
            argv += [f"--{name.replace('_', '-')}", value]
    ns = parser.parse_args(argv)
    settings = Settings(core=core_config(ns), **{f.name: getattr(ns, f.name) for f in fields(Settings)
                                                 if f.name != "core" and hasattr(ns, f.name)})
    if ray["max_ongoing_requests"] is None:
        ray["max_ongoing_requests"] = settings.max_batch
    if ray["replicas"] < 1 or ray["max_ongoing_requests"] < 1 or ray["num_cpus"] < 0:
        raise ValueError("coreinfer.serving.ray_app: replicas and max_ongoing_requests must be >= 1, num_cpus >= 0")
    return runtime_kwargs(ns), settings, ray


def build(args: dict[str, str]) -> serve.Application:
    """The Ray Serve application for `serve run ... key=value` arguments."""
    runtime, settings, ray = parse_args(args)
    deployment = serve.deployment(Replica, name="coreinfer", num_replicas=ray["replicas"],
                                  max_ongoing_requests=ray["max_ongoing_requests"],
                                  max_queued_requests=ray["max_queued_requests"],
                                  ray_actor_options={"num_cpus": ray["num_cpus"]})
    return deployment.bind(runtime, settings)


app = build  # `serve run coreinfer.serving.ray_app:app`: Ray calls a builder with the key=value arguments
