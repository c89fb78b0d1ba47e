/* One decode token's sparse FFN, fused (AVX512-VNNI): out [M, d] for x [M, d], each row of x on its own:
     a = act(x gate^T) * (x up^T)   (gated)   or   a = act(x up^T + up_bias)   (plain),   a [F]
     chosen = { i : |a_i| * down_norm_i >= threshold }   (no sort: one pass over a)
     out = sum_{i in chosen} a_i * down[i]              (down neuron-major [F, d]: a neuron one row)
   gate/up [F, d] (a neuron a row, blocks along d) come in three formats, told apart by their tensors:
     q8_0: int8 q + fp16 block scales d [F, d/32];   int8: int8 q + a float scale per row rs [F];
     q4:   uint8 q [F, d/2] (nibbles as q4_gemv.cpp) + fp16 d, m [F, d/32].
   down is int8 [F, d] with fp16 block scales [F, d/32] (q8_0) or a float scale per column [d] (int8), or
   q4 [F, d/2] (q4_gemv.cpp's nibbles) with fp16 d, m [F, d/32] (`--weights small`: the file's 4-bit down).
   x is quantized per block of 32 to int8 (x_quant.h), as the dense GEMVs do, so on the superset this op
   computes what q8_0_gemv/q4_gemv/int8_gemv followed by neuron_rows' rows sum compute. The q4 dots are
   q4_gemv.cpp's own (q4_dot.h); the int8 dots follow q8_0_gemv.cpp; gate/up's rows
   stream four at a time (each chunk of x loaded once for four rows), groups split across threads, then down's chosen rows in per-thread shares. Scratch (a,
   the chosen ids, partial sums) is per call on the stack of std::vector: a few KiB, no weight copies. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "q4_dot.h"

enum Act { SILU = 0, RELU = 1, GELU = 2, GELU_TANH = 3 };

static inline float activate(float v, int64_t act) {
    switch (act) {
        case SILU: return v / (1.f + std::exp(-v));
        case RELU: return v > 0 ? v : 0.f;
        case GELU: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
        default: return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

/* One gate/up matrix: q rows [F, K] int8 (or [F, K/2] uint8 for q4) with its scales */
struct Rows {
    const int8_t *q = nullptr;
    const uint16_t *d = nullptr, *m = nullptr;  // fp16 [F, K/32]: block scales (q8_0, q4), mins (q4)
    const float *rs = nullptr;                  // float [F]: row scales (int8)
    bool q4() const { return m != nullptr; }
};

#ifdef COREINFER_VNNI
/* x's two quantized forms for one row: signed-weight order (q8_0, int8) and nibble order (q4) */
struct XQ {
    std::vector<uint8_t> u;
    std::vector<__mmask64> neg;
    std::vector<float> xs;
    std::vector<int8_t> nq;
    std::vector<float> ns, nsum;
};

static inline __m512 pair_scales(const uint16_t *d, int64_t b, bool pair) {
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m128i h = _mm_maskz_loadu_epi16(pair ? 3 : 1, d + b);
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

/* Rows r..r+R-1 of an int8 matrix (block scales d, or none: the row scale rs applies at the end) . x -> out [R] */
template <int R>
static inline void dot_int8(const Rows &w, int64_t r, int64_t K, const XQ &x, float *out) {
    const __m512i z = _mm512_setzero_si512();
    const int8_t *q = w.q + r * K;
    const uint16_t *d = w.d ? w.d + r * (K / 32) : nullptr;
    __m512 f[R];
    for (int i = 0; i < R; i++) f[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K; c += 64) {
        bool full = c + 64 <= K;
        __mmask64 load = full ? ~(__mmask64)0 : ((__mmask64)1 << 32) - 1;
        __m512i xv = _mm512_loadu_si512(&x.u[c]);
        __mmask64 neg = x.neg[c / 64];
        __m512 sx = _mm512_insertf32x8(_mm512_set1_ps(x.xs[c / 32]), _mm256_set1_ps(x.xs[c / 32 + 1]), 1);
        for (int i = 0; i < R; i++) {
            _mm_prefetch((const char *)(q + (R + i) * K + c), _MM_HINT_T0);
            __m512i wv = _mm512_maskz_loadu_epi8(load, q + i * K + c);
            wv = _mm512_mask_sub_epi8(wv, neg, z, wv);
            __m512 s = d ? _mm512_mul_ps(sx, pair_scales(d + i * (K / 32), c / 32, full)) : sx;
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, xv, wv)), s, f[i]);
        }
    }
    for (int i = 0; i < R; i++) out[i] = hsum(f[i]) * (w.rs ? w.rs[r + i] : 1.f);
}

