/* Few-row products over quantized weights for CPU decode: y (R, O) = x (R, I) @ W^T (+ b), x
 * float32, R <= 16, W (O, I) stored in one of moekit.quant.schemes' layouts (its docstring is
 * binding; `dequantize` there is the reference):
 *   bf16     uint16 (O, I)                                  w = bits << 16
 *   int8     int8 (O, I), float32 scales (O,)               w = s[o] * q
 *   int4     uint8 (O, I/2), float16 scales (O, I/32),      w = d * (nibble - 8)
 *            float16 offsets (O, I/32) or none              w = d * nibble + m (zero point)
 *   mxfp4    uint8 (O, I/2), uint8 E8M0 scales (O, I/32)    w = E2M1[nibble] * 2^(e - 127)
 * with byte j of a 4-bit row holding element 2j in its low nibble and 2j + 1 in its high one.
 *
 * A decode step's products stream their weights: each weight row is read once, dequantized in
 * registers and multiplied by every row of x, accumulating in float32; the output rows are split
 * between OpenMP threads. Like decode_kernels.c it links the libgomp torch has already loaded
 * (same soname), so it shares torch's thread pool and thread count; products under
 * MIN_PARALLEL_WEIGHTS run on one thread (the fork costs more than it saves). Each output element
 * is summed by one thread in an order fixed by I and R alone: results do not depend on the thread
 * count (they may on R: rows of x are processed in blocks whose accumulator count depends on the
 * block's size).
 *
 * Three bodies, all compiled on x86-64 and chosen at run time (moekit_q_set_path forces one, for
 * the tests): AVX-512 (AVX512F/BW/VNNI: the AVX2 body with 16-lane steps for int8 weights and for
 * the int8-activation path, its sums bit for bit the AVX2 body's; -DMOEKIT_NO_AVX512 leaves it
 * out), AVX2+FMA+F16C, and a portable C one (the same algorithm: a row dequantized once, in
 * chunks, then multiplied by the R rows; the compiler vectorizes what it can). Other CPUs
 * (aarch64, Apple clang) and -DMOEKIT_PORTABLE compile only the portable body.
 *
 * The AVX2 body's tricks:
 *   - bf16: a bfloat16 is the top half of a float32: of a 32-bit lane holding two, a shift left
 *     by 16 gives the even element and a mask the odd one, with x de-interleaved per 16 once per
 *     call to match (x_perm).
 *   - bf16 and int8 prefetch the weight stream in software, PREFETCH bytes ahead: from DRAM the
 *     hardware prefetchers alone left int8 ~15% slower (measured); the 4-bit bodies are
 *     compute-bound and a prefetch is one more instruction a group (7% slower, measured).
 *   - int8: widen, convert, and multiply by the channel's scale once, after the row's dot.
 *   - 4-bit: x is de-interleaved once per call (x_perm: per group of 32, the 16 even elements,
 *     then the 16 odd ones), so the low nibbles of a group's 16 bytes multiply x_perm[0:16] and
 *     the high nibbles x_perm[16:32] with no shuffling of the weights. A row's scales (and
 *     offsets) are converted to float once per SEGMENT groups (vcvtph2ps, 8 at a time).
 *   - int4: 8 bytes zero-extended to 32-bit lanes, nibbles split by a mask and a shift,
 *     converted, then w = fma(q, d, m) (m = -8 d without a zero point): the reference's float32
 *     weights exactly, shared by every row of x; ~20 instructions a group of 32 at one row.
 *   - MXFP4: a pshufb table maps each nibble to twice its E2M1 value as int8 (all integers;
 *     llama.cpp's kvalues_mxfp4 trick), with the scale halved (2^(e - 128), from a 256-entry
 *     table); the group's scale multiplies the group's dot once (d * sum(x q)).
 * Not written: an AVX-512 float path for bf16 and 4-bit weights (bf16 decodes at 87-94% of the
 * stream bound on the AVX2 body; 4-bit takes int8 x by default), AVX512-BF16 dot products
 * (they would round x to bf16).
 *
 * The int8-activation path (moekit_q_set_x8 chooses the kinds that take it; its own comment
 * below) quantizes x to int8 per block of 32 and multiplies integers instead.
 *
 * moekit_q_swiglu_expert runs a SwiGLU expert's two products and its activation in one call.
 * moekit_q_prepare / moekit_q_rows / moekit_q_release are moekit_q_linear in its two steps (x
 * prepared once, then any range of output rows on the calling thread): the whole-layer calls of
 * moekit/inference/decode_glue.c split a product's rows between their own threads with them.
 * Built and loaded by moekit/quant/kernels.py (through moekit/cbuild.py); tests/
 * test_quant_kernels.py holds every body to F.linear over the dequantized weight, and the AVX-512
 * body to the AVX2 one bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIN_PARALLEL_WEIGHTS 65536
#define GROUP 32
#define MAX_ROWS 16
#define CHUNK 256 /* portable body: weights dequantized at a time (a multiple of GROUP) */

enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { BF16 = 0, INT8 = 1, INT4 = 2, INT4_ZP = 3, MXFP4 = 4 };

typedef struct {
    int kind;
    int64_t I;
    const void *data;        /* row o: I elements (bf16, int8) or I/2 bytes (4-bit) */
    const void *scales;      /* int8: float (O,); int4: fp16 (O, I/32); mxfp4: uint8 (O, I/32) */
    const uint16_t *offsets; /* int4 with zero point: fp16 (O, I/32); else NULL */
} weight_t;

static float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        float f = ldexpf((float)mantissa, -24);
        return sign ? -f : f;
    }
    if (exponent == 31) return from_bits(sign | 0x7f800000u | (mantissa << 13));
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* 2^(e - 127 - halve), exactly (e = 0 and 1 give subnormals; e = 255 gives 2^128 = inf unhalved,
 * as the reference's exp2 does). */
static float e8m0_to_float(uint8_t e, int halve) {
    int exponent = (int)e - halve;
    if (exponent >= 1) return exponent >= 255 ? INFINITY : from_bits((uint32_t)exponent << 23);
    return from_bits(0x00400000u >> -exponent); /* 2^-127 >> k */
}

static float E8M0_HALF[256]; /* 2^(e - 128): the AVX2 body's halved MXFP4 scales */

static const float E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* ---------------------------------------------------------------- portable body */

/* Weights [i0, i0 + n) of row o as float; int8 unscaled (its scale multiplies the row's dot). */
static void dequantize_chunk(const weight_t *w, int64_t o, int64_t i0, int64_t n, float *out) {
    const int64_t I = w->I, G = I / GROUP;
    if (w->kind == BF16) {
        const uint16_t *row = (const uint16_t *)w->data + o * I + i0;
        for (int64_t k = 0; k < n; k++) out[k] = from_bits((uint32_t)row[k] << 16);
        return;
    }
    if (w->kind == INT8) {
        const int8_t *row = (const int8_t *)w->data + o * I + i0;
        for (int64_t k = 0; k < n; k++) out[k] = (float)row[k];
        return;
    }
    const uint8_t *bytes = (const uint8_t *)w->data + o * (I / 2);
    for (int64_t g = i0 / GROUP; g < (i0 + n) / GROUP; g++) {
        const uint8_t *b = bytes + g * (GROUP / 2);
        float *v = out + (g * GROUP - i0);
        if (w->kind == MXFP4) {
            float d = e8m0_to_float(((const uint8_t *)w->scales)[o * G + g], 0);
            for (int j = 0; j < GROUP / 2; j++) {
                v[2 * j] = E2M1[b[j] & 15] * d;
                v[2 * j + 1] = E2M1[b[j] >> 4] * d;
            }
        } else if (w->offsets == NULL) {
            float d = fp16_to_float(((const uint16_t *)w->scales)[o * G + g]);
            for (int j = 0; j < GROUP / 2; j++) {
                v[2 * j] = (float)((b[j] & 15) - 8) * d;
                v[2 * j + 1] = (float)((b[j] >> 4) - 8) * d;
            }
        } else {
            float d = fp16_to_float(((const uint16_t *)w->scales)[o * G + g]);
            float m = fp16_to_float(w->offsets[o * G + g]);
            for (int j = 0; j < GROUP / 2; j++) {
                v[2 * j] = (float)(b[j] & 15) * d + m;
                v[2 * j + 1] = (float)(b[j] >> 4) * d + m;
            }
        }
    }
}

/* sums[r] = x[r, :] . W[o, :] for r < R: the row dequantized CHUNK weights at a time, each chunk
 * multiplied by every row of x into 32 lanes per row, the lanes summed in a fixed tree. */
static void row_portable(const weight_t *w, const float *x, int64_t R, int64_t o, float *sums) {
    const int64_t I = w->I;
    float acc[MAX_ROWS][32];
    float buf[CHUNK];
    memset(acc, 0, sizeof acc);
    for (int64_t i0 = 0; i0 < I; i0 += CHUNK) {
        int64_t n = I - i0 < CHUNK ? I - i0 : CHUNK;
        dequantize_chunk(w, o, i0, n, buf);
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * I + i0;
            int64_t k = 0;
            for (; k + 32 <= n; k += 32)
                for (int j = 0; j < 32; j++) acc[r][j] += xr[k + j] * buf[k + j];
            for (int j = 0; k + j < n; j++) acc[r][j] += xr[k + j] * buf[k + j];
        }
    }
    for (int64_t r = 0; r < R; r++) {
        float lanes[8];
        for (int j = 0; j < 8; j++)
            lanes[j] = (acc[r][j] + acc[r][j + 8]) + (acc[r][j + 16] + acc[r][j + 24]);
        sums[r] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                  ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    }
}

