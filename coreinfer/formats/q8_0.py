"""q8_0: int8 weights with one fp16 scale per block of 32 along K (ggml's Q8_0, split in two arrays).

Tensors: `qs` int8 [N, K], `d` float16 [N, K/32]; W[n, k] = d[n, k // 32] * qs[n, k]. A GGUF Q8_0
tensor splits into these verbatim; any other type is dequantized and requantized the way ggml's
`quantize_row_q8_0` does (d = max |w| / 127 per block, q = round(w / d)).
"""

import torch

from . import native
from .ggml import GGMLType

NAME = "q8_0"
BLOCK = 32


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), as ggml rounds; torch.round rounds halves to even."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] float -> {qs, d}."""
    N, K = w.shape
    g = w.float().reshape(N, K // BLOCK, BLOCK)
    d = g.abs().amax(-1) / 127  # [N, K/32]
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    qs = roundf(g * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return {"qs": qs.reshape(N, K).contiguous(), "d": d.half().contiguous()}


def from_blocks(kind: GGMLType, raw: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A file tensor's bytes uint8 [N, row bytes] -> {qs, d}: Q8_0's blocks verbatim, else requantized."""
    N, K = shape
    if kind.name != "Q8_0":
        return pack(kind.dequantize(raw, shape))
    blocks = raw.reshape(N, K // BLOCK, kind.nbytes)  # [N, K/32, 2 + 32]
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(N, K // BLOCK)
    qs = blocks[..., 2:].contiguous().view(torch.int8).reshape(N, K)
    return {"qs": qs, "d": d}


def dequantize(t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    qs, d = t["qs"], t["d"]
    N, K = qs.shape
    return (qs.to(dtype).view(N, K // BLOCK, BLOCK) * d.to(dtype)[..., None]).view(N, K)


def rows(t: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.index_select(0, index) for name, x in t.items()}


def matmul(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # [M, K]
    gemv = native.op("q8_0_gemv")
    if gemv is not None and native.usable(flat, t["qs"], t["d"]):
        out = native.by_chunks(gemv, flat.float().contiguous(), t["qs"], t["d"])
    else:
        out = flat @ dequantize(t, flat.dtype).t()
    return out.to(x.dtype).view(*x.shape[:-1], t["qs"].shape[0])


def rows_matmul(coef: torch.Tensor, t: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    """coef [..., R] @ W[index] [R, K] -> [..., K]: a neuron-major down projection (index None: all rows)."""
    flat = coef.reshape(-1, coef.shape[-1])  # [M, R]
    op = native.op("q8_0_rows")
    if op is not None and native.usable(flat, t["qs"], t["d"]):
        out = native.by_chunks(op, flat.float().contiguous(), t["qs"], t["d"], index)
    else:
        w = t if index is None else rows(t, index)
        out = flat @ dequantize(w, flat.dtype)
    return out.to(coef.dtype).view(*coef.shape[:-1], t["qs"].shape[1])


def nbytes(t: dict[str, torch.Tensor]) -> int:
    return sum(x.nbytes for x in t.values())
