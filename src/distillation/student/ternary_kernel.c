/* Ternary x int8 matrix product for packed BitNet layers on CPU (see ternary_kernel.py).
 *
 * Weights stay 2 bits each: a row of K inputs (padded to a multiple of 128) is K/128 blocks of 32
 * bytes; byte j of a block holds the codes of inputs j, j+32, j+64, j+96 at bits 0, 2, 4, 6; a code
 * is the ternary value + 1 (0, 1, 2). Activations are quantized per token exactly as transformers'
 * ActQuant does (scale = 127 / max|x| as torch rounds it, round half to even, clamp to [-128, 127]); the dot product of
 * codes and int8 activations is exact in int32, and sum((w + 1) * q) - sum(q) = sum(w * q).
 * Output: y[t, n] = dot[t, n] / scale[t] * weight_scale (+ bias[n]), as transformers' offline
 * AutoBitLinear scales F.linear(dequantized activations, ternary weights) by weight_scale.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 128
#define TILE 4

int ternary_simd_level(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 3;
#elif defined(__AVX2__)
    return 2;
#else
    return 0;
#endif
}

/* q[t, 0:Kp] (zero padded), inv[t] = scale, qsum[t] = sum of q over the row. */
void ternary_act_quant(const float *x, int64_t T, int64_t K, int64_t Kp, int8_t *q, float *scale, int32_t *qsum) {
    #pragma omp parallel for schedule(static) if (T > 8)
    for (int64_t t = 0; t < T; t++) {
        const float *row = x + t * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(row[k]);
            amax = a > amax ? a : amax;
        }
        /* torch evaluates 127 / t as 127 * (1 / t): the same float, so the same integers and scale */
        float s = 127.0f * (1.0f / (amax < 1e-5f ? 1e-5f : amax));
        int32_t total = 0;
        int8_t *out = q + t * Kp;
        for (int64_t k = 0; k < K; k++) {
            float v = nearbyintf(row[k] * s);
            v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
            out[k] = (int8_t)v;
            total += (int32_t)v;
        }
        memset(out + K, 0, (size_t)(Kp - K));
        scale[t] = s;
        qsum[t] = total;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline void unpack_block(const uint8_t *codes, __m512i *lo, __m512i *hi) {
    const __m512i three = _mm512_set1_epi8(3);
    __m256i v = _mm256_loadu_si256((const __m256i *)codes);
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 2), 1);
    *lo = _mm512_and_si512(w, three);                       /* inputs 0..63 of the block */
    *hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), three);  /* inputs 64..127 */
}

static void dot_tile(const uint8_t *row, const int8_t *q, int64_t Kp, int64_t ntok, int32_t *dots) {
    __m512i acc[TILE];
    for (int i = 0; i < TILE; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t b = 0; b < Kp / BLOCK; b++) {
        __m512i lo, hi;
        unpack_block(row + b * 32, &lo, &hi);
        for (int64_t i = 0; i < ntok; i++) {
            const int8_t *a = q + i * Kp + b * BLOCK;
            acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_loadu_si512((const void *)a));
            acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_loadu_si512((const void *)(a + 64)));
        }
    }
    for (int64_t i = 0; i < ntok; i++) dots[i] = _mm512_reduce_add_epi32(acc[i]);
}
#elif defined(__AVX2__)
static void dot_tile(const uint8_t *row, const int8_t *q, int64_t Kp, int64_t ntok, int32_t *dots) {
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[TILE];
    for (int i = 0; i < TILE; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t b = 0; b < Kp / BLOCK; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + b * 32));
        __m256i w[4];
        for (int s = 0; s < 4; s++) w[s] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three);
        for (int64_t i = 0; i < ntok; i++) {
            const int8_t *a = q + i * Kp + b * BLOCK;
            for (int s = 0; s < 4; s++) {  /* u8 x s8 pairs fit int16: |2 * 2 * 128| < 32767 */
                __m256i p = _mm256_maddubs_epi16(w[s], _mm256_loadu_si256((const __m256i *)(a + 32 * s)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int64_t i = 0; i < ntok; i++) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        dots[i] = _mm_cvtsi128_si32(s);
    }
}
#else
static void dot_tile(const uint8_t *row, const int8_t *q, int64_t Kp, int64_t ntok, int32_t *dots) {
    for (int64_t i = 0; i < ntok; i++) {
        int32_t total = 0;
        for (int64_t k = 0; k < Kp; k++) {
            int64_t b = k / BLOCK, r = k % BLOCK;
            int code = (row[b * 32 + r % 32] >> (2 * (r / 32))) & 3;
            total += code * q[i * Kp + k];
        }
        dots[i] = total;
    }
}
#endif

void ternary_gemm(const int8_t *q, const float *scale, const int32_t *qsum, int64_t T, int64_t Kp,
                  const uint8_t *codes, int64_t N, float weight_scale, const float *bias, float *y) {
    const int64_t row_bytes = Kp / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * row_bytes;
        float b = bias ? bias[n] : 0.0f;
        for (int64_t t0 = 0; t0 < T; t0 += TILE) {
            int64_t ntok = T - t0 < TILE ? T - t0 : TILE;
            int32_t dots[TILE];
            dot_tile(row, q + t0 * Kp, Kp, ntok, dots);
            for (int64_t i = 0; i < ntok; i++) {
                int64_t t = t0 + i;
                y[t * N + n] = (float)(dots[i] - qsum[t]) / scale[t] * weight_scale + b;
            }
        }
    }
}