/* ---------------------------------------------------------------- AVX2 body */

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
#include <immintrin.h>

#ifndef PREFETCH /* bytes ahead: the best of 0 / 512 / 1024 / 2048 measured from DRAM */
#define PREFETCH 2048
#endif
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

AVX2_INLINE float hsum(__m256 v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    return _mm_cvtss_f32(half);
}

/* 32 weights of a bf16 or int8 row (int8 unscaled) as 4 vectors of 8 floats. bf16: two 32-byte
 * loads, each 16 weights split into its even elements (shifted into the top half: a bf16 is a
 * float32's top half) and its odd ones (masked), so x comes de-interleaved per 16 (x_perm);
 * half the instructions of widening 8 at a time, which matters for memory-level parallelism:
 * fewer instructions a cache line, more lines in flight in the out-of-order window. int8: in
 * order, widened and converted. */
AVX2_INLINE void load32(const int kind, const void *row, int64_t i, __m256 v[4]) {
    if (kind == BF16) {
        const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
        _Pragma("GCC unroll 8") for (int h = 0; h < 2; h++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i + 16 * h));
            v[2 * h] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            v[2 * h + 1] = _mm256_castsi256_ps(_mm256_and_si256(w, odd));
        }
        return;
    }
    _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++) {
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)row + i + 8 * k));
        v[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
}

/* s + x[i:I] . row[i:I], one by one: a row's tail after the vector body (bf16 / int8). */
AVX2_INLINE float dense_tail(const int kind, const float *x, int64_t I, const void *row, int64_t i,
                             float s) {
    for (int64_t j = i; j < I; j++) {
        float wj = kind == BF16 ? from_bits((uint32_t)((const uint16_t *)row)[j] << 16)
                                : (float)((const int8_t *)row)[j];
        s += x[j] * wj;
    }
    return s;
}

/* bf16 / int8: sums[r] = x[r, :] . row for RB rows of x (RB a constant after inlining). Each row
 * of x has NA accumulators of 8 lanes (RB * NA independent FMA chains, at most 8 registers). */
AVX2_INLINE void dense_block(const int RB, const int kind, const float *x, int64_t I,
                             const void *row, float *sums) {
    const int NA = RB <= 2 ? 4 : RB <= 4 ? 2 : 1;
    __m256 acc[8][4];
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 8") for (int a = 0; a < NA; a++) acc[r][a] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
        __m256 v[4];
        /* the weight stream PREFETCH bytes ahead (into the next rows: the rows a thread reads
         * are consecutive); a line a request, repeats are cheap. Prefetches never fault. */
        _mm_prefetch((const char *)row + (kind == BF16 ? 2 * i : i) + PREFETCH, _MM_HINT_T0);
        load32(kind, row, i, v);
        _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)
            _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++)
                acc[r][k % NA] =
                    _mm256_fmadd_ps(_mm256_loadu_ps(x + r * I + i + 8 * k), v[k], acc[r][k % NA]);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        __m256 total = acc[r][0];
        if (NA == 4)
            total = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                  _mm256_add_ps(acc[r][2], acc[r][3]));
        else if (NA == 2)
            total = _mm256_add_ps(acc[r][0], acc[r][1]);
        sums[r] = dense_tail(kind, x + r * I, I, row, i, hsum(total));
    }
}

#ifndef SCALE_AFTER_ROWS
#define SCALE_AFTER_ROWS 2 /* int4 blocks of up to this many rows scale each group's dot */
#endif

/* One group g of a 4-bit row into the accumulators of each of RB rows of x_perm (a: which of
 * the alternating pair); d and m are the group's scale and offset as floats (int4: w = d q + m,
 * m = -8 d without a zero point; mxfp4: d halved, m unused); sx (RB, G, 8) holds each group's
 * x_perm summed over its 4 vectors, lane by lane (the int4 scale-after form only). */
AVX2_INLINE void group_step(const int RB, const int kind, const float *xp, const float *sx,
                            int64_t I, int64_t g, const uint8_t *bytes, const float *d,
                            const float *m, __m256 acc[8][4], const int a) {
    const float *xg = xp + g * GROUP;
    const uint8_t *b = bytes + g * (GROUP / 2);
    __m256 v[4]; /* weights 0, 2, .., 14 | 16, .., 30 | 1, .., 15 | 17, .., 31: x_perm's order */
    const int scale_after = kind == MXFP4 || RB <= SCALE_AFTER_ROWS;
    __m256 dv = _mm256_broadcast_ss(d + g);
    if (kind == MXFP4) {
        /* nibble -> twice its E2M1 value as int8 (pshufb), then widened and converted */
        const __m128i nibble = _mm_set1_epi8(15);
        const __m128i table =
            _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        __m128i bytes16 = _mm_loadu_si128((const __m128i *)b);
        __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(bytes16, nibble));
        __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes16, 4), nibble));
        v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    } else {
        /* int4: each byte zero-extended into a 32-bit lane, its nibbles split by a mask and a
         * shift (no table: the nibble is q itself), converted */
        const __m256i nibble = _mm256_set1_epi32(15);
        __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
        __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)));
        v[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, nibble));
        v[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, nibble));
        v[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
        v[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
    }
    if (scale_after) {
        /* d * sum(x q) (+ m * sum(x)): 6 FMAs a group and row, for few rows */
        __m256 mv = kind == MXFP4 ? dv : _mm256_broadcast_ss(m + g);
        _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
            const float *xr = xg + r * I;
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xr), v[0]);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), v[1], t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), v[2], t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), v[3], t);
            acc[r][2 * a] = _mm256_fmadd_ps(t, dv, acc[r][2 * a]);
            if (kind != MXFP4) {
                __m256 sxr = _mm256_loadu_ps(sx + (r * (I / GROUP) + g) * 8);
                acc[r][2 * a + 1] = _mm256_fmadd_ps(sxr, mv, acc[r][2 * a + 1]);
            }
        }
        return;
    }
    /* int4, more rows: dequantized in full, w = fma(q, d, m), exactly the reference's float32
     * weight ((q - 8) d is exact in float32), shared by the RB rows: 4 + 4 RB FMAs a group */
    __m256 mv = _mm256_broadcast_ss(m + g);
    _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++) v[k] = _mm256_fmadd_ps(v[k], dv, mv);
    const int NK = RB <= 4 ? 2 : 1; /* accumulators a row: >= 4 FMA chains */
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++) acc[r][k % NK] =
            _mm256_fmadd_ps(_mm256_loadu_ps(xg + r * I + 8 * k), v[k], acc[r][k % NK]);
}

