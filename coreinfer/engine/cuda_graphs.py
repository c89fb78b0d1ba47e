"""The decode step captured in CUDA graphs: one launch per step instead of hundreds.

Why: batch-1 decode of a small model on a GPU is bound by kernel launches, not bytes (a 135M model's
step reads ~0.3 GB, 0.1 ms at HBM speed, but launches ~600 kernels from Python). A CUDA graph
records the step's kernels once and replays them with one call.

A graph bakes in every address it reads. The step's small inputs (token, positions, slots, key mask)
are copied into the graph's own buffers before each replay; the KV caches and the compacted core
rows are read where they are. Core rows of a new prompt are gathered into the same buffers
(CompactFFN reuses them) and LLM reuses its caches, so one graph serves every prompt of a setting;
when a cache or core buffer moves or changes shape (another batch size or cache length, other core
widths) the step is captured again. Graphs share one memory pool; the oldest is dropped past
`max_graphs`.

`GraphedStep` has the interface of `Session(compiled=...)`: (tokens, positions, slots, key_valid,
caches, cores) -> logits [B, 1, V], with the whole key mask, so shapes are static.
"""

import time
from collections import OrderedDict

import torch


class GraphedStep:
    """Captures `step` (the eager decode forward, `partial(compiled.decode_forward, model)`, or a
    CompiledStep) per set of buffers, then replays. `captures` counts captures, for tests and benchmarks; `compile_s` sums the time they took (the
    bench reports it as CompiledStep's)."""

    def __init__(self, step, max_graphs: int = 4):
        self.step = step
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (graph, static inputs, output)
        self.max_graphs, self.pool, self.captures, self.compile_s = max_graphs, None, 0, 0.0

    @staticmethod
    def key(inputs: list[torch.Tensor], caches, cores) -> tuple:
        """The inputs' shapes and every address the graph reads besides its inputs and the model's weights."""
        held = [t for c in caches for t in (c.k, c.v)]
        if cores is not None:
            held += [t for _, c in sorted(cores.layers.items()) for t in getattr(c, "weights", {}).values()]
        return tuple((tuple(t.shape), t.dtype) for t in inputs), tuple((t.data_ptr(), tuple(t.shape)) for t in held)

    def __call__(self, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor:
        inputs = [tokens, positions, slots, key_valid]
        key = self.key(inputs, caches, cores)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs, caches, cores)
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return out.clone()  # the graph's output buffer is overwritten by the next replay

    def capture(self, inputs, caches, cores) -> tuple:
        """Warm up on a side stream (lazy initialisation and kernel selection must happen outside the
        capture), then record. Both runs write the step's own cache slot with the values the replay
        writes again, so neither changes the decode."""
        t, device = time.perf_counter(), inputs[0].device
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.step(*static, caches, cores)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(*static, caches, cores)
        self.pool = graph.pool()
        self.captures += 1
        self.compile_s += time.perf_counter() - t
        return graph, static, out
