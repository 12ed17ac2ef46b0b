/* Few-row float32 kernels for CPU decode: a linear y (R, O) = x (R, I) @ W (O, I)^T (+ b), and a
 * whole SwiGLU expert y = W_out (silu(W_gate x) * (W_up x)), for R small.
 *
 * A decode step multiplies one row per sequence by every weight matrix, so its speed is the rate
 * at which the weights stream from memory. This kernel reads W once, row by row, and multiplies
 * each row (held in L1) by all R rows of x; the output rows are split between the OpenMP threads.
 * It links the libgomp that torch has already loaded (same soname), so it shares torch's thread
 * pool and its thread count (torch.set_num_threads).
 *
 * Each output element is one dot product summed in a fixed order (8 lanes x 4 accumulators, then
 * the lanes, then the tail), whatever the thread count: results are deterministic. On x86-64 the
 * AVX-512 body (AVX512F) or else the AVX2+FMA body is chosen at run time; the AVX-512 body holds
 * two of those 8-lane accumulators in each 16-lane register and reads four weight rows at once
 * (four memory streams, x loaded once for them), the AVX2 body two, so both sum every element
 * exactly as one row's dot_avx2 does, bit for bit (-DMOEKIT_NO_AVX512 leaves the AVX-512 body
 * out; -DMOEKIT_ONE_ROW_AVX2 runs that one-row body, the tests' reference). Elsewhere (aarch64,
 * Apple clang) only the portable body is compiled: the same algorithm without the intrinsics
 * (-DMOEKIT_PORTABLE builds only it on x86 too). Built and loaded by
 * moekit/inference/decode_kernels.py; F.linear is its reference (tests/test_cpu_kernels.py).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define MIN_PARALLEL_ELEMENTS 65536 /* below this, one thread: the fork costs more than it saves */

static float dot_portable(const float *a, const float *b, int64_t n) {
    float acc[32] = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 32; j++) acc[j] += a[i + j] * b[i + j];
    float lanes[8];
    for (int j = 0; j < 8; j++) lanes[j] = (acc[j] + acc[j + 8]) + (acc[j + 16] + acc[j + 24]);
    float s = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
              ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
#include <immintrin.h>

/* The sum of acc's 8 lanes, then a[i:n] . b[i:n] added one by one: every dot's last steps. */
__attribute__((target("avx2,fma"))) static inline float finish_avx2(__m256 acc, const float *a,
                                                                   const float *b, int64_t i,
                                                                   int64_t n) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    float s = _mm_cvtss_f32(half);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b,
                                                          int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    return finish_avx2(acc, a, b, i, n);
}
#endif

/* Outputs [o0, o1) of y (R, O): y[r, o] = x[r, :I] . W[o, :I] (+ b[o]); x rows ldx floats apart,
 * W rows ldw apart. */
typedef void (*rows_fn)(const float *x, int64_t ldx, int64_t R, int64_t I, const float *W,
                        int64_t ldw, int64_t o0, int64_t o1, int64_t O, const float *b, float *y);

#define ROWS_BY_DOT(name, dot)                                                                     \
    static void name(const float *x, int64_t ldx, int64_t R, int64_t I, const float *W,           \
                     int64_t ldw, int64_t o0, int64_t o1, int64_t O, const float *b, float *y) {  \
        for (int64_t o = o0; o < o1; o++) {                                                        \
            const float *w = W + o * ldw;                                                          \
            float bias = b ? b[o] : 0.0f;                                                          \
            for (int64_t r = 0; r < R; r++) y[r * O + o] = dot(x + r * ldx, w, I) + bias;         \
        }                                                                                          \
    }

ROWS_BY_DOT(rows_portable, dot_portable)

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
ROWS_BY_DOT(rows_avx2_one, dot_avx2)

/* rows_avx2_one's sums, two weight rows at a time: each x vector loaded once for both (a quarter
 * fewer loads, which bound the product at R > 1, where each pair of W rows is read R times from
 * cache), each row's four accumulators summed as dot_avx2 sums them, so every output is
 * dot_avx2's bit for bit. */
__attribute__((target("avx2,fma"))) static void
rows_avx2(const float *x, int64_t ldx, int64_t R, int64_t I, const float *W, int64_t ldw,
          int64_t o0, int64_t o1, int64_t O, const float *b, float *y) {
    const int64_t n = I & ~(int64_t)31; /* the 32-wide part; the tail summed as dot_avx2 sums it */
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2) {
        const float *w0 = W + o * ldw, *w1 = w0 + ldw;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
            __m256 c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
            for (int64_t i = 0; i < n; i += 32) {
                const __m256 x0 = _mm256_loadu_ps(xr + i), x1 = _mm256_loadu_ps(xr + i + 8);
                const __m256 x2 = _mm256_loadu_ps(xr + i + 16), x3 = _mm256_loadu_ps(xr + i + 24);
                a0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + i), a0);
                c0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w1 + i), c0);
                a1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w0 + i + 8), a1);
                c1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + i + 8), c1);
                a2 = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w0 + i + 16), a2);
                c2 = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w1 + i + 16), c2);
                a3 = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w0 + i + 24), a3);
                c3 = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w1 + i + 24), c3);
            }
            const __m256 s0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            const __m256 s1 = _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3));
            float *yr = y + r * O + o;
            yr[0] = finish_avx2(s0, xr, w0, n, I) + (b ? b[o] : 0.0f);
            yr[1] = finish_avx2(s1, xr, w1, n, I) + (b ? b[o + 1] : 0.0f);
        }
    }
    rows_avx2_one(x, ldx, R, I, W, ldw, o, o1, O, b, y); /* an odd last output */
}

