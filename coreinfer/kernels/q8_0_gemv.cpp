/* out [M, N] = x [M, K] @ W.T for q8_0 weights W[n, k] = d[n, k / 32] * qs[n, k] (AVX512-VNNI), M <= 16.
   As int8_gemv.cpp: each row of x quantized per block of 32 (x_quant.h), u8 x s8 dots by vpdpbusd, a
   64-byte chunk = two blocks (s32 lanes 0-7 and 8-15), scaled by x's and the weight's block scales into
   one float accumulator per weight row. Rows come four at a time, the next four prefetched; a weight of
   -128 would lose its sign in the negate (GGUF's Q8_0 quantizer writes -127..127). */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "x_quant.h"

#ifdef COREINFER_VNNI
/* The fp16 scales of blocks b, b + 1 of one row -> lanes 0-7 and 8-15 (one block alone where pair == 1) */
static inline __m512 block_pair_scales(const uint16_t *d, int64_t b, bool pair) {
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m128i h = _mm_maskz_loadu_epi16(pair ? 3 : 1, d + b);
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

/* The dots of R weight rows (qs [R, K], d [R, K / 32]) with one quantized row of x -> out [R] */
template <int R>
static inline void dot_rows(const int8_t *q, const uint16_t *d, int64_t K, const uint8_t *u, const __mmask64 *neg,
                            const float *xs, float *out) {
    const __m512i z = _mm512_setzero_si512();
    const int64_t B = K / 32;
    __m512 f[R];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64) {
        bool full = c + 64 <= K;  // else one block of 32 is left
        __mmask64 load = full ? ~(__mmask64)0 : ((__mmask64)1 << 32) - 1;
        __m512i x = _mm512_loadu_si512(u + c);
        __mmask64 m = neg[c / 64];
        __m512 sx = _mm512_insertf32x8(_mm512_set1_ps(xs[c / 32]), _mm256_set1_ps(xs[c / 32 + 1]), 1);
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(q + (R + r) * K + c), _MM_HINT_T0);
            __m512i w = _mm512_maskz_loadu_epi8(load, q + r * K + c);
            w = _mm512_mask_sub_epi8(w, m, z, w);
            __m512 s = _mm512_mul_ps(sx, block_pair_scales(d + r * B, c / 32, full));
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, x, w)), s, f[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(f[r]);
}

/* x [M, K] f32, qs [N, K] int8, d [N, K / 32] fp16 -> out [M, N]; threads take contiguous shares of
   the groups of four rows, each group meets every row of x while in L1. */
static void gemv(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *out) {
    int64_t Kp = (K + 63) / 64 * 64, B = K / 32;
    std::vector<uint8_t> u(M * Kp);
    std::vector<__mmask64> neg(M * (Kp / 64));
    std::vector<float> xs(M * (Kp / 32));
    for (int64_t i = 0; i < M; i++)
        quantize_blocks(x + i * K, K, &u[i * Kp], &neg[i * (Kp / 64)], &xs[i * (Kp / 32)]);
    int64_t grain = std::max<int64_t>(1, (1 << 15) / (4 * K));  // a thread's share: at least 32 KiB of weights
    at::parallel_for(0, (N + 3) / 4, grain, [&](int64_t g0, int64_t g1) {
        float dots[4];
        for (int64_t g = g0; g < g1; g++) {
            int64_t n = 4 * g;
            for (int64_t i = 0; i < M; i++) {
                const uint8_t *ui = &u[i * Kp];
                const __mmask64 *ni = &neg[i * (Kp / 64)];
                const float *si = &xs[i * (Kp / 32)];
                if (n + 4 <= N) {
                    dot_rows<4>(qs + n * K, d + n * B, K, ui, ni, si, dots);
                    for (int r = 0; r < 4; r++) out[i * N + n + r] = dots[r];
                } else {
                    for (int64_t r = n; r < N; r++) {
                        dot_rows<1>(qs + r * K, d + r * B, K, ui, ni, si, dots);
                        out[i * N + r] = dots[0];
                    }
                }
            }
        }
    });
}

static bool supported() { return true; }
#else
static void gemv(const float *, int64_t, int64_t, const int8_t *, const uint16_t *, int64_t, float *) {}
static bool supported() { return false; }
#endif

static at::Tensor q8_0_gemv(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d) {
    TORCH_CHECK(supported(), "coreinfer::q8_0_gemv needs AVX512-VNNI");
    TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && x.size(1) == qs.size(1) && qs.size(1) % 32 == 0 &&
                    d.dim() == 2 && d.size(0) == qs.size(0) && d.size(1) == qs.size(1) / 32,
                "coreinfer::q8_0_gemv: x [M, K], qs [N, K], d [N, K / 32], K % 32 == 0");
    TORCH_CHECK(qs.scalar_type() == at::kChar && d.scalar_type() == at::kHalf,
                "coreinfer::q8_0_gemv: int8 qs, float16 d");
    at::Tensor xf = x.to(at::kFloat).contiguous(), qc = qs.contiguous(), dc = d.contiguous();
    at::Tensor out = at::empty({x.size(0), qs.size(0)}, xf.options());
    gemv(xf.data_ptr<float>(), x.size(0), x.size(1), qc.data_ptr<int8_t>(),
         reinterpret_cast<const uint16_t *>(dc.data_ptr()), qs.size(0), out.data_ptr<float>());
    return out;
}

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("q8_0_gemv(Tensor x, Tensor qs, Tensor d) -> Tensor");
    m.def("q8_0_gemv_supported() -> bool");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) { m.impl("q8_0_gemv", &q8_0_gemv); }
TORCH_LIBRARY_IMPL(coreinfer, CatchAll, m) { m.impl("q8_0_gemv_supported", &supported); }
