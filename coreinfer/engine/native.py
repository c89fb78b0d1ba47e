"""Native CPU kernels for what PyTorch does with extra copies: a weighted row sum and an int8 column gather.

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

Decode's int8 matmuls are GEMVs: PyTorch's `_weight_int8pack_mm` converts every weight to float in its
inner loop. `int8_gemv` quantizes the activation row to int8 too (per block of 32, as llama.cpp's Q8_0)
and multiplies int8 by int8 with AVX512-VNNI: about 2x faster at SmolLM2's shapes on 2 Xeon cores
(benchmarks/int8_gemv.py). It is a PyTorch operator (C++ against torch's headers, built once in about
10 s): the compiled step could reach a ctypes function only through a Python operator, about 20 us a
call (150 calls a token), while inductor's C++ wrapper calls a C++ operator in about 3 us. No C++
compiler or no VNNI: `gemv_available()` is False and int8_matmul keeps PyTorch's kernel.
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


# ---- the int8 x int8 GEMV: a PyTorch operator, so that the compiled step calls it without Python ----

GEMV_SOURCE = r"""
/* out [M, N] = x [M, K] @ (q [N, K] * scale[:, None]).T, for decode's few rows of x (AVX512-VNNI).
   Each row of x is quantized to int8 per block of 32 (scale = max |x| / 127, as llama.cpp's Q8_0),
   then dotted with the int8 weight rows by vpdpbusd (u8 x s8 -> s32, four products a lane).
   vpdpbusd wants one operand unsigned: x goes in as |x| and its signs move onto the weights (a masked
   negate), so no offset correction is needed. A 64-byte chunk holds two blocks (lanes 0-7 and 8-15):
   each chunk's s32 lanes are converted and scaled into a float accumulator per weight row. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#include <immintrin.h>

/* x [K] -> u [Kp] = |round(x / s_b)| (zero past K), neg [Kp / 64] (a bit per negative entry), xs [Kp / 32]
   = s_b (zero past K) for each block b of 32; Kp = K rounded up to 64. K % 16 == 0. */
static void quantize_blocks(const float *x, int64_t K, uint8_t *u, __mmask64 *neg, float *xs) {
    int64_t Kp = (K + 63) / 64 * 64;
    for (int64_t b = 0; b < Kp / 32; b++) {
        __m512 v0 = _mm512_setzero_ps(), v1 = v0;  // past K: zeros
        int64_t j = b * 32;
        if (j + 16 <= K) v0 = _mm512_loadu_ps(x + j);
        if (j + 32 <= K) v1 = _mm512_loadu_ps(x + j + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
        xs[b] = amax / 127.f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128((__m128i *)(u + j), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q0)));
        _mm_storeu_si128((__m128i *)(u + j + 16), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q1)));
        uint64_t bits = (uint64_t)_mm512_movepi32_mask(q0) | (uint64_t)_mm512_movepi32_mask(q1) << 16;
        if (b % 2 == 0) neg[b / 2] = bits; else neg[b / 2] |= bits << 32;
    }
}

/* One 64-byte chunk of four weight rows into their float accumulators: the signs of x onto w, the u8 x s8
   dots, each lane times its block's scale. The same chunk of the next four rows is prefetched: a decode
   step's weights come from DRAM (SmolLM2's 134 MB do not stay in this L3 between tokens), and the
   hardware prefetcher alone left a fifth of the bandwidth unused (benchmarks/int8_gemv.py, the sweep).
   Past the last row that is harmless: a prefetch does not fault. */
#define CHUNK4(load)                                                                                     \
    {                                                                                                    \
        __m512i x = _mm512_loadu_si512(u + c);                                                           \
        _mm_prefetch((const char *)(q + 4 * K + c), _MM_HINT_T0);                                        \
        _mm_prefetch((const char *)(q + 5 * K + c), _MM_HINT_T0);                                        \
        _mm_prefetch((const char *)(q + 6 * K + c), _MM_HINT_T0);                                        \
        _mm_prefetch((const char *)(q + 7 * K + c), _MM_HINT_T0);                                        \
        __mmask64 m = neg[c / 64];                                                                       \
        __m512 s = _mm512_insertf32x8(_mm512_set1_ps(xs[c / 32]), _mm256_set1_ps(xs[c / 32 + 1]), 1);   \
        __m512i w0 = load(q + c), w1 = load(q + K + c), w2 = load(q + 2 * K + c), w3 = load(q + 3 * K + c); \
        w0 = _mm512_mask_sub_epi8(w0, m, z, w0);                                                         \
        w1 = _mm512_mask_sub_epi8(w1, m, z, w1);                                                         \
        w2 = _mm512_mask_sub_epi8(w2, m, z, w2);                                                         \
        w3 = _mm512_mask_sub_epi8(w3, m, z, w3);                                                         \
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, x, w0)), s, f0);                  \
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, x, w1)), s, f1);                  \
        f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, x, w2)), s, f2);                  \
        f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, x, w3)), s, f3);                  \
    }
#define LOAD(p) _mm512_loadu_si512(p)
#define LOAD_TAIL(p) _mm512_maskz_loadu_epi8(tail, p)