/* Rows r..r+R-1 of a q4 matrix . x (x in nibble order) -> out [R]: q4_gemv.cpp's dots (q4_dot.h) */
template <int R>
static inline void dot_q4(const Rows &w, int64_t r, int64_t K, const XQ &x, float *out) {
    const int64_t B = K / 32;
    q4_dot_rows<R>((const uint8_t *)w.q + r * (K / 2), w.d + r * B, w.m + r * B, K, x.nq.data(), x.ns.data(),
                   x.nsum.data(), out);
}

/* Rows f..f+R-1 of one gate/up matrix . x -> out [R] */
template <int R>
static inline void dots(const Rows &w, int64_t f, int64_t K, const XQ &x, float *out) {
    if (w.q4()) dot_q4<R>(w, f, K, x, out);
    else dot_int8<R>(w, f, K, x, out);
}

/* add_rows for a q4 down (qs [F, K/2], d, m [F, K/32]): per block of 32 columns, a_i (d q + m) =
   (a_i d) q + a_i m; the four rows' a_i m summed once and added to the block's 32 lanes */
static void add_rows_q4(const float *a, const int64_t *chosen, int64_t c0, int64_t c1, const uint8_t *q,
                        const uint16_t *dd, const uint16_t *dm, int64_t K, float *acc) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const int64_t H = K / 2, B = K / 32;
    for (int64_t c = c0; c < c1; c += 4) {
        int n = (int)std::min<int64_t>(4, c1 - c);
        const uint8_t *p[4];
        const uint16_t *s[4], *mn[4];
        float coef[4];
        for (int k = 0; k < 4; k++) {
            int64_t i = chosen[c + (k < n ? k : 0)];  // a short group repeats its first row, with coef 0
            p[k] = q + i * H, s[k] = dd + i * B, mn[k] = dm + i * B, coef[k] = k < n ? a[i] : 0.f;
        }
        for (int64_t k = 0; k < 4 && c + 4 + k < c1; k++)
            for (int64_t j = 0; j < H; j += 64) _mm_prefetch((const char *)(q + chosen[c + 4 + k] * H + j), _MM_HINT_T0);
        for (int64_t b = 0; b < B; b++) {
            __m512 a0 = _mm512_loadu_ps(acc + 32 * b), a1 = _mm512_loadu_ps(acc + 32 * b + 16);
            float msum = 0.f;
            for (int k = 0; k < 4; k++) {
                __m512 cs = _mm512_set1_ps(coef[k] * _cvtsh_ss(s[k][b]));
                msum += coef[k] * _cvtsh_ss(mn[k][b]);
                __m128i w = _mm_loadu_si128((const __m128i *)(p[k] + 16 * b));
                __m128i lo = _mm_and_si128(w, low), hi = _mm_and_si128(_mm_srli_epi16(w, 4), low);
                a0 = _mm512_fmadd_ps(cs, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), a0);
                a1 = _mm512_fmadd_ps(cs, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), a1);
            }
            __m512 mv = _mm512_set1_ps(msum);
            _mm512_storeu_ps(acc + 32 * b, _mm512_add_ps(a0, mv));
            _mm512_storeu_ps(acc + 32 * b + 16, _mm512_add_ps(a1, mv));
        }
    }
}

/* acc [K] += sum over chosen[c0:c1] of a_i * down[i] (down int8 [F, K], block scales dd or none); rows
   four at a time, so that each tile of acc is loaded and stored once per four rows; the next four prefetched */
