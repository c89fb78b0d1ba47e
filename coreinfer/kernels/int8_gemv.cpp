/* out [M, N] = x [M, K] @ (q [N, K] * scale[:, None]).T, for decode's few rows of x (AVX512-VNNI).
   Each row of x is quantized to int8 per block of 32 (scale = max |x| / 127, as llama.cpp's Q8_0),
   then dotted with the int8 weight rows by vpdpbusd (u8 x s8 -> s32, four products a lane), x as |x|
   and its signs on the weights (x_quant.h), so no offset correction is needed. A 64-byte chunk holds
   two blocks (lanes 0-7 and 8-15): each chunk's s32 lanes are converted and scaled into a float
   accumulator per weight row. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "x_quant.h"

#ifdef COREINFER_VNNI
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
