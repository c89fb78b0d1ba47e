"""Weight-only int8 matmul for the GPU: a Triton kernel that reads the int8 weights as they are.

Why: PyTorch has no fast CUDA kernel for bf16 activations against int8 weights (its
`_weight_int8pack_mm` is CPU and MPS), and dequantizing first writes and rereads a full-precision copy
of the matrix on every call: more bytes than bf16 weights, the opposite of the point. Decode multiplies
a few rows (M <= 16) by each weight, so one kernel tile of 16 rows covers them; each program reads a
[BLOCK_N, K] band of int8 weights once and scales its outputs per channel. Larger M (prefill) amortises
a dequantized copy over its rows, so `int8_matmul` keeps that path there.

Triton ships with PyTorch's CUDA wheels; with TRITON_INTERPRET=1 the kernel runs on the CPU (tests).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: int8_matmul never calls in here without a GPU
    triton = None

SMALL_M = 16  # rows one program covers: tl.dot needs tiles of at least 16


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _int8_mm(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                        other=0)  # [BLOCK_N, BLOCK_K] int8, converted in registers
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block_n: int = 16,
            block_k: int = 256) -> torch.Tensor:
    """x [M, K] (M <= SMALL_M is what it is for) @ (q [N, K] int8 * scale[N, None]).T -> [M, N] in x's dtype.
    Narrow output bands (block_n 16) give a GEMV enough programs to keep the memory system busy."""
    M, K = x.shape
    N = q.shape[0]
    x, q = x.contiguous(), q.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, SMALL_M))
    _int8_mm[grid](x, q, scale, out, M, N, K, x.stride(0), q.stride(0), out.stride(0),
                   BLOCK_M=SMALL_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
