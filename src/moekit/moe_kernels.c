/* CPU float32 kernels for the MoE layer's training path (forward and backward), where torch's
 * elementwise operators are slow on its shapes: many rows (T * k) of few numbers each.
 *
 *   moekit_swiglu_fwd / _bwd   act = silu(gate) * up over h = [gate | up] (R, 2F) and its
 *                              gradient, in one pass each. torch runs silu, its backward and the
 *                              products on the strided F-wide halves of h, ~2-3 ns a number at
 *                              F = 32 where a contiguous tensor takes ~1 (benchmarks/README.md).
 *   moekit_topk_ids            the ids of each row's K largest scores, largest first (ties: the
 *                              lower id first): K vectorised passes over the row, where
 *                              torch.topk takes ~0.8 us a row at E = 64, K = 7.
 *   moekit_scatter_rows /      the combine (each token's rows, weighted, summed in row order) and
 *   moekit_scaled_rows         its backward (each row its token's gradient, weighted, and the
 *                              weight's dot): one pass, no (R, D) temporary, no zero-filled
 *                              (T, D) scatter target; the scatter unweighted is also the
 *                              backward of the dispatch's gather.
 *   moekit_sort_by_expert      a stable counting sort of the assignments by expert, where
 *                              torch's stable argsort of T * k ids sorts by comparison.
 *
 * Rows are split between torch's OpenMP threads (this links the libgomp torch loaded); each
 * output number is computed by one thread in a fixed order: results do not depend on the thread
 * count. On x86-64 an AVX2+FMA body is chosen at run time, elsewhere a portable one (their last
 * bits differ: a polynomial exp against expf). moekit/moe_kernels.py builds, loads and wraps
 * them; torch's operators are their reference (tests/test_moe_kernels.py).
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

#define MIN_PARALLEL_NUMBERS 32768 /* below this, one thread: the fork costs more than it saves */
#define MAX_TOPK 64
#define MAX_TOPK_EXPERTS 1024 /* a row's copy lives on the stack */

/* sigmoid(x) from e = exp(-|x|), which never overflows. */
static inline float sigmoid_portable(float x) {
    float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

static void swiglu_fwd_row_portable(const float *g, const float *u, int64_t F, float *act) {
    for (int64_t f = 0; f < F; f++) act[f] = g[f] * sigmoid_portable(g[f]) * u[f];
}

static void swiglu_bwd_row_portable(const float *g, const float *u, const float *grad, int64_t F,
                                    float *grad_g, float *grad_u) {
    for (int64_t f = 0; f < F; f++) {
        float s = sigmoid_portable(g[f]);
        grad_u[f] = grad[f] * (g[f] * s);
        grad_g[f] = grad[f] * u[f] * (s * (1.0f + g[f] * (1.0f - s)));
    }
}

typedef void (*fwd_row_fn)(const float *, const float *, int64_t, float *);
typedef void (*bwd_row_fn)(const float *, const float *, const float *, int64_t, float *,
                           float *);

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
#include <immintrin.h>

/* exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, a degree-5 polynomial, the power of
 * two put in the exponent bits); x below -87.3 gives exp(-87.3), 1.2e-38, not a subnormal. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpositive_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447504f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static inline __m256 sigmoid_avx2(__m256 x) {
    __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    __m256 e = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_setzero_ps(), abs));
    __m256 one = _mm256_set1_ps(1.0f), denom = _mm256_add_ps(one, e);
    __m256 positive = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_div_ps(_mm256_blendv_ps(e, one, positive), denom);
}

__attribute__((target("avx2,fma"))) static void swiglu_fwd_row_avx2(const float *g,
                                                                    const float *u, int64_t F,
                                                                    float *act) {
    int64_t f = 0;
    for (; f + 8 <= F; f += 8) {
        __m256 x = _mm256_loadu_ps(g + f);
        __m256 silu = _mm256_mul_ps(x, sigmoid_avx2(x));
        _mm256_storeu_ps(act + f, _mm256_mul_ps(silu, _mm256_loadu_ps(u + f)));
    }
    swiglu_fwd_row_portable(g + f, u + f, F - f, act + f);
}

__attribute__((target("avx2,fma"))) static void swiglu_bwd_row_avx2(const float *g,
                                                                    const float *u,
                                                                    const float *grad, int64_t F,
                                                                    float *grad_g,
                                                                    float *grad_u) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t f = 0;
    for (; f + 8 <= F; f += 8) {
        __m256 x = _mm256_loadu_ps(g + f), dy = _mm256_loadu_ps(grad + f);
        __m256 s = sigmoid_avx2(x);
        _mm256_storeu_ps(grad_u + f, _mm256_mul_ps(dy, _mm256_mul_ps(x, s)));
        /* d silu / dx = s (1 + x (1 - s)) */
        __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
        _mm256_storeu_ps(grad_g + f,
                         _mm256_mul_ps(_mm256_mul_ps(dy, _mm256_loadu_ps(u + f)), dsilu));
    }
    swiglu_bwd_row_portable(g + f, u + f, grad + f, F - f, grad_g + f, grad_u + f);
}
#endif