/* Groups s..s+n of one 4-bit row: d[j] its scale (MXFP4: halved, E8M0_HALF) and, int4 only,
 * m[j] its offset (w = d * nibble + m: -8 d symmetric, the stored offset with a zero point). */
AVX2_INLINE void group_scales(const int kind, const void *scales, const uint16_t *offsets,
                              int64_t s, int64_t n, float *d, float *m) {
    if (kind == MXFP4) {
        for (int64_t j = 0; j < n; j++) d[j] = E8M0_HALF[((const uint8_t *)scales)[s + j]];
        return;
    }
    const uint16_t *sc = (const uint16_t *)scales + s;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 dj = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + j)));
        __m256 mj = kind == INT4_ZP
                        ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offsets + s + j)))
                        : _mm256_mul_ps(dj, _mm256_set1_ps(-8.0f));
        _mm256_storeu_ps(d + j, dj);
        _mm256_storeu_ps(m + j, mj);
    }
    for (; j < n; j++) {
        d[j] = _cvtsh_ss(sc[j]);
        m[j] = kind == INT4_ZP ? _cvtsh_ss(offsets[s + j]) : -8.0f * d[j];
    }
}

/* 4-bit: sums[r] = x[r, :] . row for RB rows of x_perm (x de-interleaved per group). Few rows
 * (and MXFP4 always) sum each group's dot apart, scale it, and alternate between 2 pairs of
 * accumulators a row from group to group; more rows add dequantized weights into NK
 * accumulators a row. Either way >= 4 independent FMA chains (one chain through every group
 * would be latency-bound: 4 cycles an FMA). The groups' scales (and offsets) are first converted
 * to float, SEGMENT groups at a time. */
#define SEGMENT 256
AVX2_INLINE void group_block(const int RB, const int kind, const float *xp, const float *sx,
                             int64_t I, const uint8_t *bytes, const void *scales,
                             const uint16_t *offsets, float *sums) {
    const int scale_after = kind == MXFP4 || RB <= SCALE_AFTER_ROWS;
    const int NG = scale_after && RB <= 4 ? 2 : 1;
    const int64_t G = I / GROUP;
    float d[SEGMENT], m[SEGMENT];
    __m256 acc[8][4];
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 8") for (int a = 0; a < 4; a++) acc[r][a] = _mm256_setzero_ps();
    for (int64_t s = 0; s < G; s += SEGMENT) {
        const int64_t n = G - s < SEGMENT ? G - s : SEGMENT;
        group_scales(kind, scales, offsets, s, n, d, m);
        const uint8_t *bs = bytes + s * (GROUP / 2);
        const float *xs = xp + s * GROUP, *sxs = sx ? sx + s * 8 : NULL;
        int64_t g = 0;
        for (; g + NG <= n; g += NG)
            _Pragma("GCC unroll 8") for (int a = 0; a < NG; a++)
                group_step(RB, kind, xs, sxs, I, g + a, bs, d, m, acc, a);
        for (; g < n; g++) group_step(RB, kind, xs, sxs, I, g, bs, d, m, acc, 0);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        __m256 total = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                     _mm256_add_ps(acc[r][2], acc[r][3]));
        sums[r] = hsum(total);
    }
}

#define FOR_BLOCK(call)                                                                          \
    switch (rb) {                                                                                \
    case 1: call(1); break;                                                                      \
    case 2: call(2); break;                                                                      \
    case 3: call(3); break;                                                                      \
    case 4: call(4); break;                                                                      \
    case 5: call(5); break;                                                                      \
    case 6: call(6); break;                                                                      \
    case 7: call(7); break;                                                                      \
    default: call(8); break;                                                                     \
    }

/* The kind is a constant in each instantiation, so every block is specialised twice over. */
#define DENSE(RB) dense_block(RB, KIND, x + r0 * I, I, row, sums + r0)
#define DENSE_PERM(RB) dense_block(RB, KIND, xp + r0 * I, I, row, sums + r0)
#define GROUPS(RB)                                                                             \
    group_block(RB, KIND, xp + r0 * I, sx ? sx + r0 * (I / GROUP) * 8 : NULL, I, bytes, scales,    \
                offsets, sums + r0)

static AVX2_TARGET void row_avx2(const weight_t *w, const float *x, const float *xp,
                                 const float *sx, int64_t R, int64_t o, float *sums) {
    const int64_t I = w->I, G = I / GROUP;
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
        const int rb = R - r0 < 8 ? (int)(R - r0) : 8;
        if (w->kind == BF16) {
            const void *row = (const uint16_t *)w->data + o * I;
#define KIND BF16
            FOR_BLOCK(DENSE_PERM)
#undef KIND
        } else if (w->kind == INT8) {
            const void *row = (const int8_t *)w->data + o * I;
#define KIND INT8
            FOR_BLOCK(DENSE)
#undef KIND
        } else {
            const uint8_t *bytes = (const uint8_t *)w->data + o * (I / 2);
            const uint16_t *offsets = w->offsets ? w->offsets + o * G : NULL;
            if (w->kind == MXFP4) {
                const void *scales = (const uint8_t *)w->scales + o * G;
#define KIND MXFP4
                FOR_BLOCK(GROUPS)
#undef KIND
            } else if (offsets == NULL) {
                const void *scales = (const uint16_t *)w->scales + o * G;
#define KIND INT4
                FOR_BLOCK(GROUPS)
#undef KIND
            } else {
                const void *scales = (const uint16_t *)w->scales + o * G;
#define KIND INT4_ZP
                FOR_BLOCK(GROUPS)
#undef KIND
            }
        }
    }
}

static int avx2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
#else
static int avx2_supported(void) { return 0; }
static void row_avx2(const weight_t *w, const float *x, const float *xp, const float *sx,
                     int64_t R, int64_t o, float *sums) {
    (void)xp;
    (void)sx;
    row_portable(w, x, R, o, sums);
}
#endif

/* ================================================================ int8-activation path
 *
 * llama.cpp's q8_0 idea (ggml-cpu's ggml_vec_dot_q4_0_q8_0 / q8_0_q8_0 / mxfp4_q8_0, our own
 * code): each row of x is quantized once per call to int8 per block of 32 (xd = max|x| / 127,
 * code = round-half-even(x / xd), exactly torch.round(x / xd)), and each block's weights are
 * multiplied by the codes in integers: sum(q_w q_x) is exact in int32, and a weight row's dot is
 * sum over blocks of (weight scale * xd) * that integer, accumulated in float32 in a fixed order.
 * int4 (w = d nibble + m, m = -8 d without a zero point): the unsigned nibbles times the codes,
 * plus sum over blocks of m * xs, xs = xd * sum(codes) (the dequantized x block's sum, as q8_1
 * keeps it): the result is exactly the product of the dequantized weight and the dequantized x,
 * up to float32 summation order. int8: the channel's scale after the row. MXFP4: twice the E2M1
 * value as int8 (a table), the scale halved. The 4-bit bodies quantize x de-interleaved per block
 * (the 16 even elements, then the 16 odd: a byte's low nibbles, then its high ones). */

