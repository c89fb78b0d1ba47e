"""q4: 4-bit weights with an fp16 scale and min per block of 32 along K (ggml's Q4_1 layout, split).

Tensors: `qs` uint8 [N, K/2], `d` and `m` float16 [N, K/32]. Byte qs[n, 16 b + i] holds q[n, 32 b + i]
in its low nibble and q[n, 32 b + 16 + i] in its high one; W[n, k] = d * q + m, q in 0..15.
GGUF Q4_1 splits in verbatim, Q4_0 too with m = -8 d (exact in fp16). Q4_K's 32-wide sub-blocks are
this format already (W = d_super * sc * q - dmin * mn): only their nibbles are reordered and their
scale and min rounded to fp16, a relative error of at most 2^-11 on each (checked in the tests).
"""

import torch

from . import native
from .ggml import GGMLType, f16, q4_k_parts

NAME = "q4"
BLOCK = 32
FILE_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # the GGML types this format holds without requantizing


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [..., 32] (0..15) -> bytes [..., 16]: low nibble q[i], high nibble q[16 + i]."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """bytes [..., 16] -> q [..., 32]."""
    return torch.cat([qs & 0x0F, qs >> 4], -1)


def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] float -> {qs, d, m}, rounded against the fp16 scale and min the kernel reads."""
    N, K = w.shape
    g = w.float().reshape(N, K // BLOCK, BLOCK)
    lo, hi = g.amin(-1), g.amax(-1)  # [N, K/32]
    d = ((hi - lo) / 15).half()
    m = lo.half()
    df = d.float()
    inv = torch.where(df == 0, 0.0, 1.0 / df)
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return {"qs": pack_nibbles(q).reshape(N, K // 2).contiguous(), "d": d.contiguous(), "m": m.contiguous()}


def from_blocks(kind: GGMLType, raw: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A file tensor's bytes uint8 [N, row bytes] -> {qs, d, m}: Q4_0/Q4_1/Q4_K without requantizing,
    any other type requantized from its float values."""
    N, K = shape
    nb = K // BLOCK
    if kind.name in ("Q4_0", "Q4_1"):
        blocks = raw.reshape(N, nb, kind.nbytes)  # [N, K/32, 18 | 20]
        d = f16(blocks[..., :2])
        m = -8 * d if kind.name == "Q4_0" else f16(blocks[..., 2:4])
        qs = blocks[..., kind.nbytes - 16:].reshape(N, K // 2)
        return {"qs": qs.contiguous(), "d": d.half(), "m": m.half()}
    if kind.name == "Q4_K":
        q, scale, mn = q4_k_parts(raw.reshape(-1, kind.nbytes))  # [N K/256, 8, 32], [N K/256, 8]
        return {"qs": pack_nibbles(q).reshape(N, K // 2).contiguous(), "d": scale.half().reshape(N, nb),
                "m": (-mn).half().reshape(N, nb)}
    return pack(kind.dequantize(raw, shape))


def dequantize(t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    qs = t["qs"]
    N, K = qs.shape[0], qs.shape[1] * 2
    q = unpack_nibbles(qs.view(N, K // BLOCK, 16)).to(dtype)  # [N, K/32, 32]
    return (q * t["d"].to(dtype)[..., None] + t["m"].to(dtype)[..., None]).view(N, K)


def rows(t: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.index_select(0, index) for name, x in t.items()}


def matmul(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])  # [M, K]
    gemv = native.op("q4_gemv")
    if gemv is not None and native.usable(flat, t["qs"], t["d"], t["m"]):
        out = native.by_chunks(gemv, flat.float().contiguous(), t["qs"], t["d"], t["m"])
    else:
        out = flat @ dequantize(t, flat.dtype).t()
    return out.to(x.dtype).view(*x.shape[:-1], t["qs"].shape[0])


def nbytes(t: dict[str, torch.Tensor]) -> int:
    return sum(x.nbytes for x in t.values())


def rows_matmul(coef: torch.Tensor, t: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    """coef [..., R] @ W[index] [R, K] -> [..., K]: a neuron-major down projection (index None: all rows)."""
    flat = coef.reshape(-1, coef.shape[-1])  # [M, R]
    op = native.op("q4_rows")
    if op is not None and native.usable(flat, t["qs"], t["d"], t["m"]):
        out = native.by_chunks(op, flat.float().contiguous(), t["qs"], t["d"], t["m"], index)
    else:
        w = t if index is None else rows(t, index)
        out = flat @ dequantize(w, flat.dtype)
    return out.to(coef.dtype).view(*coef.shape[:-1], t["qs"].shape[1] * 2)
