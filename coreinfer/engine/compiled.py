"""The compiled decode step: `torch.compile` of one decode forward, shapes fixed per setting.

Why: a decode step of a small model is ~40 small kernels per layer launched from Python, a third of
the step at int8 (docs/speed.md). Inductor fuses them into a few C++ loops, but only pays when one
graph serves every step: the step sees a [B, 1] token, the whole [B, S] key mask (S a multiple of
the cache block, so it changes only when a request needs a longer cache) and core buffers whose
width is fixed by the keep ratio. One graph then serves every step and every prompt of a setting.

The freezing trap: with inductor's `freezing` the model's parameters and buffers become constants
of the graph (prepacked for the fast int8 GEMM). The compacted core rows change with every prompt,
so they must stay graph *inputs*: they live in `CoreWeights`, plain tensors that are not module
parameters, and reach the graph through `decode_forward`'s `cores` argument; freezing folds only
parameters and buffers. tests/test_compile.py decodes two prompts with different core sets one after
the other and checks every token against eager.

Modes (`inductor_options`): freezing pays where inductor prepacks weights into its own GEMMs (float
weights, PyTorch's int8 kernel), but AOT autograd's cache refuses frozen graphs, so every start spends
~20 s rebuilding the graph. Where the native int8 GEMV (gemv.py) does the matmuls it reads the
weights as stored and freezing buys nothing: there the step compiles without it, with a C++ wrapper
(no Python between kernels), and a later process loads it from inductor's caches in ~7 s
(docs/speed.md). Inductor's on-disk caches live under coreinfer's cache dir.
"""

import os
import sys
import time
from functools import partial

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from . import gemv

MODES = ("default", "cpp-wrapper", "max-autotune")
# Every shape of every CompiledStep in a process is one more compiled entry of `decode_forward`'s code;
# dynamo stops at 8 by default (with fullgraph: an error), which a bench grid or a server's batch
# buckets x cache lengths x keep ratios passes. Entries are only added at a new key (see __call__).
RECOMPILE_LIMIT = 64


def core_ffn(cores, ffn, x: torch.Tensor) -> torch.Tensor:
    """Decode-time FFN: a compacted layer reads its core rows, the others run dense."""
    core = cores.get(ffn.layer_id)
    return ffn(x) if core is None else core(x)


def decode_forward(model, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor:
    """One decode forward -> logits [B, 1, V]; `cores` (CoreWeights) None runs every FFN dense."""
    run = None if cores is None else partial(core_ffn, cores)
    return model(tokens, positions, slots, key_valid, caches, ffn=run)


def batch_bucket(n: int) -> int:
    """The batch size a compiled step runs `n` sequences at: the next power of two. Each batch size is a
    graph of its own (minutes to compile on the CPU), so varying batches share log2(max) graphs, for at
    most twice the rows."""
    return 1 << (n - 1).bit_length()


def inductor_options(mode: str) -> dict:
    """default: fuse the small kernels. cpp-wrapper: also call them from generated C++, not Python.
    max-autotune: also freeze and prepack the model's weights and pick GEMM kernels by timing them (a
    slower first compile, and no AOT autograd cache for later starts)."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
    return {"default": {}, "cpp-wrapper": {"cpp_wrapper": True},
            "max-autotune": {"freezing": True, "max_autotune": True, "cpp_wrapper": True}}[mode]


def default_mode(model) -> str:
    """The mode a model compiles in unless told: default on CUDA (graphs take the launches away;
    autotuning GEMMs costs minutes); on the CPU cpp-wrapper when the native int8 GEMV does the quantized
    matmuls (SmolLM2 int8: 140 tok/s against max-autotune's 108, int4: 127 against 109; warm start 12 s
    against ~25), else max-autotune. int4's up/gate kernel is an opaque op that freezing does not help."""
    if model.embed_tokens.weight.device.type != "cpu":
        return "default"
    return "cpp-wrapper" if model.ffns()[0].quantized and gemv.available() else "max-autotune"


def use_cache_dir(path) -> None:
    """Point inductor's on-disk caches at `path` unless the user chose a place (TORCHINDUCTOR_CACHE_DIR).
    Torch writes its own default into the variable the first time anything asks for the directory (a
    model build does), so that default counts as unset."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    # The cpp-wrapper mode precompiles ATen's headers (~150 MB) into a folder that inductor fixes when
    # codecache is imported, from the system temp dir (default_cache_dir()/precompiled_headers), whatever
    # the variable says. Point it beside the other caches, where `coreinfer cache` lists and clears it.
    # torch 2.13 has no supported setting for that folder (inductor's config has none, and the module
    # reads no variable for it): the alternatives are TMPDIR, which must be set before torch is
    # imported and moves every temporary file of the process, or `cpp_cache_precompile_headers=False`,
    # which drops the headers and makes every first compile slower. So the two private names are set.
    from torch._inductor import codecache

    headers = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "precompiled_headers")
    codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = headers, os.path.join(headers, "locks")


class CompiledStep:
    """`decode_forward` compiled for one model; falls back to eager, with one line, when compiling
    fails (no C++ compiler, an unsupported op, too many shapes) and stays eager from then on.

    Each new shape (batch, cache length, core widths) compiles once; `compile_s` sums the time spent,
    so benchmarks can report it apart from decoding.
    """

    def __init__(self, model, mode: str | None = None, log=None):
        self.model, self.mode = model, mode or default_mode(model)
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.fn = torch.compile(decode_forward, fullgraph=True, dynamic=False, options=inductor_options(self.mode))
        self.failed: str | None = None
        self.seen: set[tuple] = set()
        self.compile_s = 0.0

    def key(self, tokens, key_valid, cores) -> tuple:
        layers = {} if cores is None else cores.layers
        widths = tuple((l, type(c).__name__, tuple(tuple(t.shape) for t in getattr(c, "weights", {}).values()))
                       for l, c in sorted(layers.items()))
        return tuple(tokens.shape), tuple(key_valid.shape), widths

    def __call__(self, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor:
        if self.failed:
            return decode_forward(self.model, tokens, positions, slots, key_valid, caches, cores)
        key = self.key(tokens, key_valid, cores)
        if key in self.seen:
            return self.run(tokens, positions, slots, key_valid, caches, cores)
        B, S = key_valid.shape
        self.log(f"compiling the decode step (batch {B}, cache {S}, {len(key[2])} core layers, {self.mode}): "
                 "up to minutes the first time, seconds once the cache holds it (--no-compile: eager)")
        out = self.build(key, tokens, positions, slots, key_valid, caches, cores)
        return decode_forward(self.model, tokens, positions, slots, key_valid, caches, cores) if out is None else out

    def run(self, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor:
        """The compiled graph of a shape in `seen`."""
        # under the raised limit too: every CompiledStep of a process shares decode_forward's cache
        # entries, so a guard miss here (another model's step ran since) recompiles past dynamo's 8
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return self.fn(self.model, tokens, positions, slots, key_valid, caches, cores)

    def build(self, key, tokens, positions, slots, key_valid, caches, cores=None) -> torch.Tensor | None:
        """Compile the shape `key` (or load it from inductor's caches) by running the step once on these
        inputs -> its logits; None, with one line, when compiling fails (the step is eager from then on)."""
        t, limit = time.perf_counter(), max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit):
                out = self.fn(self.model, tokens, positions, slots, key_valid, caches, cores)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as e:
            self.fail(e)
            return None
        self.compile_s += time.perf_counter() - t
        self.seen.add(key)
        return out

    def fail(self, error: BaseException) -> None:
        self.failed = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        self.log(f"compiling the decode step failed, decoding eager instead: {self.failed}")
