"""The rows product of per-token refinement on int8 weights: out = coef @ W[rows], W int8 neuron-major.

    out [M, dm] = int8_rows(coef [M, R], q int8 [F, dm], scale [dm], rows int64 [R] or None)
    out[m] = sum_r coef[m, r] * q[rows[r]] * scale   (rows None: R == F, every row in order)

It is the weight-format contract's `int8_rows` (a neuron is one contiguous row of q, so a step reads
only the rows it names): the native operator of kernels/rows.py where it runs, else its PyTorch
reference. The reference gathers a float copy of the rows: correct, but ~10x slower than reading
every row with the int8 GEMV (SmolLM2's down at 80% of its rows: 107 us against 10.5 us on 2 cores),
so without the operator refinement decodes through masked coefficients and the dense GEMV instead
(`reads_rows`; engine/adaptive.py).
"""

import torch

from ..kernels import rows as kernels


def reads_rows() -> bool:
    """Whether refinement should read chosen int8 rows (the native operator) rather than mask them."""
    return kernels.available()


def reference(coef: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The oracle: coef [M, R] @ (q[rows] [R, dm] as float) * scale [dm] -> [M, dm] in coef's dtype."""
    w = q if rows is None else q.index_select(0, rows)  # [R, dm] int8
    return (coef @ w.to(coef.dtype)) * scale.to(coef.dtype)


def int8_rows(coef: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """See the module docstring: the native operator where it takes these shapes, else the reference."""
    if kernels.fits(coef, q):
        return torch.ops.coreinfer.int8_rows(coef, q, scale, rows)
    return reference(coef, q, scale, rows)
