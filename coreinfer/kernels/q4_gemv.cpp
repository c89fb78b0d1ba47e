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

#include "q4_dot.h"

#ifdef COREINFER_VNNI
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
                    q4_dot_rows<4>(qs + n * (K / 2), d + n * B, m + n * B, K, xi, si, ti, dots);
                    for (int r = 0; r < 4; r++) out[i * N + n + r] = dots[r];
                } else {
                    for (int64_t r = n; r < N; r++) {
                        q4_dot_rows<1>(qs + r * (K / 2), d + r * B, m + r * B, K, xi, si, ti, dots);
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
