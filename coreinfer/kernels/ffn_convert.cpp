/* A GGUF FFN's blocks -> the staging FFN's formats, for the CPU memory-limited mode's prefill
   (engine/ffn_file.py), which converts every FFN of the model once per prompt.

   q4k_to_q4:  Q4_K rows [N, K / 256 * 144] -> q4 (qs [N, K / 2] u8, d and m [N, K / 32] fp16): each
               32-wide sub-block is q4 already, W = (d_super * sc) * q - (dmin * mn); only the nibbles
               are reordered and the scale and min rounded to fp16 (formats/q4.py's from_blocks).
   to_q8_0_t:  R file rows of down ([R, F] in Q4_K, Q6_K or Q8_0; file row r is output column c0 + r)
               -> columns c0..c0 + R of the neuron-major q8_0 down (qs [F, d] s8, d [F, d / 32] fp16):
               dequantize, transpose, requantize per 32 along d (formats/q8_0.py's pack).

   Both reproduce the PyTorch path bit for bit (tests/test_residency.py): fp32 products rounded one by
   one as torch's elementwise ops round them (no fused multiply-add), d = amax / 127, q = sign(x) *
   floor(|x| + 0.5) against the reciprocal of d, fp16 rounded to nearest even. Plain C++: the compiler
   vectorizes it; the conversion is bound by the 8 MB chunk's cache traffic, not by arithmetic. */
#pragma GCC optimize("fp-contract=off")
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t QK_K = 256;
enum Kind : int64_t { Q8_0 = 8, Q4_K = 12, Q6_K = 14 };  // gguf's GGMLQuantizationType codes

inline float f16(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

inline uint16_t half_bits(float x) { return c10::Half(x).x; }

/* ggml's get_scale_min_k4: sub-block j's 6-bit scale and min from a Q4_K super-block's 12 bytes */
inline void scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* One Q4_K super-block (144 bytes) -> 256 floats, as formats/ggml.py's _q4_k: (d sc) q - (dmin mn) */
void q4_k_floats(const uint8_t *b, float *out) {
    float d = f16(b), dmin = f16(b + 2);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, mn;
        scale_min(b + 4, j, &sc, &mn);
        float scale = d * float(sc), min = dmin * float(mn);
        const uint8_t *q = b + 16 + 32 * (j / 2);
        int shift = 4 * (j % 2);
        for (int i = 0; i < 32; i++) {
            float p = scale * float((q[i] >> shift) & 0xF);
            out[32 * j + i] = p - min;
        }
    }
}

/* One Q6_K super-block (210 bytes: ql 128, qh 64, int8 scales 16, fp16 d) -> 256 floats (ggml's
   dequantize_row_q6_K): halves of 128 weights, each 4 runs r of 32 from ql's nibbles and qh's bit pairs.
   Run by run, 16 weights of one scale a loop, so that the loop's shifts are uniform and it vectorizes
   (weight by weight with the 4 runs interleaved: 81 ms a 7B down layer in benchmarks/ffn_convert.py, 37 so) */
