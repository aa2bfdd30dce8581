/* Ternary x int8 matrix product for packed BitNet layers on CPU (see ternary_kernel.py).
 *
 * Weights stay 2 bits each: a row of K inputs (padded to a multiple of 128) is K/128 blocks of 32
 * bytes; byte j of a block holds the codes of inputs j, j+32, j+64, j+96 at bits 0, 2, 4, 6; a code
 * is the ternary value + 1 (0, 1, 2). Activations are quantized per token exactly as transformers'
 * ActQuant does (scale = 127 / max|x| as torch rounds it, round half to even, clamp to [-128, 127]);
 * the dot product of codes and int8 activations is exact in int32, and
 * sum((w + 1) * q) - sum(q) = sum(w * q).
 * Output: y[t, n] = dot[t, n] / scale[t] * weight_scale (+ bias[n]), as transformers' offline
 * AutoBitLinear scales F.linear(dequantized activations, ternary weights) by weight_scale.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 128 /* inputs per 32 bytes of codes */
#define RB 4      /* rows per register block */
#define TILE 4    /* tokens per register block */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SIMD_LEVEL 3
#elif defined(__AVX2__)
#define SIMD_LEVEL 2
#else
#define SIMD_LEVEL 0
#endif

int ternary_simd_level(void) { return SIMD_LEVEL; }

/* q[t, 0:Kp] (zero padded), scale[t], qsum[t] = sum of q over the row. */
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

#if SIMD_LEVEL == 3
static inline void unpack_block(const uint8_t *codes, __m512i *lo, __m512i *hi) {
    const __m512i three = _mm512_set1_epi8(3);
    __m256i v = _mm256_loadu_si256((const __m256i *)codes);
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 2), 1);
    *lo = _mm512_and_si512(w, three);                       /* inputs 0..63 of the block */
    *hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), three);  /* inputs 64..127 */
}

/* A RB x TILE block of dot products (callers repeat a row or token to fill a partial block). The
 * constant bounds keep the 16 accumulators in registers; each unpacked weight vector serves TILE
 * tokens and each activation load RB rows. */
static void dot_block(const uint8_t *const rows[RB], const int8_t *const toks[TILE], int64_t Kp,
                      int32_t dots[RB][TILE]) {
    __m512i acc[RB][TILE];
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < TILE; i++) acc[r][i] = _mm512_setzero_si512();
    for (int64_t b = 0; b < Kp / BLOCK; b++) {
        __m512i lo[RB], hi[RB];
        for (int r = 0; r < RB; r++) unpack_block(rows[r] + b * 32, &lo[r], &hi[r]);
        for (int i = 0; i < TILE; i++) {
            __m512i a0 = _mm512_loadu_si512((const void *)(toks[i] + b * BLOCK));
            __m512i a1 = _mm512_loadu_si512((const void *)(toks[i] + b * BLOCK + 64));
            for (int r = 0; r < RB; r++) {
                acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], lo[r], a0);
                acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], hi[r], a1);
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < TILE; i++) dots[r][i] = _mm512_reduce_add_epi32(acc[r][i]);
}

/* One token against RB rows: decoding, where a 4-token block would compute 3 copies for nothing. */
static void dot_block1(const uint8_t *const rows[RB], const int8_t *tok, int64_t Kp, int32_t dots[RB]) {
    __m512i acc[RB];
    for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t b = 0; b < Kp / BLOCK; b++) {
        __m512i a0 = _mm512_loadu_si512((const void *)(tok + b * BLOCK));
        __m512i a1 = _mm512_loadu_si512((const void *)(tok + b * BLOCK + 64));
        for (int r = 0; r < RB; r++) {
            __m512i lo, hi;
            unpack_block(rows[r] + b * 32, &lo, &hi);
            acc[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r], lo, a0), hi, a1);
        }
    }
    for (int r = 0; r < RB; r++) dots[r] = _mm512_reduce_add_epi32(acc[r]);
}
#else
#if SIMD_LEVEL == 2
static void dot_row(const uint8_t *row, const int8_t *const toks[TILE], int ntok, int64_t Kp, int32_t *dots) {
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[TILE];
    for (int i = 0; i < TILE; i++) acc[i] = _mm256_setzero_si256();
    for (int64_t b = 0; b < Kp / BLOCK; b++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + b * 32));
        __m256i w[4];
        for (int s = 0; s < 4; s++) w[s] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), three);
        for (int i = 0; i < ntok; i++) {
            const int8_t *a = toks[i] + b * BLOCK;
            for (int s = 0; s < 4; s++) { /* u8 x s8 pairs fit int16: |2 * 2 * 128| < 32767 */
                __m256i p = _mm256_maddubs_epi16(w[s], _mm256_loadu_si256((const __m256i *)(a + 32 * s)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int i = 0; i < ntok; i++) {
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        dots[i] = _mm_cvtsi128_si32(s);
    }
}
#else
static void dot_row(const uint8_t *row, const int8_t *const toks[TILE], int ntok, int64_t Kp, int32_t *dots) {
    for (int i = 0; i < ntok; i++) {
        int32_t total = 0;
        for (int64_t k = 0; k < Kp; k++) {
            int64_t b = k / BLOCK, r = k % BLOCK;
            int code = (row[b * 32 + r % 32] >> (2 * (r / 32))) & 3;
            total += code * toks[i][k];
        }
        dots[i] = total;
    }
}
#endif
static void dot_block(const uint8_t *const rows[RB], const int8_t *const toks[TILE], int64_t Kp,
                      int32_t dots[RB][TILE]) {
    for (int r = 0; r < RB; r++) dot_row(rows[r], toks, TILE, Kp, dots[r]);
}

static void dot_block1(const uint8_t *const rows[RB], const int8_t *tok, int64_t Kp, int32_t dots[RB]) {
    const int8_t *toks[TILE] = {tok, tok, tok, tok};
    for (int r = 0; r < RB; r++) dot_row(rows[r], toks, 1, Kp, &dots[r]);
}
#endif

static inline void store(float *y, int64_t N, int64_t n, int64_t t, int32_t dot, const float *scale,
                         const int32_t *qsum, float weight_scale, const float *bias) {
    y[t * N + n] = (float)(dot - qsum[t]) / scale[t] * weight_scale + (bias ? bias[n] : 0.0f);
}

void ternary_gemm(const int8_t *q, const float *scale, const int32_t *qsum, int64_t T, int64_t Kp,
                  const uint8_t *codes, int64_t N, float weight_scale, const float *bias, float *y) {
    const int64_t row_bytes = Kp / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += RB) {
        const uint8_t *rows[RB];
        for (int r = 0; r < RB; r++) rows[r] = codes + (n0 + r < N ? n0 + r : n0) * row_bytes;
        int64_t t0 = 0;
        for (; t0 + TILE <= T; t0 += TILE) {
            const int8_t *toks[TILE];
            for (int i = 0; i < TILE; i++) toks[i] = q + (t0 + i) * Kp;
            int32_t dots[RB][TILE];
            dot_block(rows, toks, Kp, dots);
            for (int r = 0; r < RB && n0 + r < N; r++)
                for (int i = 0; i < TILE; i++) store(y, N, n0 + r, t0 + i, dots[r][i], scale, qsum, weight_scale, bias);
        }
        for (; t0 < T; t0++) {  /* the last tokens one at a time (all of them when decoding) */
            int32_t dots[RB];
            dot_block1(rows, q + t0 * Kp, Kp, dots);
            for (int r = 0; r < RB && n0 + r < N; r++) store(y, N, n0 + r, t0, dots[r], scale, qsum, weight_scale, bias);
        }
    }
}