/* codes (R, I) int8, xd and xs (R, I/32): the quantized rows of x (I a multiple of 32). perm:
 * each block's codes in x_perm's order (evens, then odds). */
static void quantize_x_portable(const float *x, int64_t n_blocks, int perm, int8_t *codes,
                                float *xd, float *xs) {
    for (int64_t k = 0; k < n_blocks; k++) {
        const float *v = x + k * GROUP;
        float amax = 0.0f;
        for (int j = 0; j < GROUP; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        int sum = 0;
        for (int j = 0; j < GROUP; j++) {
            int q = d == 0.0f ? 0 : (int)nearbyintf(v[j] / d);
            sum += q;
            int at = perm ? (j & 1) * (GROUP / 2) + j / 2 : j;
            codes[k * GROUP + at] = (int8_t)q;
        }
        xd[k] = d;
        xs[k] = d * (float)sum;
    }
}

static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* sums[r] = x[r, :] . W[o, :] over the quantized x, each block's integer dot exact, then
 * (weight scale * xd) times it added in float32 block by block; int4's offset term apart. */
static void row_x8_portable(const weight_t *w, const int8_t *codes, const float *xd,
                            const float *xs, int64_t R, int64_t o, float *sums) {
    const int64_t I = w->I, G = I / GROUP;
    for (int64_t r = 0; r < R; r++) {
        const int8_t *q = codes + r * I;
        const float *dr = xd + r * G, *sr = xs + r * G;
        float acc = 0.0f, corr = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const int8_t *qg = q + g * GROUP;
            int32_t dot = 0;
            float scale;
            if (w->kind == INT8) {
                const int8_t *wg = (const int8_t *)w->data + o * I + g * GROUP;
                for (int j = 0; j < GROUP; j++) dot += (int32_t)wg[j] * qg[j];
                scale = 1.0f;
            } else {
                const uint8_t *b = (const uint8_t *)w->data + o * (I / 2) + g * (GROUP / 2);
                if (w->kind == MXFP4) {
                    for (int j = 0; j < GROUP / 2; j++)
                        dot += E2M1_X2[b[j] & 15] * qg[2 * j] + E2M1_X2[b[j] >> 4] * qg[2 * j + 1];
                    scale = e8m0_to_float(((const uint8_t *)w->scales)[o * G + g], 1);
                } else {
                    for (int j = 0; j < GROUP / 2; j++)
                        dot += (b[j] & 15) * qg[2 * j] + (b[j] >> 4) * qg[2 * j + 1];
                    scale = fp16_to_float(((const uint16_t *)w->scales)[o * G + g]);
                    float m = w->offsets ? fp16_to_float(w->offsets[o * G + g]) : -8.0f * scale;
                    corr += m * sr[g];
                }
            }
            acc += scale * dr[g] * (float)dot;
        }
        sums[r] = acc + corr;
    }
}

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
/* The AVX2 quantizer: the same codes as the portable one (division, round half to even). */
static AVX2_TARGET void quantize_x_avx2(const float *x, int64_t n_blocks, int perm, int8_t *codes,
                                        float *xd, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13,
                                                15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11,
                                                13, 15);
    for (int64_t k = 0; k < n_blocks; k++) {
        const float *v = x + k * GROUP;
        __m256 f[4];
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            f[j] = _mm256_loadu_ps(v + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, f[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float d = _mm_cvtss_f32(h) / 127.0f;
        __m256i q[4];
        if (d == 0.0f) {
            for (int j = 0; j < 4; j++) q[j] = _mm256_setzero_si256();
        } else {
            const __m256 dv = _mm256_set1_ps(d);
            for (int j = 0; j < 4; j++)
                q[j] = _mm256_cvtps_epi32(_mm256_round_ps(
                    _mm256_div_ps(f[j], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        /* pack 32 int32 -> 32 int8 in order (packs interleave the 128-bit lanes: undo it) */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                       _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if (perm) /* per 16: evens then odds; then the qwords (E0, O0, E1, O1) -> (E0, E1, O0, O1) */
            p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, evens_odds), 0xd8);
        _mm256_storeu_si256((__m256i *)(codes + k * GROUP), p);
        xd[k] = d;
        xs[k] = d * (float)_mm_cvtsi128_si32(s4);
    }
}

#define X8_SEGMENT 64 /* blocks whose scales are prepared at a time: a multiple of 4, so that the
                        * 4-block steps (and pairs) of every segment are those of the row */
_Static_assert(X8_SEGMENT % 4 == 0, "the codes are regrouped per 4 blocks from a row's start");
#ifndef X8_PREFETCH
#define X8_PREFETCH 1024
#endif

/* One block g of a weight row against RB rows of quantized x, into accumulator a of each row. */
AVX2_INLINE void x8_step(const int RB, const int kind, const int8_t *codes, int64_t I, int64_t g,
                         const void *row, const float *dx, int64_t ldx, __m256 acc[8][2],
                         const int a) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i u, sgn = _mm256_setzero_si256(); /* u: unsigned weights; sgn: their signs, if any */
    if (kind == INT8) {
        sgn = _mm256_loadu_si256((const __m256i *)((const int8_t *)row + g * GROUP));
        u = _mm256_sign_epi8(sgn, sgn);
    } else {
        __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)row + g * (GROUP / 2)));
        __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b),
                                     _mm256_set1_epi8(15));
        if (kind == MXFP4) {
            const __m256i table = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6,
                                                   -8, -12, 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2,
                                                   -3, -4, -6, -8, -12);
            sgn = _mm256_shuffle_epi8(table, n);
            u = _mm256_sign_epi8(sgn, sgn);
        } else {
            u = n;
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(codes + r * I + g * GROUP));
        if (kind != INT4 && kind != INT4_ZP) y = _mm256_sign_epi8(y, sgn);
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), ones);
        acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                    _mm256_broadcast_ss(dx + r * ldx + g),
                                    acc[r][a]);
    }
}

/* 4-bit: blocks g and g + 1 (g even) at once, the codes of the pair laid out as (evens of g,
 * evens of g + 1, odds of g, odds of g + 1) so that one 32-byte load of the weights gives both
 * blocks' low nibbles (a mask) and high nibbles (a shift and a mask); the two maddubs products
 * add in int16 (|sum| <= 4 * 15 * 127 < 2^15), madd makes 8 int32 (lanes 0-3 block g, 4-7
 * block g + 1), and one FMA by dx4 (each block's scale product 4 times): half the
 * instructions of two single steps. */
AVX2_INLINE void x8_pair(const int RB, const int kind, const int8_t *codes, int64_t I, int64_t g,
                         const void *row, const float *d, const float *xd4, __m256 acc[8][2],
                         const int a) {
    /* the pair's weight scales, 4 lanes each; x's scales come so expanded (xd4 (RB, 4 G)) */
    const __m256 d4 = _mm256_set_m128(_mm_broadcast_ss(d + g + 1), _mm_broadcast_ss(d + g));
    const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(15);
    __m256i b = _mm256_loadu_si256((const __m256i *)((const uint8_t *)row + g * (GROUP / 2)));
    __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    __m256i slo = lo, shi = hi;
    if (kind == MXFP4) {
        const __m256i table = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8,
                                               -12, 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4,
                                               -6, -8, -12);
        slo = _mm256_shuffle_epi8(table, lo);
        shi = _mm256_shuffle_epi8(table, hi);
        lo = _mm256_sign_epi8(slo, slo);
        hi = _mm256_sign_epi8(shi, shi);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        const int8_t *c = codes + r * I + g * GROUP;
        __m256i ylo = _mm256_loadu_si256((const __m256i *)c);
        __m256i yhi = _mm256_loadu_si256((const __m256i *)(c + 32));
        if (kind == MXFP4) {
            ylo = _mm256_sign_epi8(ylo, slo);
            yhi = _mm256_sign_epi8(yhi, shi);
        }
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_maddubs_epi16(hi, yhi));
        p = _mm256_madd_epi16(p, ones);
        __m256 scale = _mm256_mul_ps(d4, _mm256_loadu_ps(xd4 + r * (I / GROUP) * 4 + 4 * g));
        acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][a]);
    }
}