void q6_k_floats(const uint8_t *b, float *out) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = reinterpret_cast<const int8_t *>(b + 192);
    float d = f16(b + 208);
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, out += 128) {
        for (int r = 0; r < 4; r++) {
            const uint8_t *l = ql + 32 * (r % 2);
            int lshift = 4 * (r / 2), hshift = 2 * r;
            for (int i0 = 0; i0 < 32; i0 += 16) {
                float scale = d * float(sc[2 * r + i0 / 16]);
                for (int i = i0; i < i0 + 16; i++)
                    out[32 * r + i] = scale * float((((l[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32);
            }
        }
    }
}

/* 32 Q8_0 blocks (34 bytes each) -> 256 floats */
void q8_0_floats(const uint8_t *b, float *out) {
    for (int k = 0; k < 8; k++, b += 34) {
        float d = f16(b);
        for (int i = 0; i < 32; i++) out[32 * k + i] = d * float(reinterpret_cast<const int8_t *>(b + 2)[i]);
    }
}

int64_t block_bytes(int64_t kind) { return kind == Q4_K ? 144 : kind == Q6_K ? 210 : 8 * 34; }

void floats(int64_t kind, const uint8_t *b, float *out) {
    if (kind == Q4_K) q4_k_floats(b, out);
    else if (kind == Q6_K) q6_k_floats(b, out);
    else q8_0_floats(b, out);
}

/* 32 floats -> one q8_0 block (formats/q8_0.py's pack) */
inline void q8_0_block(const float *x, int8_t *qs, uint16_t *d) {
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = std::fmax(amax, std::fabs(x[i]));
    float s = amax / 127.f;
    float inv = s == 0.f ? 0.f : 1.f / s;
    for (int i = 0; i < 32; i++) {
        float v = x[i] * inv;
        float r = std::floor(std::fabs(v) + 0.5f);
        r = std::fmin(r, 127.f);
        qs[i] = static_cast<int8_t>(v < 0 ? -r : r);
    }
    *d = half_bits(s);
}

#ifdef __AVX512VBMI__
/* The tile w [32 columns c..c + 32][256 neurons n0..] -> those neurons' q8_0 blocks at column c: the
   scalar q8_0_block's arithmetic 16 neurons a vector (lanes are neurons, so amax is a vertical max and
   nothing is transposed as floats), then the int8 tile t [32][256] transposed into [256][32]: 4 neurons'
   bytes of all 32 columns gathered as int32 (128 bytes [column][neuron]), one byte permute each pair. */
void q8_0_tile(const float (*w)[QK_K], int8_t *q, uint16_t *dd, int64_t n0, int64_t D, int64_t c) {
    alignas(64) int8_t t[32][QK_K];
    alignas(64) uint16_t sd[QK_K];
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff)), zero = _mm512_setzero_ps();
    for (int f = 0; f < QK_K; f += 16) {
        __m512 amax = zero;
        for (int r = 0; r < 32; r++) amax = _mm512_max_ps(amax, _mm512_and_ps(_mm512_load_ps(w[r] + f), absmask));
        __m512 s = _mm512_div_ps(amax, _mm512_set1_ps(127.f));
        __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s, zero, _CMP_NEQ_UQ), _mm512_set1_ps(1.f), s);
        _mm256_store_si256(reinterpret_cast<__m256i *>(sd + f),
                           _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        for (int r = 0; r < 32; r++) {
            __m512 v = _mm512_mul_ps(_mm512_load_ps(w[r] + f), inv);
            __m512 a = _mm512_floor_ps(_mm512_add_ps(_mm512_and_ps(v, absmask), _mm512_set1_ps(0.5f)));
            __m512i i = _mm512_cvttps_epi32(_mm512_min_ps(a, _mm512_set1_ps(127.f)));  // whole already
            i = _mm512_mask_sub_epi32(i, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), _mm512_setzero_si512(), i);
            _mm_store_si128(reinterpret_cast<__m128i *>(t[r] + f), _mm512_cvtepi32_epi8(i));
        }
    }
    // byte j of a neuron pair's 64: neuron j / 32 of the pair, column j % 32, at 4 column + neuron in the 128
    alignas(64) uint8_t lo[64], hi[64];
    for (int j = 0; j < 64; j++) lo[j] = 4 * (j % 32) + j / 32, hi[j] = lo[j] + 2;
    const __m512i pick_lo = _mm512_load_si512(lo), pick_hi = _mm512_load_si512(hi);
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(QK_K / 4));
    for (int k = 0; k < QK_K / 4; k++) {  // neurons 4k .. 4k + 4
        __m512i a = _mm512_i32gather_epi32(rows, reinterpret_cast<const int *>(t[0]) + k, 4);   // columns 0..15
        __m512i b = _mm512_i32gather_epi32(rows, reinterpret_cast<const int *>(t[16]) + k, 4);  // 16..31
        __m512i p[2] = {_mm512_permutex2var_epi8(a, pick_lo, b), _mm512_permutex2var_epi8(a, pick_hi, b)};
        for (int h = 0; h < 4; h++)
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(q + (n0 + 4 * k + h) * D + c),
                                h % 2 ? _mm512_extracti64x4_epi64(p[h / 2], 1) : _mm512_castsi512_si256(p[h / 2]));
    }
    for (int f = 0; f < QK_K; f++) dd[(n0 + f) * (D / 32) + c / 32] = sd[f];
}
#else
void q8_0_tile(const float (*w)[QK_K], int8_t *q, uint16_t *dd, int64_t n0, int64_t D, int64_t c) {
    alignas(64) float col[32];
    for (int f = 0; f < QK_K; f++) {
        for (int r = 0; r < 32; r++) col[r] = w[r][f];
        q8_0_block(col, q + (n0 + f) * D + c, dd + (n0 + f) * (D / 32) + c / 32);
    }
}
#endif

