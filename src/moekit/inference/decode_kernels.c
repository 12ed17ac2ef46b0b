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
 * AVX2+FMA body is chosen at run time; elsewhere (aarch64, Apple clang) only the portable body is
 * compiled: the same algorithm without the intrinsics (-DMOEKIT_PORTABLE builds only it on x86
 * too). Built and loaded by
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
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_movehdup_ps(half));
    float s = _mm_cvtss_f32(half);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

typedef float (*dot_fn)(const float *, const float *, int64_t);

/* y[r, o] = x[r, :I] . W[o, :I] (+ b[o]); x rows ldx floats apart, W rows ldw apart, y (R, O). */
static void linear_rows(dot_fn dot, const float *x, int64_t ldx, int64_t R, int64_t I,
                        const float *W, int64_t ldw, int64_t O, const float *b, float *y) {
#pragma omp parallel for schedule(static) if (O * I >= MIN_PARALLEL_ELEMENTS)
    for (int64_t o = 0; o < O; o++) {
        const float *w = W + o * ldw;
        float bias = b ? b[o] : 0.0f;
        for (int64_t r = 0; r < R; r++) y[r * O + o] = dot(x + r * ldx, w, I) + bias;
    }
}

static dot_fn best_dot(void) {
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dot_avx2;
#endif
    return dot_portable;
}

/* x (R, I) contiguous; W rows of I floats, ldw floats apart; b (O,) or NULL; y (R, O) contiguous. */
void moekit_linear_f32(const float *x, int64_t R, int64_t I, const float *W, int64_t ldw,
                       int64_t O, const float *b, float *y) {
    linear_rows(best_dot(), x, I, R, I, W, ldw, O, b, y);
}

/* Rows [o0, o1) of moekit_linear_f32's y (R, O), on the calling thread (for callers that split
 * the rows between their own threads: moekit/inference/decode_layers.c). */
void moekit_linear_rows_f32(const float *x, int64_t R, int64_t I, const float *W, int64_t ldw,
                            int64_t o0, int64_t o1, int64_t O, const float *b, float *y) {
    const dot_fn dot = best_dot();
    for (int64_t o = o0; o < o1; o++) {
        const float *w = W + o * ldw;
        float bias = b ? b[o] : 0.0f;
        for (int64_t r = 0; r < R; r++) y[r * O + o] = dot(x + r * I, w, I) + bias;
    }
}

/* One SwiGLU expert on R rows: x (R, D); w_in (2F, D) = [w_gate; w_up], w_out (D, F), both
 * contiguous; h (R, 2F) scratch; y (R, D). h = x w_in^T, then h[:, :F] = silu(gate) * up in
 * place, then y = h[:, :F] w_out^T. silu(g) = g / (1 + exp(-g)), as torch computes it. */
void moekit_swiglu_expert_f32(const float *x, int64_t R, int64_t D, const float *w_in, int64_t F,
                              const float *w_out, float *h, float *y) {
    dot_fn dot = best_dot();
    linear_rows(dot, x, D, R, D, w_in, D, 2 * F, NULL, h);
    for (int64_t r = 0; r < R; r++) {
        float *gate = h + r * 2 * F, *up = gate + F;
        for (int64_t f = 0; f < F; f++) gate[f] = gate[f] / (1.0f + expf(-gate[f])) * up[f];
    }
    linear_rows(dot, h, 2 * F, R, F, w_out, F, D, NULL, y);
}
