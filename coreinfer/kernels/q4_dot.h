/* The q4 dot routine shared by q4_gemv.cpp and sparse_ffn.cpp: R weight rows in the q4 format (nibble
   layout and the per-block identity in q4_gemv.cpp's header comment) against one row of x quantized in
   nibble order (x_quant.h). One copy, so the dense GEMV and the fused sparse FFN compute the same dots. */
#pragma once

#include "x_quant.h"

#ifdef COREINFER_VNNI
/* The dots of R weight rows (qs [R, K/2], d, m [R, K/32]) with one row of x in nibble order -> out [R] */
template <int R>
static inline void q4_dot_rows(const uint8_t *qs, const uint16_t *d, const uint16_t *m, int64_t K, const int8_t *xq,
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
#endif