static int use_avx2(void) {
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static fwd_row_fn best_fwd_row(void) {
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    if (use_avx2()) return swiglu_fwd_row_avx2;
#endif
    return swiglu_fwd_row_portable;
}

static bwd_row_fn best_bwd_row(void) {
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    if (use_avx2()) return swiglu_bwd_row_avx2;
#endif
    return swiglu_bwd_row_portable;
}

/* act (R, F) = silu(gate) * up, where row r's gate is h + r * ld and its up h + r * ld + F. */
void moekit_swiglu_fwd(const float *h, int64_t ld, int64_t R, int64_t F, float *act) {
    fwd_row_fn row = best_fwd_row();
#pragma omp parallel for schedule(static) if (R * F >= MIN_PARALLEL_NUMBERS)
    for (int64_t r = 0; r < R; r++) row(h + r * ld, h + r * ld + F, F, act + r * F);
}

/* grad_h (R, ld) = [d gate | d up] of act = silu(gate) * up, given grad (R, F) = d act; h laid
 * out as in moekit_swiglu_fwd. */
void moekit_swiglu_bwd(const float *h, int64_t ld, const float *grad, int64_t R, int64_t F,
                       float *grad_h) {
    bwd_row_fn row = best_bwd_row();
#pragma omp parallel for schedule(static) if (R * F >= MIN_PARALLEL_NUMBERS)
    for (int64_t r = 0; r < R; r++)
        row(h + r * ld, h + r * ld + F, grad + r * F, F, grad_h + r * ld, grad_h + r * ld + F);
}

/* Top-k by K rounds of "take the largest left" over a copy of the row, in which NaN reads as
 * +inf (torch.topk ranks it highest), -inf as -FLT_MAX, and a taken score becomes -inf:
 * branch-free passes over E numbers instead of a data-dependent insertion (whose mispredicted
 * branches cost ~0.5 us a row at E = 64, K = 7). Both bodies take the largest score with the
 * lowest id, so they agree exactly. */
static void topk_row_portable(float *row, int64_t E, int64_t K, int64_t *ids) {
    for (int64_t k = 0; k < K; k++) {
        int64_t best = 0;
        for (int64_t e = 1; e < E; e++)
            if (row[e] > row[best]) best = e;
        ids[k] = best;
        row[best] = -INFINITY;
    }
}

typedef void (*topk_row_fn)(float *, int64_t, int64_t, int64_t *);

#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
/* row padded with -inf to a multiple of 8 numbers (E8). */
__attribute__((target("avx2,fma"))) static void topk_row_avx2(float *row, int64_t E8, int64_t K,
                                                              int64_t *ids) {
    for (int64_t k = 0; k < K; k++) {
        __m256 m = _mm256_loadu_ps(row);
        for (int64_t e = 8; e < E8; e += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + e));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
        m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1)); /* every lane: the row's largest */
        int64_t e = 0;
        int mask = 0;
        __m256 v = m;
        for (; e < E8; e += 8) {
            v = _mm256_loadu_ps(row + e);
            mask = _mm256_movemask_ps(_mm256_cmp_ps(v, m, _CMP_EQ_OQ));
            if (mask) break;
        }
        int lane = __builtin_ctz(mask);
        ids[k] = e + lane;
        /* take it out with a whole-vector store: a one-float store that the next round's vector
         * loads overlap would stall them (no store-to-load forwarding) */
        __m256i hit = _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(lane));
        _mm256_storeu_ps(row + e,
                         _mm256_blendv_ps(v, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(hit)));
    }
}
#endif

/* ids (T, K): each row of scores (T, E) its K largest, largest first; equal scores keep the lower
 * id first; NaN ranks as +inf, -inf as the lowest finite number. Returns 0, or -1 if K is outside
 * 1..min(E, MAX_TOPK) or E above MAX_TOPK_EXPERTS. */
