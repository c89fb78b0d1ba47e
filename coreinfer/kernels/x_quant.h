/* The activation side of the int8 dot products: rows of x quantized per block of 32 to int8, as llama.cpp's
   Q8_0 (scale s_b = max |x_b| / 127, round half to even). kernels/*.py have the same arithmetic in PyTorch. */
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define COREINFER_VNNI 1
#include <immintrin.h>

/* One block of 32 entries of x (zeros past K) -> its scale and its two halves quantized to int32 lanes */
static inline float quantize_block(const float *x, int64_t j, int64_t K, __m512i *q0, __m512i *q1) {
    __m512 v0 = _mm512_setzero_ps(), v1 = v0;
    if (j + 16 <= K) v0 = _mm512_loadu_ps(x + j);
    if (j + 32 <= K) v1 = _mm512_loadu_ps(x + j + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    __m512 inv = _mm512_set1_ps(amax > 0 ? 127.f / amax : 0.f);
    *q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    *q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    return amax / 127.f;
}

/* x [K] -> u [Kp] = |round(x / s_b)| (zero past K), neg [Kp / 64] (a bit per negative entry), xs [Kp / 32]
   = s_b (zero past K) for each block b of 32; Kp = K rounded up to 64, K % 16 == 0. vpdpbusd wants one
   operand unsigned: x goes in as |x| and its signs move onto signed weights (a masked negate). */
static void quantize_blocks(const float *x, int64_t K, uint8_t *u, __mmask64 *neg, float *xs) {
    int64_t Kp = (K + 63) / 64 * 64;
    for (int64_t b = 0; b < Kp / 32; b++) {
        __m512i q0, q1;
        int64_t j = b * 32;
        xs[b] = quantize_block(x, j, K, &q0, &q1);
        _mm_storeu_si128((__m128i *)(u + j), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q0)));
        _mm_storeu_si128((__m128i *)(u + j + 16), _mm512_cvtepi32_epi8(_mm512_abs_epi32(q1)));
        uint64_t bits = (uint64_t)_mm512_movepi32_mask(q0) | (uint64_t)_mm512_movepi32_mask(q1) << 16;
        if (b % 2 == 0) neg[b / 2] = bits; else neg[b / 2] |= bits << 32;
    }
}

/* x [K] (K % 32 == 0) -> signed int8 in the nibble order of q4 weights, for unsigned 4-bit weights:
   per group g of four blocks, lo [64] holds entries 0-15 of each block and hi [64] entries 16-31
   (xq [Kp * 2 / 2]: lo then hi per group, Kp = K rounded up to 128, zeros past K); xs [Kp / 32] = s_b
   and xsum [Kp / 32] = s_b * sum of the block's quantized entries (the term the weights' min multiplies). */
static void quantize_nibble_order(const float *x, int64_t K, int8_t *xq, float *xs, float *xsum) {
    int64_t Kp = (K + 127) / 128 * 128;
    for (int64_t b = 0; b < Kp / 32; b++) {
        __m512i q0, q1;
        xs[b] = quantize_block(x, b * 32, K, &q0, &q1);
        xsum[b] = xs[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        int8_t *lo = xq + (b / 4) * 128 + (b % 4) * 16;
        _mm_storeu_si128((__m128i *)lo, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(lo + 64), _mm512_cvtepi32_epi8(q1));
    }
}

/* The 16 float lanes of one dot product chunk, summed */
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif
