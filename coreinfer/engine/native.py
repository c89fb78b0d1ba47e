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

Both are a few lines of C, compiled once with the system's C compiler into the coreinfer cache folder and
called through ctypes (no PyTorch headers, so the build takes about a second). Without a compiler,
`load()` returns None and callers keep their PyTorch or numpy path.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* acc[j] += sum_r coef[r] * w[rows[r] * ld + j]: each chosen row streamed once, four at a time so that
   acc (n floats, a few KiB: it stays in L1) is loaded and stored once per four rows. */
static void add_rows(const float *w, int64_t ld, const int64_t *rows, const float *coef, int64_t m, int64_t n,
                     float *restrict acc) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
        const float *restrict a = w + rows[r] * ld, *restrict b = w + rows[r + 1] * ld;
        const float *restrict c = w + rows[r + 2] * ld, *restrict d = w + rows[r + 3] * ld;
        float ca = coef[r], cb = coef[r + 1], cc = coef[r + 2], cd = coef[r + 3];
        for (int64_t j = 0; j < n; j++) acc[j] += ca * a[j] + cb * b[j] + cc * c[j] + cd * d[j];
    }
    for (; r < m; r++) {
        const float *restrict a = w + rows[r] * ld;
        float ca = coef[r];
        for (int64_t j = 0; j < n; j++) acc[j] += ca * a[j];
    }
}

/* out[j] = sum_r coef[r] * w[rows[r] * ld + j], j < n. Threads take contiguous shares of the rows,
   each into its own partial sum; the partials are added at the end. */
void rowsum_f32(const float *w, int64_t ld, const int64_t *rows, const float *coef, int64_t m, int64_t n,
                float *out, int threads) {
    memset(out, 0, n * sizeof(float));
    if (threads <= 1 || m < 64) {
        add_rows(w, ld, rows, coef, m, n, out);
        return;
    }
    float *part = calloc((size_t)threads * n, sizeof(float));
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo = m * t / nt, hi = m * (t + 1) / nt;
        add_rows(w, ld, rows + lo, coef + lo, hi - lo, n, part + (int64_t)t * n);
    }
    for (int t = 0; t < threads; t++)
        for (int64_t j = 0; j < n; j++) out[j] += part[(int64_t)t * n + j];
    free(part);
}

/* out[r * k + j] = src[r * ld + idx[j]], r < rows, j < k: int8 columns gathered row by row. */
void take_columns_i8(const int8_t *src, int64_t ld, int64_t rows, const int64_t *idx, int64_t k, int8_t *out,
                     int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && rows * k > (1 << 16))
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *s = src + r * ld;
        int8_t *o = out + r * k;
        for (int64_t j = 0; j < k; j++) o[j] = s[idx[j]];
    }
}
"""


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then read from the cache folder); None, with one line
    on stderr, where they cannot be built."""
    from ..io.loading import cache_dir

    # -march=native code must not reach another CPU through a shared cache folder: the CPU is in the key
    digest = hashlib.sha256((SOURCE + cpu_model()).encode()).hexdigest()[:12]
    path = cache_dir() / "native" / f"kernels-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler = os.environ.get("CC", "cc")
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
            src.write_text(SOURCE)
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(out)]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                print(f"coreinfer: no native kernels ({detail.strip().splitlines()[-1] if detail.strip() else e}); "
                      "per-token refinement and int8 compaction take slower PyTorch and numpy paths", file=sys.stderr)
                return None
            os.replace(out, path)  # atomic: another process may be building the same file
    lib = ctypes.CDLL(str(path))
    lib.rowsum_f32.restype = None
    lib.rowsum_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.take_columns_i8.restype = None
    lib.take_columns_i8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int]
    return lib


def cpu_model() -> str:
    """This CPU's model name and feature flags (Linux), else the platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


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