/* A segment's blocks s..s+n: each block's weight scale (and int4 offset) as floats, and int4's
 * offset term corr[r] += sum_j m[j] * xs[r, s + j] (8 blocks a vector, then the rest). */
AVX2_INLINE void x8_segment(const int RB, const int kind, const void *scales,
                            const uint16_t *offsets, const float *xs, int64_t G, int64_t s,
                            int64_t n, float *d, float *m, float corr[8]) {
    if (kind == INT8) return;
    group_scales(kind, scales, offsets, s, n, d, m);
    if (kind == MXFP4) return;
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        const float *sr = xs + r * G + s;
        __m256 c = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            c = _mm256_fmadd_ps(_mm256_loadu_ps(m + j), _mm256_loadu_ps(sr + j), c);
        float t = hsum(c);
        for (; j < n; j++) t += m[j] * sr[j];
        corr[r] += t;
    }
}

/* The blocks g..n of a segment that the steps of a cache line each (4-bit: 4 blocks; int8: 2)
 * leave: 4-bit, a last pair, then a last odd block alone (its weight scale times x's); int8, a
 * last odd block. Into accumulator 0 of each row. */
AVX2_INLINE void x8_rest(const int RB, const int kind, const int8_t *cs, int64_t I, int64_t g,
                         int64_t n, const void *rs, const float *d, const float *xd_s,
                         const float *xd4_s, int64_t G, __m256 acc[8][2]) {
    if (kind == INT8) {
        for (; g < n; g++) x8_step(RB, kind, cs, I, g, rs, xd_s, G, acc, 0);
        return;
    }
    for (; g + 2 <= n; g += 2) x8_pair(RB, kind, cs, I, g, rs, d, xd4_s, acc, 0);
    if (g < n) {
        float dx[8];
        _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) dx[r] = d[g] * xd_s[r * G + g];
        x8_step(RB, kind, cs, I, g, rs, dx - g, 1, acc, 0);
    }
}

/* sums[r] = x[r, :] . row over RB rows of quantized x (xd, xd4, xs: x's scales, each 4 times,
 * and block sums), a cache line of weights a step: 4-bit, two pairs; int8, two blocks; each
 * into its own accumulator a row (NA = 2) or both into one (NA = 1, 5-8 rows: no spills). */
AVX2_INLINE void x8_block(const int RB, const int kind, const int8_t *codes, const float *xd,
                          const float *xd4, const float *xs, int64_t I, const void *row,
                          const void *scales, const uint16_t *offsets, float *sums) {
    const int64_t G = I / GROUP, bytes = kind == INT8 ? GROUP : GROUP / 2;
    const int NA = RB <= 4 ? 2 : 1, step = kind == INT8 ? 2 : 4;
    float d[X8_SEGMENT], m[X8_SEGMENT], corr[8] = {0};
    __m256 acc[8][2];
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t s = 0; s < G; s += X8_SEGMENT) {
        const int64_t n = G - s < X8_SEGMENT ? G - s : X8_SEGMENT;
        x8_segment(RB, kind, scales, offsets, xs, G, s, n, d, m, corr);
        const int8_t *cs = codes + s * GROUP;
        const void *rs = (const int8_t *)row + s * bytes;
        int64_t g = 0;
        for (; g + step <= n; g += step) {
#if X8_PREFETCH
            _mm_prefetch((const char *)rs + g * bytes + X8_PREFETCH, _MM_HINT_T0);
#endif
            if (kind == INT8) {
                x8_step(RB, kind, cs, I, g, rs, xd + s, G, acc, 0);
                x8_step(RB, kind, cs, I, g + 1, rs, xd + s, G, acc, NA - 1);
            } else {
                x8_pair(RB, kind, cs, I, g, rs, d, xd4 + 4 * s, acc, 0);
                x8_pair(RB, kind, cs, I, g + 2, rs, d, xd4 + 4 * s, acc, NA - 1);
            }
        }
        x8_rest(RB, kind, cs, I, g, n, rs, d, xd + s, xd4 + 4 * s, G, acc);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)
        sums[r] = hsum(NA == 2 ? _mm256_add_ps(acc[r][0], acc[r][1]) : acc[r][0]) + corr[r];
}

/* Run BLOCK(RB, KIND) over rows r0.. of x in blocks of up to 8, each block size and weight kind
 * a constant (row and scales: weight row o's data and scales, for the int8-activation bodies). */
#define FOR_BLOCK_OF(BLOCK, KIND)                                                                \
    switch (rb) {                                                                                \
    case 1: BLOCK(1, KIND); break;                                                               \
    case 2: BLOCK(2, KIND); break;                                                               \
    case 3: BLOCK(3, KIND); break;                                                               \
    case 4: BLOCK(4, KIND); break;                                                               \
    case 5: BLOCK(5, KIND); break;                                                               \
    case 6: BLOCK(6, KIND); break;                                                               \
    case 7: BLOCK(7, KIND); break;                                                               \
    default: BLOCK(8, KIND); break;                                                              \
    }
#define X8_ROWS(BLOCK)                                                                           \
    const int64_t I = w->I, G = I / GROUP;                                                       \
    const uint16_t *offsets = w->offsets ? w->offsets + o * G : NULL;                            \
    const void *row = w->kind == INT8 ? (const void *)((const int8_t *)w->data + o * I)          \
                                      : (const void *)((const uint8_t *)w->data + o * (I / 2));  \
    const void *scales = w->kind == INT8    ? NULL                                               \
                         : w->kind == MXFP4 ? (const void *)((const uint8_t *)w->scales + o * G) \
                                            : (const void *)((const uint16_t *)w->scales + o * G); \
    for (int64_t r0 = 0; r0 < R; r0 += 8) {                                                      \
        const int rb = R - r0 < 8 ? (int)(R - r0) : 8;                                           \
        if (w->kind == INT8) FOR_BLOCK_OF(BLOCK, INT8)                                           \
        else if (w->kind == MXFP4) FOR_BLOCK_OF(BLOCK, MXFP4)                                    \
        else if (offsets == NULL) FOR_BLOCK_OF(BLOCK, INT4)                                      \
        else FOR_BLOCK_OF(BLOCK, INT4_ZP)                                                        \
    }
#define X8(RB, KIND)                                                                             \
    x8_block(RB, KIND, codes + r0 * I, xd + r0 * G, xd4 + r0 * 4 * G, xs + r0 * G, I, row,      \
             scales, offsets, sums + r0)

static AVX2_TARGET void row_x8_avx2(const weight_t *w, const int8_t *codes, const float *xd,
                                    const float *xd4, const float *xs, int64_t R, int64_t o,
                                    float *sums) {
    X8_ROWS(X8)
}