int moekit_topk_ids(const float *scores, int64_t T, int64_t E, int64_t K, int64_t *ids) {
    if (K < 1 || K > E || K > MAX_TOPK || E > MAX_TOPK_EXPERTS) return -1;
    topk_row_fn row_fn = topk_row_portable;
    int64_t E8 = E;
#if defined(__x86_64__) && !defined(MOEKIT_PORTABLE)
    if (use_avx2()) {
        row_fn = topk_row_avx2;
        E8 = (E + 7) / 8 * 8;
    }
#endif
#pragma omp parallel for schedule(static) if (T * E >= MIN_PARALLEL_NUMBERS)
    for (int64_t t = 0; t < T; t++) {
        float row[MAX_TOPK_EXPERTS];
        const float *in = scores + t * E;
        for (int64_t e = 0; e < E; e++)
            row[e] = isnan(in[e]) ? INFINITY : in[e] > -FLT_MAX ? in[e] : -FLT_MAX;
        for (int64_t e = E; e < E8; e++) row[e] = -INFINITY;
        row_fn(row, E8, K, ids + t * K);
    }
    return 0;
}

/* out (T, D): out[t] = the sum, in row order, of w[r] * y[r] over the rows r with token[r] = t
 * (w NULL: of y[r]); 0 for a token without rows. Each thread owns a range of tokens and reads
 * every token id, so each sum runs in row order whatever the thread count: the numbers of
 * torch's `index_add_` of `y * w[:, None]`, bit for bit (products rounded, then added: this file
 * is compiled with -ffp-contract=off, so no FMA fuses them). Returns 0, or -1 if a token id
 * lies outside 0..T-1 (its row is left out). */
int moekit_scatter_rows(const float *y, const float *w, const int64_t *token, int64_t R,
                        int64_t D, int64_t T, float *out) {
    int bad = 0;
#pragma omp parallel if (R * D >= MIN_PARALLEL_NUMBERS) reduction(| : bad)
    {
        int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t lo = T * id / threads, hi = T * (id + 1) / threads;
        for (int64_t i = lo * D; i < hi * D; i++) out[i] = 0.0f;
        for (int64_t r = 0; r < R; r++) {
            int64_t t = token[r];
            if (t < lo || t >= hi) {
                bad |= id == 0 && (t < 0 || t >= T);
                continue;
            }
            float *o = out + t * D;
            const float *yr = y + r * D;
            if (w) {
                float wr = w[r];
                for (int64_t d = 0; d < D; d++) o[d] += wr * yr[d];
            } else {
                for (int64_t d = 0; d < D; d++) o[d] += yr[d];
            }
        }
    }
    return bad ? -1 : 0;
}

/* a . b over n numbers in 8 lanes (a fixed order the compiler can vectorise), then the lanes,
 * then the tail. */
static float dot_lanes(const float *a, const float *b, int64_t n) {
    float lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += a[i + j] * b[i + j];
    float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) +
              ((lane[1] + lane[5]) + (lane[3] + lane[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out (R, D): out[r] = w[r] * x[token[r]] (w NULL: x[token[r]]); and where dots is not NULL,
 * dots[r] = x[token[r]] . y[r] (dot_lanes): the backward of moekit_scatter_rows. Returns 0, or
 * -1 if a token id lies outside 0..T-1 (its row is left as zeros). */
int moekit_scaled_rows(const float *x, int64_t T, const int64_t *token, const float *w, int64_t R,
                       int64_t D, float *out, const float *y, float *dots) {
    int bad = 0;
#pragma omp parallel for schedule(static) if (R * D >= MIN_PARALLEL_NUMBERS) reduction(| : bad)
    for (int64_t r = 0; r < R; r++) {
        float *o = out + r * D;
        if (token[r] < 0 || token[r] >= T) {
            bad = 1;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            if (dots) dots[r] = 0.0f;
            continue;
        }
        const float *xr = x + token[r] * D;
        float wr = w ? w[r] : 1.0f;
        for (int64_t d = 0; d < D; d++) o[d] = wr * xr[d];
        if (dots) dots[r] = dot_lanes(xr, y + r * D, D);
    }
    return bad ? -1 : 0;
}

/* A stable counting sort of R expert ids in -1..E-1 (-1: a dropped assignment): order (R,) the
 * assignments by expert, the -1s first, each expert's in input order (`argsort(ids, stable=True)`
 * exactly); counts (E,) the assignments of each expert. Returns 0, or -1 if an id is out of
 * range. */
int moekit_sort_by_expert(const int64_t *ids, int64_t R, int64_t E, int64_t *order,
                          int64_t *counts) {
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    if (!start) return -2;
    for (int64_t r = 0; r < R; r++) {
        if (ids[r] < -1 || ids[r] >= E) {
            free(start);
            return -1;
        }
        start[ids[r] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) counts[e] = start[e + 1];
    int64_t total = 0;
    for (int64_t e = 0; e <= E; e++) {
        int64_t n = start[e];
        start[e] = total;
        total += n;
    }
    for (int64_t r = 0; r < R; r++) order[start[ids[r] + 1]++] = r;
    free(start);
    return 0;
}
