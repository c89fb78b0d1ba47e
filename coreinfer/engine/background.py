"""Decode eager while the compiled decode step builds in the background.

Why: compiling a new shape of the decode step (compiled.py) takes about two minutes on 2 CPU cores the
first time and ~10 s when inductor's on-disk cache holds it; blocking on it, the first token of a new
user's first answer waited that long. `BackgroundStep` runs the steps of a shape eager until a worker
thread has compiled that shape, then runs the compiled graph from the next step on. Eager and compiled
compute the same function, so the tokens are eager's up to the switch and compiled's after it.

The worker compiles by running the compiled step once on inputs of the same shapes that it owns: copies
of the token, positions, slot and key mask, and KV caches of its own (the graph writes the caches; its
logits are thrown away). It reads the model's weights and the session's core rows, never writes them,
and dynamo's frame callback, its fake-tensor mode and inference mode are all per thread, so the decode
thread's eager steps run untouched meanwhile. They do share the GIL and the 2 cores with the compile:
eager steps run slower until the switch (docs/speed.md measures it). The thread is a daemon: a process
that ends first drops an unfinished compile (inductor writes its cache entries whole, when done).
"""

import contextvars
import threading
import time

import torch

from .compiled import CompiledStep, decode_forward


class BackgroundStep:
    """A CompiledStep whose new shapes compile in one worker thread while the caller decodes eager.

    `compile_s` is the time the decoding thread waited for compiles (none: it never waits), as the API's
    and benchmarks' accounting expects; `background_s` the time the worker spent. `eager_steps`,
    `eager_s`, `compiled_steps` and `compiled_s` count the steps of each kind and their time, so a decode
    rate can be reported split at the switch.
    """

    def __init__(self, compiled: CompiledStep):
        self.compiled = compiled
        self.compile_s = 0.0
        self.background_s = 0.0
        self.eager_steps = self.compiled_steps = 0
        self.eager_s = self.compiled_s = 0.0
        self.pending: dict[tuple, threading.Thread] = {}

    @property
    def failed(self) -> str | None:
        return self.compiled.failed

    @property
    def seen(self) -> set[tuple]:
        return self.compiled.seen

    def __call__(self, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor:
        t = time.perf_counter()
        c = self.compiled
        key = None if c.failed else c.key(tokens, key_valid, cores)
        if key is not None and key in c.seen:
            out = c.run(tokens, positions, slots, key_valid, caches, cores)
            self.compiled_steps, self.compiled_s = self.compiled_steps + 1, self.compiled_s + time.perf_counter() - t
            return out
        if key is not None and key not in self.pending:
            self.start(key, tokens, positions, slots, key_valid, caches, cores)
        out = decode_forward(c.model, tokens, positions, slots, key_valid, caches, cores)
        self.eager_steps, self.eager_s = self.eager_steps + 1, self.eager_s + time.perf_counter() - t
        return out

    def start(self, key, tokens, positions, slots, key_valid, caches, cores) -> None:
        """Compile `key` in a worker thread, on copies of the step's inputs."""
        B, S = key_valid.shape
        self.compiled.log(f"compiling the decode step in the background (batch {B}, cache {S}, {len(key[2])} core "
                          f"layers, {self.compiled.mode}): decoding eager until it is ready")
        with torch.inference_mode(caches[0].k.is_inference()):
            own = self.compiled.model.new_caches(B, S)
        inputs = (*(copy(t) for t in (tokens, positions, slots, key_valid)), own, cores)
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        # torch's config patches (inductor's, dynamo's) are context variables, which a new thread starts
        # without: the worker runs in a copy of the caller's context, so it compiles as the caller would
        worker = threading.Thread(target=contextvars.copy_context().run, args=(self.build, key, inputs, modes),
                                  name="coreinfer-compile", daemon=True)
        self.pending[key] = worker
        worker.start()

    def build(self, key, inputs, modes: tuple[bool, bool]) -> None:
        t = time.perf_counter()
        try:
            # grad and inference mode are per thread and part of the graph's guards: the caller's
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                self.compiled.build(key, *inputs)
        except Exception as e:  # noqa: BLE001 - whatever breaks the compile, decoding goes on eager
            self.compiled.fail(e)
        self.background_s += time.perf_counter() - t

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the compiles under way; whether none is left running."""
        for worker in list(self.pending.values()):
            worker.join(timeout)
        return not any(w.is_alive() for w in self.pending.values())


def copy(t: torch.Tensor) -> torch.Tensor:
    """A copy that passes the same guards: dynamo tells inference tensors from others (their dispatch
    keys differ), and the step's inputs are made outside inference mode but stepped inside it."""
    with torch.inference_mode(t.is_inference()):
        return t.clone()
