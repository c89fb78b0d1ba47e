"""q8_0 weights (W[n, k] = d[n, k // 32] * qs[n, k]: int8 qs [N, K], float16 d [N, K/32]) times fp32
activations: the native operators of q8_0_gemv.cpp and their PyTorch references.

`gemv(x, qs, d)` is x [M, K] @ W.T: `torch.ops.coreinfer.q8_0_gemv` where it applies (CPU, M <= 16,
built for an AVX512-VNNI CPU; x is then quantized per block of 32 to int8, as llama.cpp's Q8_0 x Q8_0
dot), else `reference`, the float product."""

from functools import cache

import torch

from . import build as builder

MAX_M = 16
FALLBACK = "q8_0 matmuls take the PyTorch reference"


@cache
def load() -> bool:
    """Whether torch.ops.coreinfer.q8_0_gemv runs here: built once into the cache folder, loaded, and
    this CPU has AVX512-VNNI."""
    if not builder.load_operators("q8_0_gemv.cpp", FALLBACK):
        return False
    torch.library.register_fake("coreinfer::q8_0_gemv")(
        lambda x, qs, d: x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32))
    return torch.ops.coreinfer.q8_0_gemv_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def available() -> bool:
    return load()


def dequantize(qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 of qs [N, K], d [N, K/32]."""
    return (qs.float().view(qs.shape[0], -1, 32) * d.float()[..., None]).view(qs.shape)


def reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32, in PyTorch."""
    return x.float() @ dequantize(qs, d).t()


def fits(x: torch.Tensor, qs: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] <= MAX_M and x.is_cpu and qs.dtype == torch.int8 and available()


def gemv(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32: the native operator where it applies, else the reference."""
    return torch.ops.coreinfer.q8_0_gemv(x, qs, d) if fits(x, qs) else reference(x, qs, d)
