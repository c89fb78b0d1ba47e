/* Weighted sums of neuron-major rows: out [M, dm] = coef [M, R] @ W[rows] for a down projection stored as
   W [F, dm] (F = FFN width, a neuron one contiguous row), rows int64 [R] or none (R == F, in order): the
   down projection of a compacted FFN, or of one token's refined rows, read in place without a gather.
     int8_rows: W = q [F, dm] int8 times scale [dm] (per output channel, applied once at the end);
     q8_0_rows: W[f, j] = d[f, j / 32] * qs[f, j] (blocks along dm);
     q4_rows: W[f, j] = d[f, j / 32] * q[f, j] + m[f, j / 32], q in 0..15 packed two a byte as in q4_gemv.cpp.
   Threads take contiguous shares of the rows, each into its own partial sum of out (added at the end).
   Within a share, a tile of columns of out for every m stays in L1 while the rows stream through it four
   at a time, widened to float (int8 or nibbles -> f32) and multiply-added with their coefficients; the next four
   rows' tiles are prefetched (chosen rows are scattered: the hardware prefetcher cannot guess them). */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "x_quant.h"

/* Where a row's weights lie: int8 (d null: int8_rows; else q8_0's block scales d [F, dm / 32]) or q4
   (nibbles qs [F, dm / 2], block scale d and min m [F, dm / 32]) */
struct Rows {
    const int8_t *q;
    const uint8_t *qs;
    const uint16_t *d, *m;
    int64_t dm;
    const int64_t *rows;
    const char *at(int64_t f, int64_t j) const {  // the byte of entry j of row f
        return qs ? (const char *)(qs + f * (dm / 2) + j / 2) : (const char *)(q + f * dm + j);
    }
};

#ifdef COREINFER_VNNI
/* Entries j..j+31 of row f as floats (w0: j..j+15, w1: j+16..j+31), without the q4 min */
static inline void load_block(const Rows &W, int64_t f, int64_t j, __m512 *w0, __m512 *w1) {
    if (W.qs) {  // 16 bytes: low nibbles are entries 0-15 of the block, high nibbles 16-31
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)W.at(f, j)));
        *w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
        *w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        return;
    }
    const int8_t *p = W.q + f * W.dm + j;
    *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
}

/* acc [M, dm] += coef[:, r0:r1] @ W[rows[r0:r1]]. Columns go in chunks of 16 blocks (512 entries): the
   chunk's 16 block scales (and q4 mins) of a row are one fp16 vector, turned into the products with the
   row's coefficients once per chunk, so the inner loop over blocks only broadcasts them from L1. */
