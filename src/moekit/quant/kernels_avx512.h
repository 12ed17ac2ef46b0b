/* moekit/quant/kernels.c's AVX-512 body. Included by kernels.c, after kernels_avx2_x8.h. */

/* x86-64, neither -DMOEKIT_PORTABLE nor -DMOEKIT_NO_AVX512, and a compiler that knows the
 * avx512vnni target (GCC >= 8, clang >= 7, Apple clang >= 10); else the AVX2 body only. */
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE) && !defined(MOEKIT_NO_AVX512) &&             \
    !((defined(__apple_build_version__) && __clang_major__ < 10) ||                                \
      (defined(__clang__) && __clang_major__ < 7) || (!defined(__clang__) && __GNUC__ < 8))
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
#define AVX512_FEATURES "avx2,fma,f16c,avx512f,avx512bw,avx512vnni"
#define AVX512_TARGET __attribute__((target(AVX512_FEATURES)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_FEATURES)))

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
    __m512i lo = _mm512_and_si512(b, nibble);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
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
        __m512 scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(pair));
        acc[r] = x8_accumulate(NA, p, scale, acc[r]);
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
        __m256 total = low_half(acc[r]);
        if (NA == 2) total = _mm256_add_ps(total, high_half(acc[r]));
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
        const __m128i *bytes = (const __m128i *)(row + i);
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(bytes + 1)));
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

static AVX512_TARGET void rows_int8_avx512(const weight_t *w, const float *x, int64_t R,
                                           int64_t o0, int64_t o1, float *out) {
    FOR_ROWS(NO_BLOCK, DENSE_WIDE, NO_BLOCK) /* int8 weights only */
}

#define X8_WIDE(RB, KIND)                                                                        \
    x8_block_wide(RB, KIND, codes + r0 * I, xd + r0 * G, xd4 + r0 * 4 * G, xs + r0 * G, I, row, \
                  scales, offsets, sums + r0)

static AVX512_TARGET void rows_x8_avx512(const weight_t *w, const int8_t *codes,
                                         const float *xd, const float *xd4, const float *xs,
                                         int64_t R, int64_t o0, int64_t o1, float *out) {
    FOR_ROWS(NO_BLOCK, X8_WIDE, X8_WIDE)
}

static int avx512_supported(void) {
    return avx2_supported() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}
#else
static int avx512_supported(void) { return 0; }
#define rows_x8_avx512 rows_x8_avx2
#define rows_int8_avx512(w, x, R, o0, o1, out) rows_avx2(w, x, NULL, NULL, R, o0, o1, out)
#endif