/* The dots of four weight rows q [4, K] with one quantized row of x -> [4] */
static inline __m128 dot4(const int8_t *q, int64_t K, const uint8_t *u, const __mmask64 *neg, const float *xs) {
    const __m512i z = _mm512_setzero_si512();
    const __mmask64 tail = K % 64 ? ((__mmask64)1 << K % 64) - 1 : 0;
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    int64_t c = 0;
    for (; c + 64 <= K; c += 64) CHUNK4(LOAD)
    if (tail) CHUNK4(LOAD_TAIL)
    // the sums of f0..f3 -> [4]: pairwise adds of interleaved lanes, then the four 128-bit quarters
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(f0, f1), _mm512_unpackhi_ps(f0, f1));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(f2, f3), _mm512_unpackhi_ps(f2, f3));
    __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* x [M, K] f32, q [N, K] int8, ws [N] bf16 -> out [M, N] f32; K % 16 == 0, N % 4 == 0. Threads take
   contiguous shares of the rows of q; each group of four rows meets every row of x while in L1. */
static void gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const uint16_t *ws, float *out,
                 int threads) {
    int64_t Kp = (K + 63) / 64 * 64;
    std::vector<uint8_t> u(M * Kp);
    std::vector<__mmask64> neg(M * (Kp / 64));
    std::vector<float> xs(M * (Kp / 32));
    for (int64_t i = 0; i < M; i++)
        quantize_blocks(x + i * K, K, &u[i * Kp], &neg[i * (Kp / 64)], &xs[i * (Kp / 32)]);
    #pragma omp parallel for num_threads(threads) schedule(static) if(threads > 1 && N * K >= (1 << 15))
    for (int64_t n = 0; n < N; n += 4) {
        // bf16 -> f32: the bf16 bits are the float's upper half
        __m128 s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(ws + n))), 16));
        for (int64_t i = 0; i < M; i++)
            _mm_storeu_ps(out + i * N + n,
                          _mm_mul_ps(dot4(q + n * K, K, &u[i * Kp], &neg[i * (Kp / 64)], &xs[i * (Kp / 32)]), s));
    }
}

static bool supported() { return true; }
#else
static void gemv(const float *, int64_t, int64_t, const int8_t *, int64_t, const uint16_t *, float *, int) {}
static bool supported() { return false; }
#endif

static at::Tensor int8_gemv(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scale) {
    TORCH_CHECK(supported(), "coreinfer::int8_gemv needs AVX512-VNNI");
    TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1) && scale.numel() == q.size(0),
                "coreinfer::int8_gemv: x [M, K], q [N, K], scale [N]");
    TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kBFloat16,
                "coreinfer::int8_gemv: int8 q, bf16 scale");
    TORCH_CHECK(x.size(1) % 16 == 0 && q.size(0) % 4 == 0, "coreinfer::int8_gemv: K % 16 == 0, N % 4 == 0");
    at::Tensor xf = x.to(at::kFloat).contiguous(), qc = q.contiguous(), sc = scale.contiguous();
    at::Tensor out = at::empty({x.size(0), q.size(0)}, xf.options());
    gemv(xf.data_ptr<float>(), x.size(0), x.size(1), qc.data_ptr<int8_t>(), q.size(0),
         reinterpret_cast<const uint16_t *>(sc.data_ptr()), out.data_ptr<float>(), at::get_num_threads());
    return out;
}

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
    m.def("int8_gemv_supported() -> bool");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
TORCH_LIBRARY_IMPL(coreinfer, CatchAll, m) { m.impl("int8_gemv_supported", &supported); }
"""

# The GEMV takes up to this many rows of x: decode, one row a sequence. It beats PyTorch's int8 kernel
# at every M measured (1.5-2x up to 64, benchmarks/int8_gemv.py --m), but prefill (a prompt's rows)
# keeps bf16 activations, so that prompts and teacher-forced scoring read what they read before.
GEMV_MAX_M = 16
GEMV_K_ALIGN, GEMV_N_ALIGN = 16, 4


def build_gemv(folder: Path) -> Path | None:
    """Compile GEMV_SOURCE against this torch into `folder` (once: the file name keys the source, the
    CPU and the torch version); None, with one line on stderr, where that fails."""
    torch_dir = Path(torch.__file__).parent
    key = GEMV_SOURCE + cpu_model() + torch.__version__ + str(torch._C._GLIBCXX_USE_CXX11_ABI)
    path = folder / f"int8_gemv-{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "int8_gemv.cpp", Path(tmp) / "int8_gemv.so"
        src.write_text(GEMV_SOURCE)
        cmd = [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-w",
               f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}", str(src),
               "-o", str(out), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip()
            print(f"coreinfer: no native int8 GEMV ({detail.splitlines()[-1] if detail else e}); "
                  "int8 decoding takes PyTorch's kernel", file=sys.stderr)
            return None
        os.replace(out, path)  # atomic: another process may be building the same file
    return path


@cache
def load_gemv() -> bool:
    """Whether torch.ops.coreinfer.int8_gemv runs here: built (about 10 s, once per machine and torch
    version, into the cache folder), loaded, and this CPU has AVX512-VNNI."""
    from ..io.loading import cache_dir

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    path = build_gemv(cache_dir() / "native")
    if path is None:
        return False
    torch.ops.load_library(str(path))
    torch.library.register_fake("coreinfer::int8_gemv")(
        lambda x, q, scale: x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32))
    return torch.ops.coreinfer.int8_gemv_supported()


@torch.compiler.assume_constant_result  # dynamo takes the answer as a constant instead of tracing a build
def gemv_available() -> bool:
    return load_gemv()


def gemv_fits(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether torch.ops.coreinfer.int8_gemv takes x [M, K] @ q [N, K].T: CPU, few rows, aligned widths,
    coreinfer's CPU int8 layout (bf16 scales), and the operator built for this CPU."""
    return (x.shape[0] <= GEMV_MAX_M and x.is_cpu and x.shape[1] % GEMV_K_ALIGN == 0 and q.shape[0] % GEMV_N_ALIGN == 0
            and q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and gemv_available())