static void add_rows(const float *coef, int64_t M, int64_t R, int64_t r0, int64_t r1, const Rows &W, float *acc) {
    const int64_t dm = W.dm, B = dm / 32;
    int64_t T = std::min<int64_t>(dm, std::max<int64_t>(512, 4096 / M / 512 * 512));  // M * T floats: 16 KiB
    auto row = [&](int64_t r) { return W.rows ? W.rows[r] : r; };
    alignas(64) float c[4][16][16], cm[16][16];  // [k][m][b]: coef[m, r + k] * scale of block b; [m][b]: the mins' sum
    for (int64_t j0 = 0; j0 < dm; j0 += T) {
        int64_t j1 = std::min(dm, j0 + T);
        for (int64_t r = r0; r < r1; r += 4) {
            int64_t n = std::min<int64_t>(4, r1 - r), f[4];
            for (int k = 0; k < 4; k++) f[k] = row(r + (k < n ? k : 0));  // short group: row r again, coef 0
            for (int64_t k = 0; k < 4 && r + 4 + k < r1; k++)
                for (int64_t j = j0; j < j1; j += W.qs ? 128 : 64)
                    _mm_prefetch(W.at(row(r + 4 + k), j), _MM_HINT_T0);
            for (int64_t j = j0; j < j1; j += 512) {
                int64_t nb = std::min<int64_t>(16, (j1 - j) / 32);
                __mmask16 blocks = (__mmask16)((1u << nb) - 1);
                __m512 mv[4];
                for (int k = 0; k < 4; k++) {
                    __m512 dv = W.d ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(blocks, W.d + f[k] * B + j / 32))
                                    : _mm512_set1_ps(1.f);
                    mv[k] = W.m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(blocks, W.m + f[k] * B + j / 32))
                                : _mm512_setzero_ps();
                    for (int64_t m = 0; m < M; m++)
                        _mm512_store_ps(c[k][m], _mm512_mul_ps(_mm512_set1_ps(k < n ? coef[m * R + r + k] : 0.f), dv));
                }
                for (int64_t m = 0; m < M; m++) {
                    __m512 s = _mm512_setzero_ps();
                    for (int k = 0; k < 4; k++) s = _mm512_fmadd_ps(_mm512_set1_ps(k < n ? coef[m * R + r + k] : 0.f), mv[k], s);
                    _mm512_store_ps(cm[m], s);
                }
                for (int64_t b = 0; b < nb; b++) {
                    __m512 w[4][2];
                    for (int k = 0; k < 4; k++) load_block(W, f[k], j + 32 * b, &w[k][0], &w[k][1]);
                    for (int64_t m = 0; m < M; m++) {
                        float *a = acc + m * dm + j + 32 * b;
                        __m512 a0 = _mm512_add_ps(_mm512_loadu_ps(a), _mm512_set1_ps(cm[m][b]));
                        __m512 a1 = _mm512_add_ps(_mm512_loadu_ps(a + 16), _mm512_set1_ps(cm[m][b]));
                        for (int k = 0; k < 4; k++) {
                            __m512 ck = _mm512_set1_ps(c[k][m][b]);
                            a0 = _mm512_fmadd_ps(ck, w[k][0], a0);
                            a1 = _mm512_fmadd_ps(ck, w[k][1], a1);
                        }
                        _mm512_storeu_ps(a, a0);
                        _mm512_storeu_ps(a + 16, a1);
                    }
                }
            }
        }
    }
}

/* out [M, dm] (zeroed) = coef [M, R] @ W[rows], times scale [dm] where scale is not null */
static void rows_sum(const float *coef, int64_t M, int64_t R, const Rows &W, const float *scale, float *out) {
    const int64_t dm = W.dm;
    int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / 32));
    std::vector<float> partial((shares - 1) * M * dm, 0.f);
    at::parallel_for(0, shares, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++)
            add_rows(coef, M, R, R * t / shares, R * (t + 1) / shares, W, t ? &partial[(t - 1) * M * dm] : out);
    });
    for (int64_t t = 1; t < shares; t++)
        for (int64_t i = 0; i < M * dm; i++) out[i] += partial[(t - 1) * M * dm + i];
    if (scale)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < dm; j++) out[m * dm + j] *= scale[j];
}

static bool supported() { return true; }
#else
static void rows_sum(const float *, int64_t, int64_t, const Rows &, const float *, float *) {}
static bool supported() { return false; }
#endif

/* The checks both operators share -> rows' data (null for all rows in order) */
static const int64_t *checked_rows(const char *op, const at::Tensor &coef, const at::Tensor &q,
                                   const std::optional<at::Tensor> &rows, at::Tensor &rows_c) {
    TORCH_CHECK(supported(), "coreinfer::", op, " needs AVX512-VNNI");
    TORCH_CHECK(coef.dim() == 2 && q.dim() == 2 && coef.size(0) >= 1 && coef.size(0) <= 16,
                "coreinfer::", op, ": coef [M, R] with 1 <= M <= 16, weights [F, ...]");
    if (!rows.has_value()) {
        TORCH_CHECK(coef.size(1) == q.size(0), "coreinfer::", op, ": without rows, coef [M, F]");
        return nullptr;
    }
    TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->numel() == coef.size(1),
                "coreinfer::", op, ": rows int64 [R] for coef [M, R]");
    rows_c = rows->contiguous();
    const int64_t *p = rows_c.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows_c.numel(); r++)
        TORCH_CHECK(p[r] >= 0 && p[r] < q.size(0), "coreinfer::", op, ": row ", p[r], " outside 0..", q.size(0) - 1);
    return p;
}