#ifndef MOEKIT_NO_AVX512
__attribute__((target("avx512f"))) static inline __m256 upper_half(__m512 v) { /* AVX512F only */
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* dot_avx2's sums: acc01 holds its acc0 (lanes 0-7) and acc1 (8-15), acc23 its acc2 and acc3. */
__attribute__((target("avx512f,avx2,fma"))) static inline float
finish_avx512(__m512 acc01, __m512 acc23, const float *a, const float *b, int64_t i, int64_t n) {
    __m256 t01 = _mm256_add_ps(_mm512_castps512_ps256(acc01), upper_half(acc01));
    __m256 t23 = _mm256_add_ps(_mm512_castps512_ps256(acc23), upper_half(acc23));
    return finish_avx2(_mm256_add_ps(t01, t23), a, b, i, n);
}

__attribute__((target("avx512f,avx2,fma"))) static void
rows_avx512(const float *x, int64_t ldx, int64_t R, int64_t I, const float *W, int64_t ldw,
            int64_t o0, int64_t o1, int64_t O, const float *b, float *y) {
    const int64_t n = I & ~(int64_t)31; /* the 32-wide part; the tail summed as dot_avx2 sums it */
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float *w0 = W + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * ldx;
            __m512 a0 = _mm512_setzero_ps(), c0 = _mm512_setzero_ps();
            __m512 a1 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps();
            __m512 a3 = _mm512_setzero_ps(), c3 = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i += 32) {
                __m512 lo = _mm512_loadu_ps(xr + i), hi = _mm512_loadu_ps(xr + i + 16);
                a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(w0 + i), a0);
                c0 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(w0 + i + 16), c0);
                a1 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(w1 + i), a1);
                c1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(w1 + i + 16), c1);
                a2 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(w2 + i), a2);
                c2 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(w2 + i + 16), c2);
                a3 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(w3 + i), a3);
                c3 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(w3 + i + 16), c3);
            }
            float *yr = y + r * O + o;
            yr[0] = finish_avx512(a0, c0, xr, w0, n, I) + (b ? b[o] : 0.0f);
            yr[1] = finish_avx512(a1, c1, xr, w1, n, I) + (b ? b[o + 1] : 0.0f);
            yr[2] = finish_avx512(a2, c2, xr, w2, n, I) + (b ? b[o + 2] : 0.0f);
            yr[3] = finish_avx512(a3, c3, xr, w3, n, I) + (b ? b[o + 3] : 0.0f);
        }
    }
    rows_avx2(x, ldx, R, I, W, ldw, o, o1, O, b, y); /* the last O % 4 outputs */
}
#endif
#endif

static rows_fn best_rows(void) {
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef MOEKIT_ONE_ROW_AVX2 /* the tests' reference for the bodies that read more rows at once */
    if (avx2) return rows_avx2_one;
#endif
#ifndef MOEKIT_NO_AVX512
    if (avx2 && __builtin_cpu_supports("avx512f")) return rows_avx512; /* its last rows: AVX2 */
#endif
    if (avx2) return rows_avx2;
#endif
    return rows_portable;
}

#define ROWS_A_BLOCK 4 /* outputs a thread takes at a time: the AVX-512 body's four rows */

/* y (R, O) = x (R, I) @ W^T (+ b), the outputs split between the threads in blocks. */
static void linear_rows(rows_fn rows, const float *x, int64_t ldx, int64_t R, int64_t I,
                        const float *W, int64_t ldw, int64_t O, const float *b, float *y) {
#pragma omp parallel for schedule(static) if (O * I >= MIN_PARALLEL_ELEMENTS)
    for (int64_t o0 = 0; o0 < O; o0 += ROWS_A_BLOCK)
        rows(x, ldx, R, I, W, ldw, o0, o0 + ROWS_A_BLOCK < O ? o0 + ROWS_A_BLOCK : O, O, b, y);
}

/* x (R, I) contiguous; W rows of I floats, ldw floats apart; b (O,) or NULL; y (R, O) contiguous. */
void moekit_linear_f32(const float *x, int64_t R, int64_t I, const float *W, int64_t ldw,
                       int64_t O, const float *b, float *y) {
    linear_rows(best_rows(), x, I, R, I, W, ldw, O, b, y);
}

/* Rows [o0, o1) of moekit_linear_f32's y (R, O), on the calling thread (for callers that split
 * the rows between their own threads: moekit/inference/decode_glue.c). */
void moekit_linear_rows_f32(const float *x, int64_t R, int64_t I, const float *W, int64_t ldw,
                            int64_t o0, int64_t o1, int64_t O, const float *b, float *y) {
    best_rows()(x, I, R, I, W, ldw, o0, o1, O, b, y);
}

/* One SwiGLU expert on R rows: x (R, D); w_in (2F, D) = [w_gate; w_up], w_out (D, F), both
 * contiguous; h (R, 2F) scratch; y (R, D). h = x w_in^T, then h[:, :F] = silu(gate) * up in
 * place, then y = h[:, :F] w_out^T. silu(g) = g / (1 + exp(-g)), as torch computes it. */
void moekit_swiglu_expert_f32(const float *x, int64_t R, int64_t D, const float *w_in, int64_t F,
                              const float *w_out, float *h, float *y) {
    rows_fn rows = best_rows();
    linear_rows(rows, x, D, R, D, w_in, D, 2 * F, NULL, h);
    for (int64_t r = 0; r < R; r++) {
        float *gate = h + r * 2 * F, *up = gate + F;
        for (int64_t f = 0; f < F; f++) gate[f] = gate[f] / (1.0f + expf(-gate[f])) * up[f];
    }
    linear_rows(rows, h, 2 * F, R, F, w_out, F, D, NULL, y);
}