static void add_rows(const float *a, const int64_t *chosen, int64_t c0, int64_t c1, const int8_t *q,
                     const uint16_t *dd, int64_t K, float *acc) {
    for (int64_t c = c0; c < c1; c += 4) {
        int n = (int)std::min<int64_t>(4, c1 - c);
        const int8_t *p[4];
        const uint16_t *s[4];
        float coef[4];
        for (int k = 0; k < 4; k++) {
            int64_t i = chosen[c + (k < n ? k : 0)];  // a short group repeats its first row, with coef 0
            p[k] = q + i * K, s[k] = dd ? dd + i * (K / 32) : nullptr, coef[k] = k < n ? a[i] : 0.f;
        }
        for (int64_t k = 0; k < 4 && c + 4 + k < c1; k++)
            for (int64_t j = 0; j < K; j += 64) _mm_prefetch((const char *)(q + chosen[c + 4 + k] * K + j), _MM_HINT_T0);
        for (int64_t j = 0; j < K; j += 32) {
            __m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
            for (int k = 0; k < 4; k++) {
                __m512 cs = _mm512_set1_ps(coef[k] * (s[k] ? _cvtsh_ss(s[k][j / 32]) : 1.f));
                __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p[k] + j))));
                __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p[k] + j + 16))));
                a0 = _mm512_fmadd_ps(cs, w0, a0);
                a1 = _mm512_fmadd_ps(cs, w1, a1);
            }
            _mm512_storeu_ps(acc + j, a0);
            _mm512_storeu_ps(acc + j + 16, a1);
        }
    }
}

/* x [M, K] -> out [M, K] (zeroed); F neurons; returns the chosen count of each row into counts [M] */
static void sparse_ffn(const float *x, int64_t M, int64_t K, int64_t F, const Rows *gate, const Rows &up,
                       const float *up_bias, const int8_t *down, const uint16_t *down_d, const uint16_t *down_m,
                       const float *down_scale, const float *norm, float threshold, int64_t act, float *out,
                       int64_t *counts) {
    bool q4 = up.q4() || (gate && gate->q4());
    int64_t Kp = (K + 127) / 128 * 128;
    std::vector<XQ> xq(M);
    for (int64_t m = 0; m < M; m++) {
        XQ &v = xq[m];
        v.u.assign(Kp, 0), v.neg.assign(Kp / 64, 0), v.xs.assign(Kp / 32, 0.f);
        quantize_blocks(x + m * K, K, v.u.data(), v.neg.data(), v.xs.data());
        if (q4) {
            v.nq.assign(Kp, 0), v.ns.assign(Kp / 32, 0.f), v.nsum.assign(Kp / 32, 0.f);
            quantize_nibble_order(x + m * K, K, v.nq.data(), v.ns.data(), v.nsum.data());
        }
    }
    std::vector<float> a(M * F);
    int64_t grain = std::max<int64_t>(1, (1 << 15) / (4 * K));  // a thread's share: at least ~32 KiB of weights
    at::parallel_for(0, (F + 3) / 4, grain, [&](int64_t g0, int64_t g1) {
        float u[4], v[4];
        for (int64_t g = g0; g < g1; g++) {
            int64_t f = 4 * g, n = std::min<int64_t>(4, F - f);
            for (int64_t m = 0; m < M; m++) {
                if (n == 4) {
                    dots<4>(up, f, K, xq[m], u);
                    if (gate) dots<4>(*gate, f, K, xq[m], v);
                } else {
                    for (int64_t i = 0; i < n; i++) {
                        dots<1>(up, f + i, K, xq[m], u + i);
                        if (gate) dots<1>(*gate, f + i, K, xq[m], v + i);
                    }
                }
                for (int64_t i = 0; i < n; i++) {
                    float ui = u[i] + (up_bias ? up_bias[f + i] : 0.f);
                    a[m * F + f + i] = gate ? activate(v[i], act) * ui : activate(ui, act);
                }
            }
        }
    });
    std::vector<int64_t> chosen(F);
    for (int64_t m = 0; m < M; m++) {
        const float *am = &a[m * F];
        int64_t n = 0;
        for (int64_t f = 0; f < F; f++)
            if (std::fabs(am[f]) * norm[f] >= threshold) chosen[n++] = f;
        counts[m] = n;
        float *o = out + m * K;
        int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 32));
        std::vector<float> partial((shares - 1) * K, 0.f);
        at::parallel_for(0, shares, 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; t++) {
                float *acc = t ? &partial[(t - 1) * K] : o;
                if (down_m)
                    add_rows_q4(am, chosen.data(), n * t / shares, n * (t + 1) / shares, (const uint8_t *)down,
                                down_d, down_m, K, acc);
                else
                    add_rows(am, chosen.data(), n * t / shares, n * (t + 1) / shares, down, down_d, K, acc);
            }
        });
        for (int64_t t = 1; t < shares; t++)
            for (int64_t j = 0; j < K; j++) o[j] += partial[(t - 1) * K + j];
        if (down_scale)
            for (int64_t j = 0; j < K; j++) o[j] *= down_scale[j];
    }
}