static at::Tensor int8_rows(const at::Tensor &coef, const at::Tensor &q, const at::Tensor &scale,
                            const std::optional<at::Tensor> &rows) {
    at::Tensor rows_c;
    const int64_t *r = checked_rows("int8_rows", coef, q, rows, rows_c);
    TORCH_CHECK(q.scalar_type() == at::kChar && q.size(1) % 32 == 0 && scale.numel() == q.size(1),
                "coreinfer::int8_rows: int8 q [F, dm], dm % 32 == 0, scale [dm]");
    at::Tensor cf = coef.to(at::kFloat).contiguous(), qc = q.contiguous(), sc = scale.to(at::kFloat).contiguous();
    at::Tensor out = at::zeros({coef.size(0), q.size(1)}, cf.options());
    rows_sum(cf.data_ptr<float>(), coef.size(0), coef.size(1), Rows{qc.data_ptr<int8_t>(), nullptr, nullptr, nullptr, q.size(1), r},
             sc.data_ptr<float>(), out.data_ptr<float>());
    return out;
}

static at::Tensor q8_0_rows(const at::Tensor &coef, const at::Tensor &qs, const at::Tensor &d,
                            const std::optional<at::Tensor> &rows) {
    at::Tensor rows_c;
    const int64_t *r = checked_rows("q8_0_rows", coef, qs, rows, rows_c);
    TORCH_CHECK(qs.scalar_type() == at::kChar && qs.size(1) % 32 == 0, "coreinfer::q8_0_rows: int8 qs [F, dm], dm % 32 == 0");
    TORCH_CHECK(d.dim() == 2 && d.size(0) == qs.size(0) && d.size(1) == qs.size(1) / 32 && d.scalar_type() == at::kHalf,
                "coreinfer::q8_0_rows: float16 d [F, dm / 32]");
    at::Tensor cf = coef.to(at::kFloat).contiguous(), qc = qs.contiguous(), dc = d.contiguous();
    at::Tensor out = at::zeros({coef.size(0), qs.size(1)}, cf.options());
    rows_sum(cf.data_ptr<float>(), coef.size(0), coef.size(1),
             Rows{qc.data_ptr<int8_t>(), nullptr, reinterpret_cast<const uint16_t *>(dc.data_ptr()), nullptr, qs.size(1), r},
             nullptr, out.data_ptr<float>());
    return out;
}

static at::Tensor q4_rows(const at::Tensor &coef, const at::Tensor &qs, const at::Tensor &d, const at::Tensor &m,
                          const std::optional<at::Tensor> &rows) {
    at::Tensor rows_c;
    const int64_t *r = checked_rows("q4_rows", coef, qs, rows, rows_c);
    int64_t dm = qs.size(1) * 2;
    TORCH_CHECK(qs.scalar_type() == at::kByte && dm % 32 == 0 && d.dim() == 2 && d.size(0) == qs.size(0) &&
                    d.size(1) == dm / 32 && d.scalar_type() == at::kHalf && m.sizes() == d.sizes() &&
                    m.scalar_type() == at::kHalf,
                "coreinfer::q4_rows: uint8 qs [F, dm / 2], float16 d and m [F, dm / 32], dm % 32 == 0");
    at::Tensor cf = coef.to(at::kFloat).contiguous(), qc = qs.contiguous(), dc = d.contiguous(), mc = m.contiguous();
    at::Tensor out = at::zeros({coef.size(0), dm}, cf.options());
    rows_sum(cf.data_ptr<float>(), coef.size(0), coef.size(1),
             Rows{nullptr, qc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t *>(dc.data_ptr()),
                  reinterpret_cast<const uint16_t *>(mc.data_ptr()), dm, r},
             nullptr, out.data_ptr<float>());
    return out;
}

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("int8_rows(Tensor coef, Tensor q, Tensor scale, Tensor? rows) -> Tensor");
    m.def("q8_0_rows(Tensor coef, Tensor qs, Tensor d, Tensor? rows) -> Tensor");
    m.def("q4_rows(Tensor coef, Tensor qs, Tensor d, Tensor m, Tensor? rows) -> Tensor");
    m.def("neuron_rows_supported() -> bool");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) {
    m.impl("int8_rows", &int8_rows);
    m.impl("q8_0_rows", &q8_0_rows);
    m.impl("q4_rows", &q4_rows);
}
TORCH_LIBRARY_IMPL(coreinfer, CatchAll, m) { m.impl("neuron_rows_supported", &supported); }