void q4k_to_q4(const at::Tensor &raw, at::Tensor &qs, at::Tensor &d, at::Tensor &m) {
    int64_t N = qs.size(0), K = qs.size(1) * 2, S = K / QK_K;
    TORCH_CHECK(K % QK_K == 0 && raw.size(0) == N && raw.size(1) == S * 144 && d.size(0) == N &&
                    d.size(1) == K / 32 && m.sizes() == d.sizes(),
                "coreinfer::q4k_to_q4: raw [N, K / 256 * 144] u8, qs [N, K / 2], d and m [N, K / 32]");
    TORCH_CHECK(raw.is_contiguous() && qs.is_contiguous() && d.is_contiguous() && m.is_contiguous() &&
                    raw.scalar_type() == at::kByte && qs.scalar_type() == at::kByte &&
                    d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
                "coreinfer::q4k_to_q4: contiguous u8 raw and qs, fp16 d and m");
    const uint8_t *src = raw.data_ptr<uint8_t>();
    uint8_t *q = qs.data_ptr<uint8_t>();
    uint16_t *dd = reinterpret_cast<uint16_t *>(d.data_ptr()), *mm = reinterpret_cast<uint16_t *>(m.data_ptr());
    at::parallel_for(0, N * S, 64, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; s++) {  // super-block s: row s / S, sub-blocks 8 (s % S) .. + 8
            const uint8_t *b = src + s * 144;
            float sd = f16(b), sdmin = f16(b + 2);
            for (int j = 0; j < 8; j++) {
                uint8_t sc, mn;
                scale_min(b + 4, j, &sc, &mn);
                dd[s * 8 + j] = half_bits(sd * float(sc));
                mm[s * 8 + j] = half_bits(-(sdmin * float(mn)));
                const uint8_t *nib = b + 16 + 32 * (j / 2);
                int shift = 4 * (j % 2);
                uint8_t *o = q + s * 128 + 16 * j;  // q4's byte i: weight i low, weight 16 + i high
                for (int i = 0; i < 16; i++)
                    o[i] = ((nib[i] >> shift) & 0xF) | (((nib[i + 16] >> shift) & 0xF) << 4);
            }
        }
    });
}

void to_q8_0_t(const at::Tensor &raw, int64_t kind, at::Tensor &qs, at::Tensor &d, int64_t c0) {
    int64_t F = qs.size(0), D = qs.size(1), R = raw.size(0), S = F / QK_K, nb = block_bytes(kind);
    TORCH_CHECK(kind == Q4_K || kind == Q6_K || kind == Q8_0, "coreinfer::to_q8_0_t: Q4_K, Q6_K or Q8_0 rows");
    TORCH_CHECK(F % QK_K == 0 && R % 32 == 0 && c0 % 32 == 0 && c0 + R <= D && raw.size(1) == S * nb &&
                    d.size(0) == F && d.size(1) == D / 32,
                "coreinfer::to_q8_0_t: raw [R, F row bytes] (R, c0 multiples of 32, F of 256), qs [F, d], "
                "d [F, d / 32]");
    TORCH_CHECK(raw.is_contiguous() && qs.is_contiguous() && d.is_contiguous() && raw.scalar_type() == at::kByte &&
                    qs.scalar_type() == at::kChar && d.scalar_type() == at::kHalf,
                "coreinfer::to_q8_0_t: contiguous u8 raw, s8 qs, fp16 d");
    const uint8_t *src = raw.data_ptr<uint8_t>();
    int8_t *q = qs.data_ptr<int8_t>();
    uint16_t *dd = reinterpret_cast<uint16_t *>(d.data_ptr());
    // a task: one super-block of 256 neurons x 32 file rows (one q8_0 block along d), 32 KiB of floats;
    // a thread's tasks walk the rows of one super-block first, so its stores fill whole cache lines of
    // 256 neurons' output rows before moving on (the other order left half-written lines to be evicted)
    int64_t G = R / 32;
    at::parallel_for(0, S * G, 4, [&](int64_t t0, int64_t t1) {
        alignas(64) float w[32][QK_K];
        for (int64_t t = t0; t < t1; t++) {
            int64_t s = t / G, g = t % G;
            for (int r = 0; r < 32; r++) floats(kind, src + (32 * g + r) * S * nb + s * nb, w[r]);
            q8_0_tile(w, q, dd, s * QK_K, D, c0 + 32 * g);
        }
    });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(coreinfer, m) {
    m.def("q4k_to_q4(Tensor raw, Tensor(a!) qs, Tensor(b!) d, Tensor(c!) m) -> ()");
    m.def("to_q8_0_t(Tensor raw, int kind, Tensor(a!) qs, Tensor(b!) d, int c0) -> ()");
}
TORCH_LIBRARY_IMPL(coreinfer, CPU, m) {
    m.impl("q4k_to_q4", &q4k_to_q4);
    m.impl("to_q8_0_t", &to_q8_0_t);
}
