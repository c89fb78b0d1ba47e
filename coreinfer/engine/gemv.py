"""The int8 x int8 GEMV: decode's int8 matmuls on an AVX512-VNNI CPU, as a PyTorch operator.

Decode's int8 matmuls are GEMVs: PyTorch's `_weight_int8pack_mm` converts every weight to float in its
inner loop. `int8_gemv` quantizes the activation row to int8 too (per block of 32, as llama.cpp's Q8_0)
and multiplies int8 by int8 with AVX512-VNNI: about 2x faster at SmolLM2's shapes on 2 Xeon cores
(benchmarks/int8_gemv.py). It is a PyTorch operator (coreinfer/kernels/int8_gemv.cpp, C++ against torch's
headers, built once in about 10 s by kernels/build.py): the compiled step could reach a ctypes function
only through a Python operator, about 20 us a call (150 calls a token), while inductor's C++ wrapper
calls a C++ operator in about 3 us. No C++
compiler or no VNNI: `available()` is False and int8_matmul keeps PyTorch's kernel.
"""

from functools import cache
from pathlib import Path

import torch

from ..kernels import build as builder

# The GEMV takes up to this many rows of x: decode, one row a sequence. It beats PyTorch's int8 kernel
# at every M measured (1.5-2x up to 64, benchmarks/int8_gemv.py --m), but prefill (a prompt's rows)
# keeps bf16 activations, so that prompts and teacher-forced scoring read what they read before.
MAX_M = 16
K_ALIGN, N_ALIGN = 16, 4
FALLBACK = "int8 decoding takes PyTorch's kernel"


def build(folder: Path) -> Path | None:
    """The operator's library in `folder` (kernels/int8_gemv.cpp, built there once); None, with one line on
    stderr, where that fails."""
    return builder.build("int8_gemv.cpp", folder, FALLBACK)


@cache
def load() -> bool:
    """Whether torch.ops.coreinfer.int8_gemv runs here: built (about 10 s, once per machine and torch
    version, into the cache folder), loaded, and this CPU has AVX512-VNNI."""
    if not builder.load_operators("int8_gemv.cpp", FALLBACK):
        return False
    torch.library.register_fake("coreinfer::int8_gemv")(
        lambda x, q, scale: x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32))
    return torch.ops.coreinfer.int8_gemv_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def available() -> bool:
    return load()


def fits(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether torch.ops.coreinfer.int8_gemv takes x [M, K] @ q [N, K].T: CPU, few rows, aligned widths,
    coreinfer's CPU int8 layout (bf16 scales), and the operator built for this CPU."""
    return (x.shape[0] <= MAX_M and x.is_cpu and x.shape[1] % K_ALIGN == 0 and q.shape[0] % N_ALIGN == 0
            and q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and available())
