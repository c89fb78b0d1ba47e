/* ctypes kernels (no torch headers: builds in about a second): the float32 weighted row sum of per-token
   refinement and the int8 column gather of compaction (engine/native.py calls them). */
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