static bool supported() { return true; }
#else
static void sparse_ffn(const float *, int64_t, int64_t, int64_t, const Rows *, const Rows &, const float *,
                       const int8_t *, const uint16_t *, const uint16_t *, const float *, const float *, float, int64_t,
                       float *, int64_t *) {}
static bool supported() { return false; }
#endif

static const uint16_t *half_ptr(const std::optional<at::Tensor> &t) {
    return t ? reinterpret_cast<const uint16_t *>(t->data_ptr()) : nullptr;
}

/* One gate/up matrix's tensors checked against [F, K] -> its Rows (tensors must outlive the call) */
static Rows rows_of(const char *name, const at::Tensor &q, const std::optional<at::Tensor> &d,
                    const std::optional<at::Tensor> &m, const std::optional<at::Tensor> &rs, int64_t F, int64_t K) {
    bool q4 = q.scalar_type() == at::kByte;
    TORCH_CHECK(q.dim() == 2 && q.size(0) == F && q.size(1) == (q4 ? K / 2 : K) && q.is_contiguous() &&
                    (q4 || q.scalar_type() == at::kChar),
                "coreinfer::sparse_ffn: ", name, " int8 [F, d] or q4 uint8 [F, d / 2], contiguous");
    auto blocks = [&](const std::optional<at::Tensor> &t) {
        return t && t->dim() == 2 && t->size(0) == F && t->size(1) == K / 32 && t->scalar_type() == at::kHalf &&
               t->is_contiguous();
    };
    Rows w;
    w.q = reinterpret_cast<const int8_t *>(q.data_ptr());
    if (q4) {
        TORCH_CHECK(blocks(d) && blocks(m) && !rs, "coreinfer::sparse_ffn: q4 ", name, " needs fp16 d, m [F, d / 32]");
        w.d = half_ptr(d), w.m = half_ptr(m);
    } else if (d) {
        TORCH_CHECK(blocks(d) && !m && !rs, "coreinfer::sparse_ffn: q8_0 ", name, " needs fp16 d [F, d / 32] alone");
        w.d = half_ptr(d);
    } else {
        TORCH_CHECK(rs && rs->numel() == F && rs->scalar_type() == at::kFloat && rs->is_contiguous() && !m,
                    "coreinfer::sparse_ffn: int8 ", name, " needs float row scales [F]");
        w.rs = rs->data_ptr<float>();
    }
    return w;
}