/* ------------------------------------------------ int8-activation path: AVX-512 VNNI body
 *
 * The AVX2 body's steps a 64-byte register wide, with vpdpbusd (u8 x s8, 4 products summed into
 * an int32 lane, exact) in place of maddubs + madd: a cache line of weights is one load and two
 * dot instructions a row (4-bit), or one (int8). The integers land in the lanes the AVX2 body
 * gives them (4-bit: lanes 0-7 its pair g, 8-15 its pair g + 2; int8: 0-7 block g, 8-15 block
 * g + 1) and each lane takes the same FMAs in the same order, so the sums are the AVX2 body's
 * bit for bit (tests hold them to it): with NA = 2 a 16-lane accumulator is the AVX2 body's two,
 * side by side; with NA = 1 its low half is the one, the step's halves added in turn. The 4-bit
 * codes come regrouped per 4 blocks (the 4 blocks' evens, then their odds: regroup_codes). AVX-512
 * has no vpsignb: signs go onto x's codes by a masked subtraction from zero. */
#if !defined(MOEKIT_NO_AVX512) && ((defined(__clang__) && __clang_major__ < 7) ||               \
                                    (!defined(__clang__) && __GNUC__ < 8))
#define MOEKIT_NO_AVX512 /* a compiler without the avx512vnni target: the AVX2 body only */
#endif
#ifndef MOEKIT_NO_AVX512
#define AVX512_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))
#define AVX512_INLINE                                                                            \
    static inline __attribute__((always_inline, target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

AVX512_INLINE __m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
AVX512_INLINE __m256 high_half(__m512 v) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* acc[r] += p * scale lane by lane: NA = 2, one 16-lane FMA (the AVX2 body's two accumulators
 * side by side); NA = 1, into the low half, the low 8 lanes' products first, then the high 8. */
AVX512_INLINE __m512 x8_accumulate(const int NA, __m512i p, __m512 scale, __m512 acc) {
    const __m512 pf = _mm512_cvtepi32_ps(p);
    if (NA == 2) return _mm512_fmadd_ps(pf, scale, acc);
    __m256 a = _mm256_fmadd_ps(low_half(pf), low_half(scale), low_half(acc));
    return _mm512_castps256_ps512(_mm256_fmadd_ps(high_half(pf), high_half(scale), a));
}

/* 4-bit: blocks g..g+3 of a row (64 bytes: low nibbles the 4 blocks' evens, high their odds),
 * the codes per 4 blocks (evens of g..g+3, then odds); scale lane 4j + k = d[g + j] xd[g + j]. */
AVX512_INLINE void x8_quad(const int RB, const int NA, const int kind, const int8_t *codes,
                           int64_t I, int64_t g, const void *row, const float *d,
                           const float *xd4, __m512 acc[8]) {
    const __m512i nibble = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512i b = _mm512_loadu_si512((const uint8_t *)row + g * (GROUP / 2));
    __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
    __mmask64 neg_lo = 0, neg_hi = 0;
    if (kind == MXFP4) { /* twice the E2M1 value (pshufb per 128 bits), its sign onto x */
        const __m512i table = _mm512_broadcast_i32x4(
            _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12));
        __m512i slo = _mm512_shuffle_epi8(table, lo), shi = _mm512_shuffle_epi8(table, hi);
        neg_lo = _mm512_movepi8_mask(slo), neg_hi = _mm512_movepi8_mask(shi);
        lo = _mm512_abs_epi8(slo), hi = _mm512_abs_epi8(shi);
    }
    const __m512 d16 = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
        _mm512_castps128_ps512(_mm_loadu_ps(d + g)));
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        const int8_t *c = codes + r * I + g * GROUP;
        __m512i ylo = _mm512_loadu_si512(c), yhi = _mm512_loadu_si512(c + 64);
        if (kind == MXFP4) {
            ylo = _mm512_mask_sub_epi8(ylo, neg_lo, zero, ylo);
            yhi = _mm512_mask_sub_epi8(yhi, neg_hi, zero, yhi);
        }
        __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, ylo), hi, yhi);
        __m512 scale = _mm512_mul_ps(d16, _mm512_loadu_ps(xd4 + r * (I / GROUP) * 4 + 4 * g));
        acc[r] = x8_accumulate(NA, p, scale, acc[r]);
    }
}

/* int8: blocks g and g + 1 of a row (64 bytes), each block's lanes scaled by x's scale. */
AVX512_INLINE void x8_pair_int8(const int RB, const int NA, const int8_t *codes, int64_t I,
                                int64_t g, const void *row, const float *xd, int64_t G,
                                __m512 acc[8]) {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512i s = _mm512_loadu_si512((const int8_t *)row + g * GROUP), u = _mm512_abs_epi8(s);
    __mmask64 neg = _mm512_movepi8_mask(s);
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        __m512i y = _mm512_loadu_si512(codes + r * I + g * GROUP);
        y = _mm512_mask_sub_epi8(y, neg, zero, y);
        __m512i p = _mm512_dpbusd_epi32(zero, u, y);
        __m128 pair = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xd + r * G + g)));
        acc[r] = x8_accumulate(NA, p, _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(pair)), acc[r]);
    }
}

/* x8_block a cache line a step in one register; the segment's rest on the AVX2 steps. */
AVX512_INLINE void x8_block_wide(const int RB, const int kind, const int8_t *codes,
                                 const float *xd, const float *xd4, const float *xs, int64_t I,
                                 const void *row, const void *scales, const uint16_t *offsets,
                                 float *sums) {
    const int64_t G = I / GROUP, bytes = kind == INT8 ? GROUP : GROUP / 2;
    const int NA = RB <= 4 ? 2 : 1, step = kind == INT8 ? 2 : 4;
    float d[X8_SEGMENT], m[X8_SEGMENT], corr[8] = {0};
    __m512 acc[8];
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < G; s += X8_SEGMENT) {
        const int64_t n = G - s < X8_SEGMENT ? G - s : X8_SEGMENT;
        x8_segment(RB, kind, scales, offsets, xs, G, s, n, d, m, corr);
        const int8_t *cs = codes + s * GROUP;
        const void *rs = (const int8_t *)row + s * bytes;
        int64_t g = 0;
        for (; g + step <= n; g += step) {
#if X8_PREFETCH
            _mm_prefetch((const char *)rs + g * bytes + X8_PREFETCH, _MM_HINT_T0);
#endif
            if (kind == INT8)
                x8_pair_int8(RB, NA, cs, I, g, rs, xd + s, G, acc);
            else
                x8_quad(RB, NA, kind, cs, I, g, rs, d, xd4 + 4 * s, acc);
        }
        if (g < n) {
            __m256 half[8][2];
            _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) half[r][0] = low_half(acc[r]);
            x8_rest(RB, kind, cs, I, g, n, rs, d, xd + s, xd4 + 4 * s, G, half);
            _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) acc[r] = _mm512_castpd_ps(
                _mm512_insertf64x4(_mm512_castps_pd(acc[r]), _mm256_castps_pd(half[r][0]), 0));
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {
        __m256 total = NA == 2 ? _mm256_add_ps(low_half(acc[r]), high_half(acc[r])) : low_half(acc[r]);
        sums[r] = hsum(total) + corr[r];
    }
}

/* int8 weights, float x: dense_block 16 lanes wide for 1-4 rows of x, the same products in the
 * same lanes (1-2 rows: accumulators k = 0, 1 side by side in one register, k = 2, 3 in another;
 * 3-4 rows: k = 0, 1 side by side, k = 2, 3 added after them); 5-8 rows: dense_block itself. */
