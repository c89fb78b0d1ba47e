"""GGML block types as they lie in a GGUF file, one row of a traits table each, and their dequantization:
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (Gemma's Q4_K_M holds some), Q4_K, Q5_K, Q6_K.

A GGUF tensor row of K weights is K / block blocks of `nbytes` bytes. `to_float` takes blocks as
uint8 [n, nbytes] and returns float32 [n, block]; it mirrors ggml's `dequantize_row_*` (and gguf-py's
numpy port, which the tests compare against) with torch ops, so it runs on all cores.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from gguf import GGMLQuantizationType as Q

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per block
    nbytes: int  # bytes per block
    to_float: Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, nbytes] -> float32 [n, block]

    def row_bytes(self, k: int) -> int:
        if k % self.block:
            raise ValueError(f"{self.name} rows hold multiples of {self.block} weights, got {k}")
        return k // self.block * self.nbytes

    def dequantize(self, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """raw uint8 bytes of a whole tensor -> float32 of `shape` (innermost dimension last)."""
        return self.to_float(raw.reshape(-1, self.nbytes)).reshape(shape)


def f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [...]: one little-endian fp16 per pair of bytes."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return b & 0x0F, b >> 4


def _f32(b):
    return b.contiguous().view(torch.float32)


def _f16(b):
    return b.contiguous().view(torch.float16).float()


def _bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


def _q8_0(b):
    return f16(b[:, :2])[:, None] * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b):
    lo, hi = nibbles(b[:, 2:])  # [n, 16] each: weights 0..15 and 16..31
    return f16(b[:, :2])[:, None] * (torch.cat([lo, hi], 1).float() - 8)


def _q4_1(b):
    lo, hi = nibbles(b[:, 4:])
    return f16(b[:, :2])[:, None] * torch.cat([lo, hi], 1).float() + f16(b[:, 2:4])[:, None]


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes [n, 4] (a little-endian uint32) -> bit j of it [n, 32], the fifth bit of weight j."""
    word = sum(qh[:, i].long() << (8 * i) for i in range(4))  # [n]
    return ((word[:, None] >> torch.arange(32)) & 1).to(torch.uint8)


def _q5_0(b):
    lo, hi = nibbles(b[:, 6:])
    q = torch.cat([lo, hi], 1) | (_fifth_bits(b[:, 2:6]) << 4)
    return f16(b[:, :2])[:, None] * (q.float() - 16)


def _q5_1(b):
    lo, hi = nibbles(b[:, 8:])
    q = torch.cat([lo, hi], 1) | (_fifth_bits(b[:, 4:8]) << 4)
    return f16(b[:, :2])[:, None] * q.float() + f16(b[:, 2:4])[:, None]


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 6-bit scales and mins [n, 8] (ggml's
    get_scale_min_k4): bytes 0-3 and 4-7 hold sub-blocks 0-3's scale and min in their low 6 bits
    and the top 2 bits of sub-blocks 4-7's; bytes 8-11 their low 4 bits."""
    s = scales.view(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc, mn


def q4_k_parts(b: torch.Tensor):
    """Q4_K super-blocks uint8 [n, 144] -> (q [n, 8, 32] in 0..15, scale [n, 8], min [n, 8]) float32
    with W = scale * q - min per 32-wide sub-block. qs holds 4 chunks of 32 bytes: chunk j's low
    nibbles are sub-block 2j, its high nibbles sub-block 2j + 1."""
    sc, mn = k_scale_min(b[:, 4:16])
    lo, hi = nibbles(b[:, 16:].reshape(-1, 4, 32))
    q = torch.stack([lo, hi], 2).reshape(-1, 8, 32)
    return q, f16(b[:, 0:2])[:, None] * sc.float(), f16(b[:, 2:4])[:, None] * mn.float()


def _q4_k(b):
    q, scale, mn = q4_k_parts(b)
    return (scale[..., None] * q.float() - mn[..., None]).reshape(-1, QK_K)


def _q5_k(b):
    sc, mn = k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    lo, hi = nibbles(qs.reshape(-1, 4, 32))
    low = torch.stack([lo, hi], 2).reshape(-1, 8, 32)
    bits = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (qh[:, None, :] >> bits) & 1  # [n, 8, 32]: sub-block j's fifth bit is bit j of qh
    q = (low | (high << 4)).float()
    scale = f16(b[:, 0:2])[:, None] * sc.float()
    return (scale[..., None] * q - (f16(b[:, 2:4])[:, None] * mn.float())[..., None]).reshape(-1, QK_K)


def _q6_k(b):
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    lo, hi = nibbles(ql.reshape(-1, 2, 1, 64))
    low = torch.cat([lo, hi], 2).reshape(-1, 8, 32)  # halves of 128 weights: 64 low nibbles, then 64 high
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((qh.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(-1, QK_K // 16, 16).float()
    scale = f16(d)[:, None] * scales.contiguous().view(torch.int8).float()  # [n, 16]
    return (scale[..., None] * q).reshape(-1, QK_K)


TYPES: dict[int, GGMLType] = {
    Q.F32: GGMLType("F32", 1, 4, _f32),
    Q.F16: GGMLType("F16", 1, 2, _f16),
    Q.BF16: GGMLType("BF16", 1, 2, _bf16),
    Q.Q8_0: GGMLType("Q8_0", 32, 34, _q8_0),
    Q.Q4_0: GGMLType("Q4_0", 32, 18, _q4_0),
    Q.Q4_1: GGMLType("Q4_1", 32, 20, _q4_1),
    Q.Q5_0: GGMLType("Q5_0", 32, 22, _q5_0),
    Q.Q5_1: GGMLType("Q5_1", 32, 24, _q5_1),
    Q.Q4_K: GGMLType("Q4_K", QK_K, 144, _q4_k),
    Q.Q5_K: GGMLType("Q5_K", QK_K, 176, _q5_k),
    Q.Q6_K: GGMLType("Q6_K", QK_K, 210, _q6_k),
}


def ggml_type(code: int) -> GGMLType:
    """The traits of a GGUF tensor type, or one line naming the types that load."""
    if code not in TYPES:
        supported = ", ".join(t.name for t in TYPES.values())
        raise ValueError(f"GGML type {Q(code).name} is not supported (supported: {supported})")
    return TYPES[code]
