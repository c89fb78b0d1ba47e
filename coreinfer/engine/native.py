"""Native CPU kernels for what PyTorch does with extra copies: a weighted row sum and an int8 column gather
(the int8 x int8 GEMV, a torch operator, is gemv.py).

Per-token refinement (engine/adaptive.py) needs `out = sum_r coef[r] * W[rows[r], :]`: the down
projection over a token's chosen rows, and gate/up over its kept input entries (their weights stored
as rows). In PyTorch that is `coef @ W.index_select(0, rows)`, which copies the chosen rows before
reading them again: more bytes than the dense matmul it replaces, so refinement decoded slower than
dense (docs/quality.md). `rowsum` reads each chosen row once, in place.

Compacting int8 weights gathers the down projection's neurons, which are its columns ([d, F]):
torch gathers them byte by byte (13 ms a layer on SmolLM2), numpy's take in a loop (0.7 ms);
`take_columns` copies each row's picks in a plain C loop over an index that stays in L1.

Both are a few lines of C (coreinfer/kernels/rowsum.c), compiled once by kernels/build.py into the coreinfer
cache folder and called through ctypes (no PyTorch headers, so the build takes about a second). Without a compiler,
`load()` returns None and callers keep their PyTorch or numpy path.
"""

import ctypes
from functools import cache

import torch

from ..kernels import build as builder


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then read from the cache folder); None, with one line
    on stderr, where they cannot be built."""
    from ..io.loading import cache_dir

    path = builder.build("rowsum.c", cache_dir() / "native",
                         "per-token refinement and int8 compaction take slower PyTorch and numpy paths")
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.rowsum_f32.restype = None
    lib.rowsum_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.take_columns_i8.restype = None
    lib.take_columns_i8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int]
    return lib


def usable(w: torch.Tensor) -> bool:
    """Whether the kernel can read `w` [R, n] in place: float32 rows on the CPU, unit column stride."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.stride(1) == 1


def rowsum(lib: ctypes.CDLL, w: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [n] = coef [m] @ w[rows] for w [R, n] (see `usable`), rows [m] int64, coef [m] float32."""
    rows, coef = rows.contiguous(), coef.contiguous().float()
    lib.rowsum_f32(w.data_ptr(), w.stride(0), rows.data_ptr(), coef.data_ptr(), rows.numel(), w.shape[1],
                   out.data_ptr(), torch.get_num_threads())
    return out


def take_columns(lib: ctypes.CDLL, src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [R, k] = src[:, idx] for int8 src [R, n] (unit column stride) on the CPU, idx [k] int64,
    out contiguous."""
    idx = idx.contiguous()
    lib.take_columns_i8(src.data_ptr(), src.stride(0), src.shape[0], idx.data_ptr(), idx.numel(), out.data_ptr(),
                        torch.get_num_threads())
    return out
