"""q4 weights (block 32, scale and min): uint8 qs [N, K/2] with q[n, 32b + i] in the low nibble of
qs[n, 16b + i] and q[n, 32b + 16 + i] in its high nibble, float16 d, m [N, K/32]; W = d * q + m, q in 0..15.
The native operator of q4_gemv.cpp and its PyTorch reference.

`gemv(x, qs, d, m)` is x [M, K] @ W.T: `torch.ops.coreinfer.q4_gemv` where it applies (CPU, M <= 16, built
for an AVX512-VNNI CPU; x is then quantized per block of 32 to int8), else `reference`, the float product."""

from functools import cache

import torch

from . import build as builder

MAX_M = 16
FALLBACK = "q4 matmuls take the PyTorch reference"


@cache
def load() -> bool:
    """Whether torch.ops.coreinfer.q4_gemv runs here: built once into the cache folder, loaded, and this
    CPU has AVX512-VNNI."""
    if not builder.load_operators("q4_gemv.cpp", FALLBACK):
        return False
    torch.library.register_fake("coreinfer::q4_gemv")(
        lambda x, qs, d, m: x.new_empty(x.shape[0], qs.shape[0], dtype=torch.float32))
    return torch.ops.coreinfer.q4_gemv_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def available() -> bool:
    return load()


def unpack(qs: torch.Tensor) -> torch.Tensor:
    """q [N, K] uint8 in 0..15 of qs [N, K/2]."""
    blocks = qs.view(qs.shape[0], -1, 16)  # [N, B, 16]: entries 0-15 low, 16-31 high
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).view(qs.shape[0], -1)


def pack(q: torch.Tensor) -> torch.Tensor:
    """qs [N, K/2] of q [N, K] in 0..15 (the inverse of `unpack`)."""
    blocks = q.to(torch.uint8).view(q.shape[0], -1, 32)  # [N, B, 32]
    return (blocks[..., :16] | blocks[..., 16:] << 4).view(q.shape[0], -1)


def dequantize(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 of qs, d, m."""
    q = unpack(qs).float().view(qs.shape[0], -1, 32)  # [N, B, 32]
    return (q * d.float()[..., None] + m.float()[..., None]).view(qs.shape[0], -1)


def reference(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32, in PyTorch."""
    return x.float() @ dequantize(qs, d, m).t()


def fits(x: torch.Tensor, qs: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] <= MAX_M and x.is_cpu and qs.dtype == torch.uint8 and available()


def gemv(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32: the native operator where it applies, else the reference."""
    return torch.ops.coreinfer.q4_gemv(x, qs, d, m) if fits(x, qs) else reference(x, qs, d, m)