static std::tuple<at::Tensor, at::Tensor> sparse_ffn_op(
    const at::Tensor &x, const std::optional<at::Tensor> &gate_q, const std::optional<at::Tensor> &gate_d,
    const std::optional<at::Tensor> &gate_m, const std::optional<at::Tensor> &gate_rs, const at::Tensor &up_q,
    const std::optional<at::Tensor> &up_d, const std::optional<at::Tensor> &up_m,
    const std::optional<at::Tensor> &up_rs, const std::optional<at::Tensor> &up_bias, const at::Tensor &down_q,
    const std::optional<at::Tensor> &down_d, const std::optional<at::Tensor> &down_m,
    const std::optional<at::Tensor> &down_scale, const at::Tensor &down_norm, double threshold, int64_t act) {
    TORCH_CHECK(supported(), "coreinfer::sparse_ffn needs AVX512-VNNI");
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 16 && x.size(1) % 32 == 0,
                "coreinfer::sparse_ffn: x [M, d] with 1 <= M <= 16, d % 32 == 0");
    TORCH_CHECK(act >= SILU && act <= GELU_TANH, "coreinfer::sparse_ffn: act 0 silu, 1 relu, 2 gelu, 3 gelu tanh");
    int64_t K = x.size(1), F = down_q.size(0);
    bool down_q4 = down_q.scalar_type() == at::kByte;
    TORCH_CHECK(down_q.dim() == 2 && down_q.size(1) == (down_q4 ? K / 2 : K) && down_q.is_contiguous() &&
                    (down_q4 || down_q.scalar_type() == at::kChar),
                "coreinfer::sparse_ffn: down neuron-major, int8 [F, d] or q4 uint8 [F, d / 2], contiguous");
    auto down_blocks = [&](const std::optional<at::Tensor> &t) {
        return t && t->dim() == 2 && t->size(0) == F && t->size(1) == K / 32 && t->scalar_type() == at::kHalf &&
               t->is_contiguous();
    };
    TORCH_CHECK(!down_d || (down_blocks(down_d) && !down_scale),
                "coreinfer::sparse_ffn: down's fp16 block scales [F, d / 32], or else its column scales");
    TORCH_CHECK(down_q4 == (bool)down_m && (!down_q4 || (down_blocks(down_d) && down_blocks(down_m))),
                "coreinfer::sparse_ffn: a q4 down (uint8) needs fp16 d and m [F, d / 32], and only it takes m");
    TORCH_CHECK(down_d || (down_scale && down_scale->numel() == K && down_scale->scalar_type() == at::kFloat &&
                           down_scale->is_contiguous()),
                "coreinfer::sparse_ffn: int8 down needs float column scales [d]");
    TORCH_CHECK(down_norm.numel() == F && down_norm.scalar_type() == at::kFloat && down_norm.is_contiguous(),
                "coreinfer::sparse_ffn: float down_norm [F]");
    TORCH_CHECK(!up_bias || (up_bias->numel() == F && up_bias->scalar_type() == at::kFloat && up_bias->is_contiguous()),
                "coreinfer::sparse_ffn: float up_bias [F]");
    Rows up = rows_of("up", up_q, up_d, up_m, up_rs, F, K), gate;
    if (gate_q) gate = rows_of("gate", *gate_q, gate_d, gate_m, gate_rs, F, K);
    at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor out = at::zeros({x.size(0), K}, xf.options());
    at::Tensor counts = at::zeros({x.size(0)}, xf.options().dtype(at::kLong));
    sparse_ffn(xf.data_ptr<float>(), x.size(0), K, F, gate_q ? &gate : nullptr, up,
               up_bias ? up_bias->data_ptr<float>() : nullptr, reinterpret_cast<const int8_t *>(down_q.data_ptr()),
               half_ptr(down_d), half_ptr(down_m), down_scale ? down_scale->data_ptr<float>() : nullptr, down_norm.data_ptr<float>(), (float)threshold,
               act, out.data_ptr<float>(), counts.data_ptr<int64_t>());
    return {out, counts};
}

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("sparse_ffn(Tensor x, Tensor? gate_q, Tensor? gate_d, Tensor? gate_m, Tensor? gate_rs, Tensor up_q, "
          "Tensor? up_d, Tensor? up_m, Tensor? up_rs, Tensor? up_bias, Tensor down_q, Tensor? down_d, "
          "Tensor? down_m, Tensor? down_scale, Tensor down_norm, float threshold, int act) -> (Tensor, Tensor)");
    m.def("sparse_ffn_supported() -> bool");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) { m.impl("sparse_ffn", &sparse_ffn_op); }
TORCH_LIBRARY_IMPL(coreinfer, CatchAll, m) { m.impl("sparse_ffn_supported", &supported); }