AVX512_INLINE void dense_block_int8_wide(const int RB, const float *x, int64_t I,
                                         const int8_t *row, float *sums) {
    if (RB > 4) {
        dense_block(RB, INT8, x, I, row, sums);
        return;
    }
    const int NA = RB <= 2 ? 4 : 2;
    __m512 a[4], b[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) a[r] = b[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
        _mm_prefetch((const char *)row + i + PREFETCH, _MM_HINT_T0);
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + i))));
        __m512 w1 = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + i + 16))));
        _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) {
            const float *xr = x + r * I + i;
            a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, a[r]);
            if (NA == 4)
                b[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, b[r]);
            else
                a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, a[r]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) {
        __m256 total = _mm256_add_ps(low_half(a[r]), high_half(a[r]));
        if (NA == 4) total = _mm256_add_ps(total, _mm256_add_ps(low_half(b[r]), high_half(b[r])));
        sums[r] = dense_tail(INT8, x + r * I, I, row, i, hsum(total));
    }
}

#define DENSE_WIDE(RB, KIND) dense_block_int8_wide(RB, x + r0 * I, I, row, sums + r0)

static AVX512_TARGET void row_int8_avx512(const weight_t *w, const float *x, int64_t R,
                                          int64_t o, float *sums) {
    const int64_t I = w->I;
    const int8_t *row = (const int8_t *)w->data + o * I;
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
        const int rb = R - r0 < 8 ? (int)(R - r0) : 8;
        FOR_BLOCK_OF(DENSE_WIDE, INT8)
    }
}

#define X8_WIDE(RB, KIND)                                                                        \
    x8_block_wide(RB, KIND, codes + r0 * I, xd + r0 * G, xd4 + r0 * 4 * G, xs + r0 * G, I, row, \
                  scales, offsets, sums + r0)

static AVX512_TARGET void row_x8_avx512(const weight_t *w, const int8_t *codes, const float *xd,
                                        const float *xd4, const float *xs, int64_t R, int64_t o,
                                        float *sums) {
    X8_ROWS(X8_WIDE)
}

static int avx512_supported(void) {
    return avx2_supported() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
#else
static int avx512_supported(void) { return 0; }
#define row_x8_avx512 row_x8_avx2
#define row_int8_avx512(w, x, R, o, sums) row_avx2(w, x, NULL, NULL, R, o, sums)
#endif
#else
static void quantize_x_avx2(const float *x, int64_t n_blocks, int perm, int8_t *codes, float *xd,
                            float *xs) {
    quantize_x_portable(x, n_blocks, perm, codes, xd, xs);
}
static void row_x8_avx2(const weight_t *w, const int8_t *codes, const float *xd, const float *xd4,
                        const float *xs, int64_t R, int64_t o, float *sums) {
    (void)xd4;
    row_x8_portable(w, codes, xd, xs, R, o, sums);
}
static int avx512_supported(void) { return 0; }
#define row_x8_avx512 row_x8_avx2
#define row_int8_avx512(w, x, R, o, sums) row_avx2(w, x, NULL, NULL, R, o, sums)
#endif

/* ---------------------------------------------------------------- entry points */

static int active_path = -1; /* -1: not chosen yet */

/* Choose the body: -1 the best this CPU runs, PATH_PORTABLE, PATH_AVX2 or PATH_AVX512 (the AVX2
 * body with the int8-activation path's AVX-512 VNNI steps), if the CPU has it. Returns the body
 * now in use, or -1 if the one asked for cannot run here. */
int moekit_q_set_path(int path) {
    for (int e = 0; e < 256; e++) E8M0_HALF[e] = e8m0_to_float((uint8_t)e, 1);
    if (path > PATH_AVX512 || (path == PATH_AVX2 && !avx2_supported()) ||
        (path == PATH_AVX512 && !avx512_supported()))
        return -1;
    if (path < 0)
        path = avx512_supported() ? PATH_AVX512 : avx2_supported() ? PATH_AVX2 : PATH_PORTABLE;
    return active_path = path;
}

static int x8_kinds = 0; /* bit k set: kind k runs the int8-activation path (where I % 32 == 0) */

/* Choose which kinds quantize x to int8 (bit k for kind k; bf16's bit is ignored); -1 leaves the
 * choice as it is. Returns the mask now in use. */
int moekit_q_set_x8(int mask) {
    if (mask >= 0) x8_kinds = mask & ~(1 << BF16);
    return x8_kinds;
}

/* A product's x prepared once for one weight kind: what every weight row's dot then reads. The
 * float path's AVX2 x_perm (bf16: de-interleaved per 16; 4-bit: per group of 32, evens then odds)
 * and sx (4-bit: each group's 4 vectors of x_perm summed lane by lane, int4's m * sum(x) term);
 * or the int8-activation path's codes (R, I), xd and xs (R, I/32), xd4 (R, 4 I/32: each scale 4
 * times, as the 4-bit steps read). One allocation, released by moekit_q_release. */
typedef struct {
    int kind, path, x8;
    int64_t R, I;
    const float *x;
    float *xp, *sx;
    int8_t *codes;
    float *xd, *xs, *xd4;
} prepared_t;

/* A row's first n_blocks codes (each block its evens, then its odds), regrouped per k blocks: the
 * k blocks' evens, then their odds, as the 4-bit steps read k blocks at once. */
static void regroup_codes(int8_t *codes, int64_t n_blocks, int k) {
    int8_t t[4 * GROUP];
    for (int64_t g = 0; g + k <= n_blocks; g += k) {
        int8_t *c = codes + g * GROUP;
        for (int j = 0; j < k; j++) {
            memcpy(t + j * (GROUP / 2), c + j * GROUP, GROUP / 2);
            memcpy(t + (k + j) * (GROUP / 2), c + j * GROUP + GROUP / 2, GROUP / 2);
        }
        memcpy(c, t, (size_t)k * GROUP);
    }
}

static void prepare_x8(prepared_t *p) {
    const int64_t R = p->R, I = p->I, G = I / GROUP;
    const int perm = p->kind != INT8;
    if (p->path != PATH_PORTABLE) {
        quantize_x_avx2(p->x, R * G, perm, p->codes, p->xd, p->xs);
        /* 4-bit: per 4 blocks (AVX-512) where whole, then per pair, as x8_quad and x8_pair read;
         * a last odd block stays as it is (x8_step) */
        const int64_t quads = p->path == PATH_AVX512 ? G / 4 * 4 : 0;
        for (int64_t r = 0; perm && r < R; r++) {
            regroup_codes(p->codes + r * I, quads, 4);
            regroup_codes(p->codes + r * I + quads * GROUP, G - quads, 2);
        }
        for (int64_t k = 0; perm && k < R * G; k++)
            p->xd4[4 * k] = p->xd4[4 * k + 1] = p->xd4[4 * k + 2] = p->xd4[4 * k + 3] = p->xd[k];
    } else {
        quantize_x_portable(p->x, R * G, 0, p->codes, p->xd, p->xs);
    }
}

static void prepare_float(prepared_t *p) {
    const int64_t R = p->R, I = p->I;
    const float *x = p->x;
    float *xp = p->xp, *sx = p->sx;
    if (p->kind == BF16) { /* per full 32 weights, x de-interleaved per 16; the tail as it is */
        const int64_t full = I / 32 * 32;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * I;
            float *pr = xp + r * I;
            for (int64_t i = 0; i < full; i += 16)
                for (int j = 0; j < 8; j++) {
                    pr[i + j] = xr[i + 2 * j];
                    pr[i + 8 + j] = xr[i + 2 * j + 1];
                }
            for (int64_t i = full; i < I; i++) pr[i] = xr[i];
        }
        return;
    }
    for (int64_t i = 0; i < R * I; i += GROUP) {
        for (int j = 0; j < GROUP / 2; j++) {
            xp[i + j] = x[i + 2 * j];
            xp[i + GROUP / 2 + j] = x[i + 2 * j + 1];
        }
        for (int j = 0; j < 8; j++)
            sx[i / 4 + j] = (xp[i + j] + xp[i + 8 + j]) + (xp[i + 16 + j] + xp[i + 24 + j]);
    }
}

