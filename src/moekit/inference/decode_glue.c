/* The per-token glue of a CPU decode step in C: an RMSNorm over a few rows, and one query
 * position's whole attention step (rotary embedding of q and k, the KV-cache write, grouped-query
 * softmax attention over every cached position).
 *
 * On this project's machine (AMD EPYC, 2 cores) a decode step of a small model spends most of its
 * time in framework overhead, not arithmetic: torch's rms_norm is a composite of ~6 ops (~16 us
 * for 64 numbers), a decode step's attention is ~25 ops (rope, slice writes, SDPA, views). One
 * ctypes call replaces each. Built and loaded by moekit/inference/decode_glue.py, whose torch
 * twins (nn.RMSNorm, moekit.model.attention.cached_attention) are the reference
 * (tests/test_decode_fast_paths.py). Float32 throughout; sums accumulate in float32 except the
 * RMSNorm's mean of squares (double), so results agree with torch's to float32 rounding.
 * Compiled with -ffp-contract=off: the rotary products round as torch's do (bit-identical).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* y (R, D) = x * rsqrt(mean(x^2) + eps) * w, row by row (torch.rms_norm). */
void moekit_rmsnorm_f32(const float *x, int64_t R, int64_t D, const float *w, double eps,
                        float *y) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        double ss = 0.0;
        for (int64_t i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / (double)D + eps));
        for (int64_t i = 0; i < D; i++) yr[i] = (xr[i] * inv) * w[i];
    }
}

/* Rotate-half RoPE of one head vector x (hd) into out: (x1 cos - x2 sin, x2 cos + x1 sin). */
static void rope(const float *x, const float *cos_h, const float *sin_h, int64_t half,
                 float *out) {
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        out[i] = x1 * cos_h[i] - x2 * sin_h[i];
        out[i + half] = x2 * cos_h[i] + x1 * sin_h[i];
    }
}

/* One new position for B sequences. q (B, H, hd), k and v (B, KV, hd) as projected (q/k norms
 * applied, rope not), sequence b's at q + b * q_stride and k, v + b * kv_stride (one fused qkv
 * row holds all three), cos and sin (hd / 2) the position's angles, k_cache and v_cache
 * (B, KV, max_len, hd) contiguous with `pos` positions filled. Writes the rotated k and v at
 * position pos, then out (B, H, hd) = softmax(q_rot . K[:pos+1] * scale) @ V[:pos+1], query head
 * h reading key/value head h / (H / KV). Heads run in parallel (torch's OpenMP pool) when the
 * cache is long enough to pay for the fork. */
void moekit_attend_one_f32(const float *q, const float *k, const float *v, int64_t q_stride,
                           int64_t kv_stride, const float *cos_h, const float *sin_h,
                           float *k_cache, float *v_cache, int64_t pos, int64_t max_len,
                           int64_t B, int64_t H, int64_t KV, int64_t hd, float scale, float *out) {
    int64_t half = hd / 2, group = H / KV, L = pos + 1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < KV; g++) {
            int64_t at = ((b * KV + g) * max_len + pos) * hd;
            rope(k + b * kv_stride + g * hd, cos_h, sin_h, half, k_cache + at);
            for (int64_t i = 0; i < hd; i++) v_cache[at + i] = v[b * kv_stride + g * hd + i];
        }
    int64_t n = B * H;
#pragma omp parallel for schedule(static) if (n > 1 && L * hd * H >= 262144)
    for (int64_t bh = 0; bh < n; bh++) {
        int64_t b = bh / H, h = bh % H;
        const float *kc = k_cache + (b * KV + h / group) * max_len * hd;
        const float *vc = v_cache + (b * KV + h / group) * max_len * hd;
        float qr[hd > 0 ? hd : 1];
        rope(q + b * q_stride + h * hd, cos_h, sin_h, half, qr);
        float *scores = malloc((size_t)L * sizeof(float));
        float top = -INFINITY;
        for (int64_t j = 0; j < L; j++) {
            const float *kj = kc + j * hd;
            float acc[8] = {0};
            int64_t i = 0;
            for (; i + 8 <= hd; i += 8)
                for (int u = 0; u < 8; u++) acc[u] += qr[i + u] * kj[i + u];
            float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            for (; i < hd; i++) s += qr[i] * kj[i];
            scores[j] = s * scale;
            if (scores[j] > top) top = scores[j];
        }
        float total = 0.0f;
        for (int64_t j = 0; j < L; j++) total += scores[j] = expf(scores[j] - top);
        float *o = out + bh * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < L; j++) {
            const float *vj = vc + j * hd;
            float p = scores[j] / total;
            for (int64_t i = 0; i < hd; i++) o[i] += p * vj[i];
        }
        free(scores);
    }
}

/* One token's top-k routing (moekit.routing.topk.topk_route without expert groups): scores =
 * softmax (or sigmoid) of logits (E), the K best of scores + bias (best first; the lower expert on
 * a tie), weights = their scores times routed_scaling, divided first by the scores' sum (+1e-20)
 * when normalize. Writes ids (K) and weights (K); scores (E) is scratch. */
void moekit_route_topk_f32(const float *logits, int64_t E, const float *bias, int64_t K,
                           int sigmoid, int normalize, float scaling, float *scores,
                           int64_t *ids, float *weights) {
    if (sigmoid) {
        for (int64_t e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float top = -INFINITY, total = 0.0f;
        for (int64_t e = 0; e < E; e++)
            if (logits[e] > top) top = logits[e];
        for (int64_t e = 0; e < E; e++) total += scores[e] = expf(logits[e] - top);
        for (int64_t e = 0; e < E; e++) scores[e] = scores[e] / total;
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        float best_value = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= ids[j] == e;
            float value = scores[e] + bias[e];
            if (!taken && (best < 0 || value > best_value)) best = e, best_value = value;
        }
        ids[k] = best;
        weights[k] = scores[best];
        sum = k == 0 ? weights[k] : sum + weights[k];
    }
    float scale = normalize ? (1.0f / (sum + 1e-20f)) * scaling : scaling;
    for (int64_t k = 0; k < K; k++) weights[k] = weights[k] * scale;
}
