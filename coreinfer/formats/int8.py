"""int8: per-output-channel symmetric int8, today's `--weights int8` (engine/quant.py holds the kernel).

Tensors: `q` int8 [N, K], `scale` [N] (bf16 on the CPU, as PyTorch's int8 kernel wants); W = q * scale[:, None].
"""

import torch

from ..engine.quant import int8_matmul, quantize_int8
from .ggml import GGMLType

NAME = "int8"


def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = quantize_int8(w)
    return {"q": q, "scale": scale.to(torch.bfloat16 if q.device.type == "cpu" else w.dtype)}


def from_blocks(kind: GGMLType, raw: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    return pack(kind.dequantize(raw, shape))


def dequantize(t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return t["q"].to(dtype) * t["scale"].to(dtype)[:, None]


def rows(t: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: x.index_select(0, index) for name, x in t.items()}


def matmul(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return int8_matmul(x, t["q"], t["scale"])


def rows_matmul(coef: torch.Tensor, t: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    w = t if index is None else rows(t, index)
    return coef @ dequantize(w, coef.dtype)


def nbytes(t: dict[str, torch.Tensor]) -> int:
    return sum(x.nbytes for x in t.values())