/* x (R, I) contiguous float32 prepared for weights of `kind` (the path and the int8-activation
 * choice as they stand now): a handle for moekit_q_rows, or NULL if R, I or the kind is out of
 * range (R <= 16; 4-bit I a multiple of 32) or memory runs out. x must outlive the handle. */
void *moekit_q_prepare(int kind, const float *x, int64_t R, int64_t I) {
    const int grouped = kind == INT4 || kind == INT4_ZP || kind == MXFP4;
    if (R < 1 || R > MAX_ROWS || I < 1 || kind < BF16 || kind > MXFP4) return NULL;
    if (grouped && I % GROUP) return NULL;
    if (active_path < 0) moekit_q_set_path(-1);
    const int path = active_path, x8 = (x8_kinds >> kind) & 1 && I % GROUP == 0;
    const int64_t G = I / GROUP;
    size_t floats = 0, bytes = 0;
    if (x8)
        floats = (size_t)(R * G * 6), bytes = (size_t)(R * I);
    else if (path != PATH_PORTABLE && (kind == BF16 || grouped))
        floats = (size_t)(R * I) + (grouped ? (size_t)(R * I / 4) : 0);
    prepared_t *p = malloc(sizeof *p + floats * sizeof(float) + bytes);
    if (p == NULL) return NULL;
    float *f = (float *)(p + 1);
    *p = (prepared_t){kind, path, x8, R, I, x, NULL, NULL, NULL, NULL, NULL, NULL};
    if (x8) {
        p->xd = f, p->xs = f + R * G, p->xd4 = f + 2 * R * G, p->codes = (int8_t *)(f + floats);
        prepare_x8(p);
    } else if (floats) {
        p->xp = f, p->sx = grouped ? f + R * I : NULL;
        prepare_float(p);
    }
    return p;
}

void moekit_q_release(void *prepared) { free(prepared); }

/* Rows [o0, o1) of y (R, O) = x @ W^T (+ bias), x the prepared handle's, W (O, I) of its kind in
 * the layouts above (offsets NULL but for int4 with a zero point), on the calling thread. Each
 * element is summed in an order fixed by I and R alone, whichever thread computes it. */
void moekit_q_rows(const void *prepared, const void *data, const void *scales,
                   const uint16_t *offsets, int64_t o0, int64_t o1, int64_t O, const float *bias,
                   float *y) {
    const prepared_t *p = prepared;
    const int four_bit_int = p->kind == INT4 || p->kind == INT4_ZP;
    const int kind = four_bit_int ? (offsets != NULL ? INT4_ZP : INT4) : p->kind;
    const weight_t w = {kind, p->I, data, scales, offsets};
    const int64_t R = p->R;
    for (int64_t o = o0; o < o1; o++) {
        float sums[MAX_ROWS];
        if (p->x8 && p->path == PATH_AVX512)
            row_x8_avx512(&w, p->codes, p->xd, p->xd4, p->xs, R, o, sums);
        else if (p->x8 && p->path == PATH_AVX2)
            row_x8_avx2(&w, p->codes, p->xd, p->xd4, p->xs, R, o, sums);
        else if (p->x8)
            row_x8_portable(&w, p->codes, p->xd, p->xs, R, o, sums);
        else if (p->path == PATH_AVX512 && kind == INT8)
            row_int8_avx512(&w, p->x, R, o, sums);
        else if (p->path != PATH_PORTABLE)
            row_avx2(&w, p->x, p->xp, p->sx, R, o, sums);
        else
            row_portable(&w, p->x, R, o, sums);
        const float scale = kind == INT8 ? ((const float *)scales)[o] : 1.0f;
        const float b = bias ? bias[o] : 0.0f;
        for (int64_t r = 0; r < R; r++) y[r * O + o] = (kind == INT8 ? sums[r] * scale : sums[r]) + b;
    }
}

/* y (R, O) = x (R, I) @ W^T (+ bias): x and y contiguous float32, W's tensors contiguous in the
 * layouts above (offsets NULL but for int4 with a zero point), bias (O,) or NULL; the output rows
 * split between threads. Returns 0, or -1 if R, I or the kind is out of range (nothing written). */
int moekit_q_linear(int kind, const float *x, int64_t R, int64_t I, const void *data,
                    const void *scales, const uint16_t *offsets, int64_t O, const float *bias,
                    float *y) {
    if (O < 1 || (kind == INT4_ZP) != (offsets != NULL)) return -1;
    void *p = moekit_q_prepare(kind, x, R, I);
    if (p == NULL) return -1;
#pragma omp parallel for schedule(static) if (O * I >= MIN_PARALLEL_WEIGHTS)
    for (int64_t o = 0; o < O; o++) moekit_q_rows(p, data, scales, offsets, o, o + 1, O, bias, y);
    moekit_q_release(p);
    return 0;
}

/* A gated expert's activation of n pairs (gate, up) into act (which may be gate itself): SwiGLU,
 * silu(g) u = g / (1 + exp(-g)) u, as torch computes silu (clamped 0), or GPT-OSS's clamped
 * SwiGLU (clamped 1; moekit.experts.activate): g = min(g, limit), u clamped to [-limit, limit],
 * g sigmoid(alpha g) (u + 1). The one definition the C MoE layers (moekit/inference/
 * decode_glue.c, through the pointer moekit_layers_set_ops hands it) and the per-expert products
 * (moekit_q_glu_rows) run, so they agree bit for bit. */
void moekit_q_glu(const float *gate, const float *up, int64_t n, int clamped, float alpha,
                  float limit, float *act) {
    if (!clamped) {
        for (int64_t f = 0; f < n; f++) act[f] = gate[f] / (1.0f + expf(-gate[f])) * up[f];
        return;
    }
    for (int64_t f = 0; f < n; f++) {
        float g = gate[f] > limit ? limit : gate[f]; /* NaN stays NaN, as torch.clamp keeps it */
        float u = up[f] > limit ? limit : up[f] < -limit ? -limit : up[f];
        act[f] = g * (1.0f / (1.0f + expf(-(g * alpha)))) * (u + 1.0f);
    }
}

/* act (R, F) = moekit_q_glu of h (R, 2F) = [gate | up] row by row; act may be h itself (row r's
 * result lands below row r's own inputs, on rows already consumed). */
void moekit_q_glu_rows(const float *h, int64_t R, int64_t F, int clamped, float alpha,
                       float limit, float *act) {
    for (int64_t r = 0; r < R; r++)
        moekit_q_glu(h + r * 2 * F, h + r * 2 * F + F, F, clamped, alpha, limit, act + r * F);
}

/* One SwiGLU expert over quantized weights, in one call: h (R, 2F) = x (R, D) @ W_in^T with W_in
 * (2F, D) = [W_gate; W_up], then silu(gate) * up (moekit_q_glu) compacted in place into h's
 * first R * F floats, then y (R, D) = that @ W_out^T with W_out (D, F). h is scratch of R * 2F
 * floats. Returns 0, or -1 as moekit_q_linear (nothing meaningful in y). */
int moekit_q_swiglu_expert(int kind_in, const float *x, int64_t R, int64_t D, const void *data_in,
                           const void *scales_in, const uint16_t *offsets_in, int64_t F,
                           int kind_out, const void *data_out, const void *scales_out,
                           const uint16_t *offsets_out, float *h, float *y) {
    if (moekit_q_linear(kind_in, x, R, D, data_in, scales_in, offsets_in, 2 * F, NULL, h)) return -1;
    moekit_q_glu_rows(h, R, F, 0, 0.0f, 0.0f, h);
    return moekit_q_linear(kind_out, h, R, F, data_out, scales_out, offsets_out, D, NULL, y);
}
