"""Weighted sums of neuron-major rows, out [M, dm] = coef [M, R] @ W[rows] (rows int64 [R], or None for all
F rows in order): the down projection of a compacted or per-token-refined FFN, stored [F, dm] so that a
neuron is one contiguous row. The native operators of neuron_rows.cpp and their PyTorch references.

- `int8_rows(coef, q, scale, rows)`: W = q [F, dm] int8 times scale [dm] (per output channel).
- `q8_0_rows(coef, qs, d, rows)`: W[f, j] = d[f, j // 32] * qs[f, j], blocks along dm.
- `q4_rows(coef, qs, d, m, rows)`: W[f, j] = d[f, j // 32] * q[f, j] + m[f, j // 32], q4.py's nibbles.
Each takes the operator where it applies (CPU, 1 <= M <= 16, dm % 32 == 0, built for an AVX512-VNNI
CPU), else its reference. The operator reads the chosen rows in place; the reference gathers them first."""

from functools import cache

import torch

from . import build as builder
from . import q4, q8_0

MAX_M = 16
FALLBACK = "neuron-major down projections take the PyTorch reference"


@cache
def load() -> bool:
    """Whether torch.ops.coreinfer.int8_rows, q8_0_rows and q4_rows run here: built once into the cache folder,
    loaded, and this CPU has AVX-512."""
    if not builder.load_operators("neuron_rows.cpp", FALLBACK):
        return False
    for name in ("int8_rows", "q8_0_rows"):
        torch.library.register_fake(f"coreinfer::{name}")(
            lambda coef, q, scale, rows: coef.new_empty(coef.shape[0], q.shape[1], dtype=torch.float32))
    torch.library.register_fake("coreinfer::q4_rows")(
        lambda coef, qs, d, m, rows: coef.new_empty(coef.shape[0], qs.shape[1] * 2, dtype=torch.float32))
    return torch.ops.coreinfer.neuron_rows_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def available() -> bool:
    return load()


def picked(w: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return w if rows is None else w.index_select(0, rows)


def int8_rows_reference(coef: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    return (coef.float() @ picked(q, rows).float()) * scale.float()


def q8_0_rows_reference(coef: torch.Tensor, qs: torch.Tensor, d: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    return coef.float() @ q8_0.dequantize(picked(qs, rows), picked(d, rows))


def q4_rows_reference(coef: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    return coef.float() @ q4.dequantize(picked(qs, rows), picked(d, rows), picked(m, rows))


def fits(coef: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether the operator takes these: CPU, 1 <= M <= 16, int8 q [F, dm] or q4 nibbles [F, dm / 2], dm % 32 == 0."""
    dm = q.shape[1] * (2 if q.dtype == torch.uint8 else 1)
    return (coef.dim() == 2 and 1 <= coef.shape[0] <= MAX_M and coef.is_cpu and q.dtype in (torch.int8, torch.uint8)
            and dm % 32 == 0 and available())


def int8_rows(coef: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """coef [M, R] @ (q * scale)[rows] -> [M, dm] float32."""
    if fits(coef, q):
        return torch.ops.coreinfer.int8_rows(coef, q, scale, rows)
    return int8_rows_reference(coef, q, scale, rows)


def q8_0_rows(coef: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """coef [M, R] @ W[rows] -> [M, dm] float32 for q8_0 rows qs [F, dm], d [F, dm / 32]."""
    if fits(coef, qs):
        return torch.ops.coreinfer.q8_0_rows(coef, qs, d, rows)
    return q8_0_rows_reference(coef, qs, d, rows)


def q4_rows(coef: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """coef [M, R] @ W[rows] -> [M, dm] float32 for q4 rows qs [F, dm / 2], d and m [F, dm / 32]."""
    if fits(coef, qs):
        return torch.ops.coreinfer.q4_rows(coef, qs, d, m, rows)
    return q4_rows_reference(coef, qs, d, m, rows)
