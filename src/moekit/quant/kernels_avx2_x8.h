/* moekit/quant/kernels.c's AVX2 body, int8-activation path (x quantized to int8 per block of
 * 32, integer dots; kernels_portable.h describes the path). Included by kernels.c, after
 * kernels_avx2.h. */

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
/* Bytes ahead, as PREFETCH (prefetch.py): from DRAM on the Intel Xeon host 4096 beat 1024 by
 * 23-33% and 2048 by 7-10%, 8192 the same; on the AMD EPYC one 4096 beat 1024 by 1-2%. */
#ifndef X8_PREFETCH
#define X8_PREFETCH 4096
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
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] =
        _mm256_setzero_ps();
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

#define X8(RB, KIND)                                                                             \
    x8_block(RB, KIND, codes + r0 * I, xd + r0 * G, xd4 + r0 * 4 * G, xs + r0 * G, I, row,      \
             scales, offsets, sums + r0)

static AVX2_TARGET void rows_x8_avx2(const weight_t *w, const int8_t *codes, const float *xd,
                                     const float *xd4, const float *xs, int64_t R, int64_t o0,
                                     int64_t o1, float *out) {
    FOR_ROWS(NO_BLOCK, X8, X8)
}
#else
static void quantize_x_avx2(const float *x, int64_t n_blocks, int perm, int8_t *codes, float *xd,
                            float *xs) {
    quantize_x_portable(x, n_blocks, perm, codes, xd, xs);
}
static void rows_x8_avx2(const weight_t *w, const int8_t *codes, const float *xd,
                         const float *xd4, const float *xs, int64_t R, int64_t o0, int64_t o1,
                         float *out) {
    (void)xd4;
    rows_x8_portable(w, codes, xd, xs, R, o0, o1, out);
}
#endif
