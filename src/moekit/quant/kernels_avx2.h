/* moekit/quant/kernels.c's AVX2+FMA+F16C body, float path (x float32, the weights dequantized
 * in registers). Included by kernels.c, after kernels_portable.h. */

/* ---------------------------------------------------------------- AVX2 body */

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
#include <immintrin.h>

/* Bytes ahead, from DRAM (prefetch.py): on the Intel Xeon host 4096 beat 2048 by 4-9% and 1024
 * by 14-25%, 8192 the same; on the AMD EPYC one 1024 beat 4096 by 2% here (bf16 5-12% faster,
 * int8 2-5% slower), which does not pay for Intel's loss. */
#ifndef PREFETCH
#define PREFETCH 4096
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

/* Weight row o of w: its data; *scales its groups' scales (4-bit kinds; NULL for bf16 and int8,
 * whose channel scale multiplies the row's dot after it) and *offsets its groups' offsets (int4
 * with a zero point; else NULL). */
static const void *row_of(const weight_t *w, int64_t o, const void **scales,
                          const uint16_t **offsets) {
    const int64_t I = w->I, G = I / GROUP;
    *offsets = w->offsets ? w->offsets + o * G : NULL;
    *scales = NULL;
    if (w->kind == MXFP4) *scales = (const uint8_t *)w->scales + o * G;
    if (w->kind == INT4 || w->kind == INT4_ZP) *scales = (const uint16_t *)w->scales + o * G;
    if (w->kind == BF16) return (const uint16_t *)w->data + o * I;
    if (w->kind == INT8) return (const int8_t *)w->data + o * I;
    return (const uint8_t *)w->data + o * (I / 2);
}

/* Run BLOCK(RB, KIND) for the block of rb rows of x at r0, the block size and the weight kind
 * constants, so that each instantiation is specialised twice over. */
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
/* A rows function's body: each weight row o in [o0, o1) of w (row, scales, offsets: row_of's)
 * against the rows of x in blocks of up to 8, each kind's block as named (NO_BLOCK for a kind the
 * path never sees), its sums at out + (o - o0) MAX_ROWS. The loop over o lives here, in the
 * body's own target, not in its caller: a call a weight row took a third of an int4 row of 768
 * weights in cache (benchmarks/README.md, "Quantized weights"). */
#define FOR_ROWS(BF16_BLOCK, INT8_BLOCK, GROUPS_BLOCK)                                           \
    const int64_t I = w->I, G = I / GROUP;                                                       \
    (void)G;                                                                                     \
    for (int64_t o = o0; o < o1; o++) {                                                          \
        const void *scales;                                                                      \
        const uint16_t *offsets;                                                                 \
        const void *row = row_of(w, o, &scales, &offsets);                                       \
        float *sums = out + (o - o0) * MAX_ROWS;                                                 \
        for (int64_t r0 = 0; r0 < R; r0 += 8) {                                                  \
            const int rb = R - r0 < 8 ? (int)(R - r0) : 8;                                       \
            switch (w->kind) {                                                                   \
            case BF16: FOR_BLOCK_OF(BF16_BLOCK, BF16) break;                                     \
            case INT8: FOR_BLOCK_OF(INT8_BLOCK, INT8) break;                                     \
            case MXFP4: FOR_BLOCK_OF(GROUPS_BLOCK, MXFP4) break;                                 \
            case INT4: FOR_BLOCK_OF(GROUPS_BLOCK, INT4) break;                                   \
            default: FOR_BLOCK_OF(GROUPS_BLOCK, INT4_ZP) break;                                  \
            }                                                                                    \
        }                                                                                        \
    }
#define NO_BLOCK(RB, KIND) (void)0

#define DENSE(RB, KIND) dense_block(RB, KIND, x + r0 * I, I, row, sums + r0)
#define DENSE_PERM(RB, KIND) dense_block(RB, KIND, xp + r0 * I, I, row, sums + r0)
#define GROUPS(RB, KIND)                                                                       \
    group_block(RB, KIND, xp + r0 * I, sx ? sx + r0 * G * 8 : NULL, I, row, scales, offsets,      \
                sums + r0)

static AVX2_TARGET void rows_avx2(const weight_t *w, const float *x, const float *xp,
                                  const float *sx, int64_t R, int64_t o0, int64_t o1, float *out) {
    FOR_ROWS(DENSE_PERM, DENSE, GROUPS)
}

static int avx2_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
#else
static int avx2_supported(void) { return 0; }
static void rows_avx2(const weight_t *w, const float *x, const float *xp, const float *sx,
                      int64_t R, int64_t o0, int64_t o1, float *out) {
    (void)xp;
    (void)sx;
    rows_portable(w, x, R, o0, o1, out);
}
#endif
