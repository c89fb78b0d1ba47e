/* out [M, N] = x [M, K] @ W.T for q4 weights W[n, k] = d[n, b] * q[n, k] + m[n, b], b = k / 32, q in 0..15
   (qs [N, K/2]: byte 16 b + i holds q[32 b + i] in its low nibble and q[32 b + 16 + i] in its high one),
   M <= 16, AVX512-VNNI. The weights are the unsigned operand of vpdpbusd as they are (no sign trick), x
   the signed one, quantized per block of 32 into the nibbles' order (x_quant.h). A 64-byte chunk of qs is
   four blocks: its low nibbles against x's entries 0-15 of each block, its high nibbles against 16-31,
   both dots into the same s32 lanes (lanes 4b'..4b'+3 for block b' of the four). Per block:
   sum_k W x = d s_x (q . x_q) + m s_x (sum x_q), the second term a 4-lane dot of m with x's block sums.
   Rows come four at a time, the next four prefetched (the template is int8_gemv.cpp). */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "x_quant.h"

#ifdef COREINFER_VNNI
/* The dots of R weight rows (qs [R, K/2], d, m [R, K/32]) with one row of x in nibble order -> out [R] */
template <int R>
static inline void dot_rows(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t K, const int8_t *xq,
                            const float *xs, const float *xsum, float *out) {
    const __m512i z = _mm512_setzero_si512(), low = _mm512_set1_epi8(0x0F);
    const __m512i quarters = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const int64_t B = K / 32, H = K / 2;
    __m512 f[R];
    __m128 fm[R];
    for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps(), fm[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < B; b += 4) {
        int64_t nb = B - b < 4 ? B - b : 4;  // blocks in this chunk
        __mmask64 bytes = nb == 4 ? ~(__mmask64)0 : ((__mmask64)1 << 16 * nb) - 1;
        __mmask8 blocks = (__mmask8)((1 << nb) - 1);
        __m512i xlo = _mm512_loadu_si512(xq + b * 32), xhi = _mm512_loadu_si512(xq + b * 32 + 64);
        __m128 sx = _mm_loadu_ps(xs + b), sum = _mm_loadu_ps(xsum + b);
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(qs + (R + r) * H + b * 16), _MM_HINT_T0);
            __m512i w = _mm512_maskz_loadu_epi8(bytes, qs + r * H + b * 16);
            __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo, xlo), hi, xhi);
            __m128 dv = _mm_cvtph_ps(_mm_maskz_loadu_epi16(blocks, d + r * B + b));
            __m128 mv = _mm_cvtph_ps(_mm_maskz_loadu_epi16(blocks, m + r * B + b));
            __m512 s = _mm512_permutexvar_ps(quarters, _mm512_castps128_ps512(_mm_mul_ps(dv, sx)));
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, f[r]);
            fm[r] = _mm_fmadd_ps(mv, sum, fm[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(_mm512_add_ps(f[r], _mm512_castps128_ps512(fm[r])));
}

/* x [M, K] f32, qs [N, K/2] u8, d, m [N, K/32] fp16 -> out [M, N]; threads take contiguous shares of
   the groups of four rows, each group meets every row of x while in L1. */
static void gemv(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *d, const uint16_t *m,
                 int64_t N, float *out) {
    int64_t Kp = (K + 127) / 128 * 128, B = K / 32;
    std::vector<int8_t> xq(M * Kp);
    std::vector<float> xs(M * (Kp / 32)), xsum(M * (Kp / 32));
    for (int64_t i = 0; i < M; i++)
        quantize_nibble_order(x + i * K, K, &xq[i * Kp], &xs[i * (Kp / 32)], &xsum[i * (Kp / 32)]);
    int64_t grain = std::max<int64_t>(1, (1 << 15) / (2 * K));  // a thread's share: at least 32 KiB of weights
    at::parallel_for(0, (N + 3) / 4, grain, [&](int64_t g0, int64_t g1) {
        float dots[4];
        for (int64_t g = g0; g < g1; g++) {
            int64_t n = 4 * g;
            for (int64_t i = 0; i < M; i++) {
                const int8_t *xi = &xq[i * Kp];
                const float *si = &xs[i * (Kp / 32)], *ti = &xsum[i * (Kp / 32)];
                if (n + 4 <= N) {
                    dot_rows<4>(qs + n * (K / 2), d + n * B, m + n * B, K, xi, si, ti, dots);
                    for (int r = 0; r < 4; r++) out[i * N + n + r] = dots[r];
                } else {
                    for (int64_t r = n; r < N; r++) {
                        dot_rows<1>(qs + r * (K / 2), d + r * B, m + r * B, K, xi, si, ti, dots);
                        out[i * N + r] = dots[0];
                    }
                }
            }
        }
    });
}

static bool supported() { return true; }
#else
static void gemv(const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, const uint16_t *, int64_t,
                 float *) {}
static bool supported() { return false; }
#endif

static at::Tensor q4_gemv(const at::Tensor &x, const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m) {
    TORCH_CHECK(supported(), "coreinfer::q4_gemv needs AVX512-VNNI");
    int64_t K = x.size(-1);
    TORCH_CHECK(x.dim() == 2 && qs.dim() == 2 && K % 32 == 0 && qs.size(1) == K / 2 && d.dim() == 2 &&
                    d.size(0) == qs.size(0) && d.size(1) == K / 32 && m.sizes() == d.sizes(),
                "coreinfer::q4_gemv: x [M, K], qs [N, K / 2], d and m [N, K / 32], K % 32 == 0");
    TORCH_CHECK(qs.scalar_type() == at::kByte && d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
                "coreinfer::q4_gemv: uint8 qs, float16 d and m");
    at::Tensor xf = x.to(at::kFloat).contiguous(), qc = qs.contiguous(), dc = d.contiguous(), mc = m.contiguous();
    at::Tensor out = at::empty({x.size(0), qs.size(0)}, xf.options());
    gemv(xf.data_ptr<float>(), x.size(0), K, qc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t *>(dc.data_ptr()),
         reinterpret_cast<const uint16_t *>(mc.data_ptr()), qs.size(0), out.data_ptr<float>());
    return out;
}

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("q4_gemv(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
    m.def("q4_gemv_supported() -> bool");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) { m.impl("q4_gemv", &q4_gemv); }
TORCH_LIBRARY_IMPL(coreinfer, CatchAll, m) { m.impl("q4_gemv_supported", &supported); }
