"""dense: a float weight [N, K] in the compute dtype (`weight`), as nn.Linear holds it."""

import torch
import torch.nn.functional as F

from .ggml import GGMLType

NAME = "dense"


def pack(w: torch.Tensor, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"weight": w.to(dtype).contiguous()}


def from_blocks(kind: GGMLType, raw: torch.Tensor, shape: tuple[int, int], dtype=torch.float32) -> dict[str, torch.Tensor]:
    return pack(kind.dequantize(raw, shape), dtype)


def dequantize(t: dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    return t["weight"].to(dtype)


def rows(t: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": t["weight"].index_select(0, index)}


def matmul(x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(x, t["weight"])


def rows_matmul(coef: torch.Tensor, t: dict[str, torch.Tensor], index: torch.Tensor | None = None) -> torch.Tensor:
    w = t["weight"] if index is None else t["weight"].index_select(0, index)
    return coef @ w


def nbytes(t: dict[str, torch.Tensor]) -> int:
    return t["weight"].nbytes
