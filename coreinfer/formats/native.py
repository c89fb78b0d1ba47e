"""The native ops of the weight-format contract, looked up by name, or None where they are not built.

The kernels live in `coreinfer/kernels/` (one module per format, each with a `load()` that builds and
registers its ops as `torch.ops.coreinfer.<name>` and says whether they run on this CPU); every caller
here keeps a PyTorch reference for when an op is missing.
"""

import importlib

import torch

KERNEL_MODULES = {"q8_0_gemv": "q8_0", "q4_gemv": "q4", "q8_0_rows": "rows", "q4_rows": "rows",
                  "int8_rows": "rows"}
SOURCES = ("q8_0_gemv.cpp", "q4_gemv.cpp", "neuron_rows.cpp")  # the kernel modules' sources, built together


# name -> the op or None, filled on first ask; like torch.ops itself, a registry of what this process
# loaded. A plain dict (not functools.cache) so that a compiled decode step traces `op` as a lookup:
# dynamo refuses to trace into a cache wrapper, and the step then stayed eager on block formats.
_LOADED: dict[str, object] = {}


def op(name: str):
    """torch.ops.coreinfer.<name> if its kernels module (coreinfer.kernels.<module>) builds it and says it
    runs on this CPU, else None. Imported here, when first asked, not at import time: the kernels'
    builder reads the cache folder from io.loading, which imports the formats. The eager prefill asks
    first, so a compiled step finds the answer in the registry. The first ask builds all of the contract's
    sources at once (kernels/build.py: build_all), not one per format as each is first used."""
    if not _LOADED:
        from ..kernels import build

        build.build_all(SOURCES, "block formats take their PyTorch references")
    if name not in _LOADED:
        _LOADED[name] = _load(name)
    return _LOADED[name]


def _load(name: str):
    try:
        kernels = importlib.import_module(f"coreinfer.kernels.{KERNEL_MODULES[name]}")
    except ImportError:
        return None
    return getattr(torch.ops.coreinfer, name) if kernels.load() else None


MAX_ROWS = 16  # rows of x one native call takes (the rows ops' accumulator tiles are sized for 16)


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a native op may take these: CPU tensors, x [M, K] with M >= 1 (any M: `by_chunks`), contiguous."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] >= 1
            and all(w.device.type == "cpu" and w.is_contiguous() for w in weights))


def by_chunks(op, x: torch.Tensor, *args) -> torch.Tensor:
    """op(x, *args) for x [M, K] of any M, MAX_ROWS rows of x a call, the results stacked -> [M, N]. The same
    as one call would give, bit for bit: each op quantizes x row by row and sums each output element in
    an order set by K, N and the thread count, never by M. So a prefill (M = prompt length) takes the
    decode kernels too, instead of dequantizing a whole matrix to floats per call (a 0.27 GB transient
    for a Qwen2.5-7B up projection, and ~7x slower, docs/speed.md)."""
    if x.shape[0] <= MAX_ROWS:
        return op(x, *args)
    return torch.cat([op(x[i:i + MAX_ROWS], *args) for i in range(0, x.shape[0], MAX_ROWS)])  # [M, N]
