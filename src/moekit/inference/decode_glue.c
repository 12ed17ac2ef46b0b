/* The per-token glue of a CPU decode step in C: an RMSNorm over a few rows, and one query
 * position's whole attention step (rotary embedding of q and k, the KV-cache write, grouped-query
 * softmax attention over every cached position or a sliding window's, with sinks where given).
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
#include <string.h>

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

/* Writes sequence b's rotated k and its v at position pos of k_cache and v_cache. */
static void cache_write(const float *k, const float *v, int64_t kv_stride, const float *cos_h,
                        const float *sin_h, float *k_cache, float *v_cache, int64_t pos,
                        int64_t max_len, int64_t B, int64_t KV, int64_t hd) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < KV; g++) {
            int64_t at = ((b * KV + g) * max_len + pos) * hd;
            rope(k + b * kv_stride + g * hd, cos_h, sin_h, hd / 2, k_cache + at);
            for (int64_t i = 0; i < hd; i++) v_cache[at + i] = v[b * kv_stride + g * hd + i];
        }
}

/* Query head bh = b * H + h over the L cached positions of its key/value head (the last `window`
 * of them where window > 0: a sliding window): out (hd). With sinks (H; NULL: none), head h's
 * softmax denominator also holds exp(sinks[h]), which carries no value (GPT-OSS;
 * moekit.model.attention.sink_attention). */
static void attend_head(const float *q, int64_t q_stride, const float *cos_h, const float *sin_h,
                        const float *k_cache, const float *v_cache, int64_t L, int64_t window,
                        int64_t max_len, int64_t H, int64_t KV, int64_t hd, float scale,
                        const float *sinks, int64_t bh, float *o) {
    int64_t b = bh / H, h = bh % H, group = H / KV;
    int64_t first = window > 0 && L > window ? L - window : 0;
    const float *kc = k_cache + ((b * KV + h / group) * max_len + first) * hd;
    const float *vc = v_cache + ((b * KV + h / group) * max_len + first) * hd;
    L -= first;
    float qr[hd > 0 ? hd : 1];
    rope(q + b * q_stride + h * hd, cos_h, sin_h, hd / 2, qr);
    float *scores = malloc((size_t)L * sizeof(float));
    float top = sinks ? sinks[h] : -INFINITY;
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
    if (sinks) total += expf(sinks[h] - top);
    for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
    for (int64_t j = 0; j < L; j++) {
        const float *vj = vc + j * hd;
        float p = scores[j] / total;
        for (int64_t i = 0; i < hd; i++) o[i] += p * vj[i];
    }
    free(scores);
}

/* One new position for B sequences. q (B, H, hd), k and v (B, KV, hd) as projected (q/k norms
 * applied, rope not), sequence b's at q + b * q_stride and k, v + b * kv_stride (one fused qkv
 * row holds all three), cos and sin (hd / 2) the position's angles, k_cache and v_cache
 * (B, KV, max_len, hd) contiguous with `pos` positions filled. Writes the rotated k and v at
 * position pos, then out (B, H, hd) = softmax(q_rot . K[:pos+1] * scale) @ V[:pos+1], query head
 * h reading key/value head h / (H / KV); over the last `window` positions only where window > 0,
 * with the sink logits sinks (H) when not NULL. Heads run in parallel (torch's OpenMP pool) when
 * the cache is long enough to pay for the fork. */
void moekit_attend_one_f32(const float *q, const float *k, const float *v, int64_t q_stride,
                           int64_t kv_stride, int64_t B, const float *cos_h, const float *sin_h,
                           float *k_cache, float *v_cache, int64_t pos, int64_t max_len,
                           int64_t H, int64_t KV, int64_t hd, float scale, int64_t window,
                           const float *sinks, float *out) {
    int64_t L = pos + 1, n = B * H;
    cache_write(k, v, kv_stride, cos_h, sin_h, k_cache, v_cache, pos, max_len, B, KV, hd);
#pragma omp parallel for schedule(static) if (n > 1 && L * hd * H >= 262144)
    for (int64_t bh = 0; bh < n; bh++)
        attend_head(q, q_stride, cos_h, sin_h, k_cache, v_cache, L, window, max_len, H, KV, hd,
                    scale, sinks, bh, out + bh * hd);
}

/* One token's top-k routing (moekit.routing.topk.topk_route): scores = softmax (or sigmoid) of
 * logits (E), the K best of scores + bias (best first; the lower expert on a tie), weights =
 * their scores times routed_scaling, divided first by the scores' sum (+1e-20) when normalize.
 * With n_groups > 1 expert groups of which a token keeps topk_groups < n_groups (DeepSeek-V3's
 * group-limited routing, `topk.group_limit`), only the experts of its topk_groups best groups
 * (a group's score the sum of its two best selection values, its best alone where it has one
 * expert; the lower group on a tie). Writes ids (K) and weights (K); scores (E) is scratch. */
void moekit_route_topk_f32(const float *logits, int64_t E, const float *bias, int64_t K,
                           int sigmoid, int normalize, float scaling, int64_t n_groups,
                           int64_t topk_groups, float *scores, int64_t *ids, float *weights) {
    if (sigmoid) {
        for (int64_t e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float top = -INFINITY, total = 0.0f;
        for (int64_t e = 0; e < E; e++)
            if (logits[e] > top) top = logits[e];
        for (int64_t e = 0; e < E; e++) total += scores[e] = expf(logits[e] - top);
        for (int64_t e = 0; e < E; e++) scores[e] = scores[e] / total;
    }
    unsigned char allowed[E > 0 ? E : 1];
    memset(allowed, 1, (size_t)(E > 0 ? E : 1));
    if (n_groups > 1 && topk_groups < n_groups) {
        const int64_t size = E / n_groups;
        float group[n_groups];
        unsigned char kept[n_groups];
        for (int64_t g = 0; g < n_groups; g++) {
            float best = -INFINITY, second = -INFINITY;
            for (int64_t e = g * size; e < (g + 1) * size; e++) {
                const float value = scores[e] + bias[e];
                if (value > best) second = best, best = value;
                else if (value > second) second = value;
            }
            group[g] = size > 1 ? best + second : best;
            kept[g] = 0;
        }
        for (int64_t k = 0; k < topk_groups; k++) {
            int64_t best = -1;
            for (int64_t g = 0; g < n_groups; g++)
                if (!kept[g] && (best < 0 || group[g] > group[best])) best = g;
            kept[best] = 1;
        }
        for (int64_t e = 0; e < E; e++) allowed[e] = kept[e / size];
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        float best_value = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            int taken = !allowed[e];
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

/* ================================================================ whole layers in one call
 *
 * A decode token's MoE layer (routing, its top-k gated experts' products, the weighted sum; or a
 * few tokens', each chosen expert once: decode_moe_layer.h) and its attention block (q/k/v
 * products, the step above, o_proj) each in one call and one OpenMP
 * parallel region: each product's output rows split between the threads, barriers between the
 * steps instead of a fork and a join per product (and a Python call per product before). The
 * products run moekit's kernels row range by row range, through pointers handed over once by
 * moekit_layers_set_ops: decode_kernels.c's float32 rows, quant/kernels.c's prepared x and
 * quantized rows. Every output element is computed by the same function on the same inputs as the
 * one-product kernels compute it, so results equal theirs bit for bit (the references in
 * moekit/inference/decode_layers.py; tests/test_decode_layers.py). */

typedef void (*f32_rows_fn)(const float *, int64_t, int64_t, const float *, int64_t, int64_t,
                            int64_t, int64_t, const float *, float *);
typedef void *(*q_prepare_fn)(int, const float *, int64_t, int64_t);
typedef void (*q_rows_fn)(const void *, const void *, const void *, const uint16_t *, int64_t,
                          int64_t, int64_t, const float *, float *);
typedef void (*q_release_fn)(void *);
typedef void (*glu_fn)(const float *, const float *, int64_t, int, float, float, float *);

static f32_rows_fn f32_rows;
static q_prepare_fn q_prepare;
static q_rows_fn q_rows;
static q_release_fn q_release;
static glu_fn glu; /* quant/kernels.c's moekit_q_glu: a gated expert activation */

void moekit_layers_set_ops(void *f32, void *prepare, void *rows, void *release, void *glu_f) {
    f32_rows = (f32_rows_fn)f32;
    q_prepare = (q_prepare_fn)prepare, q_rows = (q_rows_fn)rows, q_release = (q_release_fn)release;
    glu = (glu_fn)glu_f;
}

/* A gated expert's activation other than plain SwiGLU: GPT-OSS's clamped SwiGLU (clamped 1, its
 * alpha and limit), run by `glu`; NULL where an activation_ref is taken means silu(gate) * up. */
typedef struct {
    int clamped;
    float alpha, limit;
} activation_ref;

/* One weight matrix (O, I) as stored: kind -1 float32 (data rows `ld` floats apart), else
 * quant/kernels.c's kind (data, scales, offsets in its layouts); bias (O,) float32 or NULL. */
typedef struct {
    int64_t kind, O, I, ld;
    const void *data, *scales, *offsets;
    const float *bias;
} weight_ref;

/* An attention as its block reads it: the q (H hd, D), k and v (KV hd, D) and o (D, H hd)
 * projections; q_norm and k_norm, the RMSNorm weights of q and k (NULL: none; eps qk_eps, both):
 * per head (hd, Qwen3) or, where qk_full, over the whole projection (H hd and KV hd, OLMoE);
 * sinks (H), the sink logits (NULL: none); where clipped, q, k and v clamped to [-clip, clip]
 * after the whole-projection norm and before the per-head one (OLMoE's clip_qkv). */
typedef struct {
    weight_ref q, k, v, o;
    const float *q_norm, *k_norm;
    double qk_eps;
    const float *sinks;
    int32_t qk_full, clipped;
    float clip;
} attention_ref;

/* x (n) clamped to [-c, c] in place as torch.clamp does (a NaN stays NaN). */
static void clamp(float *x, int64_t n, float c) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] < -c ? -c : (x[i] > c ? c : x[i]);
}

#define ROWS_A_TASK 16
/* A call whose products read fewer weights than this runs on one thread: waking the others
 * (tens of us under OMP_WAIT_POLICY=PASSIVE) costs more than sharing the work saves. Measured
 * on one token through 2 of 8 experts (D = F), 2 threads: one thread is faster up to D = 256
 * (393,216 weights: 65 against 68 us), two from D = 384 (884,736: 111 against 178 us). */
static int64_t min_parallel_weights = 524288;

/* Set the threshold (tests set 0 to run every region on all threads); returns the old value. */
int64_t moekit_layers_set_min_parallel(int64_t weights) {
    int64_t old = min_parallel_weights;
    min_parallel_weights = weights;
    return old;
}

/* x (R, I) prepared for w: quant/kernels.c's handle, or x itself for float32 (NULL if it fails). */
static void *prepared(const weight_ref *w, const float *x, int64_t R) {
    if (w->kind < 0) return (void *)x;
    return q_prepare ? q_prepare((int)w->kind, x, R, w->I) : NULL;
}

static void release(const weight_ref *w, void *p) {
    if (w->kind >= 0 && p != NULL) q_release(p);
}

/* Rows [o0, o1) of y (R, O) = x @ W^T (+ bias), x as `prepared` gave it, on this thread. */
static void rows(const weight_ref *w, const void *p, int64_t R, int64_t o0, int64_t o1, float *y) {
    if (w->kind < 0)
        f32_rows(p, R, w->I, w->data, w->ld, o0, o1, w->O, w->bias, y);
    else
        q_rows(p, w->data, w->scales, w->offsets, o0, o1, w->O, w->bias, y);
}

/* Inside a parallel region: y (R, O) = x @ W^T, the rows split between its threads; no barrier. */
static void product(const weight_ref *w, const void *p, int64_t R, float *y) {
#pragma omp for schedule(static) nowait
    for (int64_t o0 = 0; o0 < w->O; o0 += ROWS_A_TASK)
        rows(w, p, R, o0, o0 + ROWS_A_TASK < w->O ? o0 + ROWS_A_TASK : w->O, y);
}

#include "decode_moe_layer.h"
#include "decode_latent.h"

/* One decode position's attention block for B <= 16 sequences: q, k, v = x (B, D) @ W^T (+
 * biases), the q and k norms and the clamp where given (attention_ref), then
 * moekit_attend_one_f32's step (rope, cache write, attention over the pos + 1 cached positions, or
 * the last `window` of them where window > 0, sinks where given), then out (B, D) = that @ W_o^T
 * (+ bias). scratch: B (2 H + 2 KV) hd floats. Returns 0, or -1 if a product's x cannot be
 * prepared. */
int moekit_attention_block(const float *x, int64_t B, const attention_ref *w, const float *cos_h,
                           const float *sin_h, float *k_cache, float *v_cache, int64_t pos,
                           int64_t max_len, int64_t H, int64_t KV, int64_t hd, float scale,
                           int64_t window, float *scratch, float *out) {
    float *q = scratch, *k = q + B * H * hd, *v = k + B * KV * hd, *att = v + B * KV * hd;
    const weight_ref *wq = &w->q, *wk = &w->k, *wv = &w->v, *wo = &w->o;
    void *pq = prepared(wq, x, B);
    void *pk = wk->kind == wq->kind ? pq : prepared(wk, x, B);
    void *pv = wv->kind == wq->kind ? pq : prepared(wv, x, B);
    void *po = NULL;
    int failed = pq == NULL || pk == NULL || pv == NULL;
    const int64_t L = pos + 1, n = B * H;
    /* the projections' weights, or the cached keys and values the heads read (as the step alone) */
    const int64_t weights = (wq->O + wk->O + wv->O) * wq->I + wo->O * wo->I;
    if (failed) goto done;
#pragma omp parallel if (weights >= min_parallel_weights || (n > 1 && L * hd * H >= 262144))
    {
        product(wq, pq, B, q);
        product(wk, pk, B, k);
        product(wv, pv, B, v);
#pragma omp barrier
#pragma omp single
        {
            if (w->q_norm && w->qk_full) { /* q (B, H hd), k (B, KV hd): a row a sequence */
                moekit_rmsnorm_f32(q, B, H * hd, w->q_norm, w->qk_eps, q);
                moekit_rmsnorm_f32(k, B, KV * hd, w->k_norm, w->qk_eps, k);
            }
            if (w->clipped) {
                clamp(q, B * H * hd, w->clip);
                clamp(k, B * KV * hd, w->clip);
                clamp(v, B * KV * hd, w->clip);
            }
            if (w->q_norm && !w->qk_full) {
                moekit_rmsnorm_f32(q, B * H, hd, w->q_norm, w->qk_eps, q);
                moekit_rmsnorm_f32(k, B * KV, hd, w->k_norm, w->qk_eps, k);
            }
            cache_write(k, v, KV * hd, cos_h, sin_h, k_cache, v_cache, pos, max_len, B, KV, hd);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < n; bh++)
            attend_head(q, H * hd, cos_h, sin_h, k_cache, v_cache, L, window, max_len, H, KV, hd,
                        scale, w->sinks, bh, att + bh * hd);
#pragma omp single
        {
            po = prepared(wo, att, B);
            failed = po == NULL;
        }
        if (!failed) product(wo, po, B, out);
    }
done:
    release(wq, pq);
    if (pk != pq) release(wk, pk);
    if (pv != pq) release(wv, pv);
    release(wo, po);
    return failed ? -1 : 0;
}

/* One decoder block as moekit_plan_one_token reads it: its norms, attention, KV cache, window and
 * MoE layer (shared experts included); the latent attention that replaces the grouped-query one
 * where `latent` is not NULL (then attn is NULL, H, KV, hd and scale unused, k_cache and v_cache
 * the latent and rotary-key caches); a dense FFN in place of the MoE layer where `dense` is not
 * NULL (then the MoE fields are unread). Mirrors moekit/inference/decode_block.py's BlockPlan
 * field by field. */
typedef struct {
    const float *attn_norm;
    double attn_eps;
    const attention_ref *attn;
    float *k_cache, *v_cache;
    int64_t max_len, H, KV, hd;
    float scale;
    int64_t window;
    const float *ffn_norm;
    double ffn_eps;
    const weight_ref *router;
    const float *expert_bias;
    int64_t K;
    int32_t sigmoid, normalize;
    float scaling;
    int64_t n_groups, topk_groups;
    const weight_ref *w_in, *w_out;
    const activation_ref *act;
    const shared_ref *shared;
    const latent_ref *latent;
    const dense_ref *dense;
} block_plan;

/* a (B, D) = the block's attention of h (B, D), its latent attention where it has one; as
 * moekit_attention_block or moekit_latent_attention_block return. rest: their scratch. */
static int block_attention(const block_plan *b, const float *h, int64_t B, const float *cos_h,
                           const float *sin_h, int64_t pos, float *rest, float *a) {
    if (b->latent)
        return moekit_latent_attention_block(h, B, b->latent, cos_h, sin_h, b->k_cache,
                                             b->v_cache, pos, b->max_len, b->window, rest, a);
    return moekit_attention_block(h, B, b->attn, cos_h, sin_h, b->k_cache, b->v_cache, pos,
                                  b->max_len, b->H, b->KV, b->hd, b->scale, b->window, rest, a);
}

/* y (B, D) = the block's FFN of h (B, D): its dense FFN where it has one, else its MoE layer
 * (moekit_moe_one_token for one row, moekit_moe_tokens for more: the layer calls' functions); as
 * they return. rest: their scratch; ids, weights: B K. */
static int block_ffn(const block_plan *b, const float *h, int64_t B, float *rest, int64_t *ids,
                     float *weights, float *y) {
    if (b->dense) return moekit_dense_tokens(h, B, b->dense, rest, y);
    if (B == 1)
        return moekit_moe_one_token(h, b->router, b->expert_bias, b->K, b->sigmoid, b->normalize,
                                    b->scaling, b->n_groups, b->topk_groups, b->w_in, b->w_out,
                                    b->act, b->shared, rest, ids, weights, y);
    return moekit_moe_tokens(h, B, b->router, b->expert_bias, b->K, b->sigmoid, b->normalize,
                             b->scaling, b->n_groups, b->topk_groups, b->w_in, b->w_out, b->act,
                             b->shared, rest, ids, weights, y);
}

/* The model width D of a block's input. */
static int64_t block_width(const block_plan *b) {
    return b->latent ? b->latent->kv_a.I : b->attn->q.I;
}

/* The attention half of moekit_plan_one_token for one decoded token: x1 = x + attention(
 * rmsnorm(x, attn_norm)) at scratch + 2 D (block_attention: the grouped-query or the latent one)
 * and the MoE layer's input h = rmsnorm(x1, ffn_norm) at scratch; what a caller whose experts are
 * not all resident (offloaded) runs before fetching the chosen ones (the plan's MoE fields then
 * unread). scratch: 4 D + the attention's ((2 H + 2 KV) hd, or the latent scratch) floats.
 * Returns 0, or -1 if the attention could not run (nothing counted in the cache: the caller's
 * reference writes position pos again). */
int moekit_plan_attention_one_token(const block_plan *b, const float *x, const float *cos_h,
                                    const float *sin_h, int64_t pos, float *scratch) {
    const int64_t D = block_width(b);
    float *h = scratch, *a = h + D, *x1 = a + D, *rest = x1 + 2 * D;
    moekit_rmsnorm_f32(x, 1, D, b->attn_norm, b->attn_eps, h);
    if (block_attention(b, h, 1, cos_h, sin_h, pos, rest, a)) return -1;
    for (int64_t i = 0; i < D; i++) x1[i] = x[i] + a[i];
    moekit_rmsnorm_f32(x1, 1, D, b->ffn_norm, b->ffn_eps, h);
    return 0;
}

/* One decoded token through a whole pre-norm block (moekit's Block): the attention half
 * (moekit_plan_attention_one_token), then out = x1 + ffn(h) (block_ffn: the MoE layer with its
 * shared experts, or the dense FFN); the sums element by element, as torch adds. scratch: 4 D +
 * max(the attention's, the FFN's) floats (as block_tokens' at B = 1), x1 at scratch + 2 D.
 * Returns 0; -1 if the attention could not run (as the half's), -2 if the FFN could not (the
 * cache written, x1 in the scratch). */
int moekit_plan_one_token(const block_plan *b, const float *x, const float *cos_h,
                          const float *sin_h, int64_t pos, float *scratch, int64_t *ids,
                          float *weights, float *out) {
    const int64_t D = block_width(b);
    float *h = scratch, *x1 = h + 2 * D, *y = x1 + D, *rest = x1 + 2 * D;
    if (moekit_plan_attention_one_token(b, x, cos_h, sin_h, pos, scratch)) return -1;
    if (block_ffn(b, h, 1, rest, ids, weights, y))
        return -2; /* the attention step is written: the caller must not run it again */
    for (int64_t i = 0; i < D; i++) out[i] = x1[i] + y[i];
    return 0;
}

/* One position of B (2 to 16) sequences through a whole block, as the layer calls run it: h =
 * rmsnorm(x, attn_norm) (B rows), x1 = x + block_attention(h), out = x1 + block_ffn(rmsnorm(x1,
 * ffn_norm)). x, out: (B, D); scratch: 4 B D + the larger of the attention's ((2 H + 2 KV) hd B,
 * or the latent scratch) and the FFN's (B max(2 E + K (3 F + 2 D), 3 SW + 2 D + 1), or a dense
 * FFN's 3 B F) floats (decode_block.scratch_floats); ids, weights: B K. Returns 0, or -1 if the
 * attention or the FFN could not run (the cache may be written at pos). */
static int block_tokens(const float *x, int64_t B, const block_plan *b, const float *cos_h,
                        const float *sin_h, int64_t pos, float *scratch, int64_t *ids,
                        float *weights, float *out) {
    const int64_t D = block_width(b);
    float *h = scratch, *a = h + B * D, *x1 = a + B * D, *y = x1 + B * D, *rest = y + B * D;
    moekit_rmsnorm_f32(x, B, D, b->attn_norm, b->attn_eps, h);
    if (block_attention(b, h, B, cos_h, sin_h, pos, rest, a)) return -1;
    for (int64_t i = 0; i < B * D; i++) x1[i] = x[i] + a[i];
    moekit_rmsnorm_f32(x1, B, D, b->ffn_norm, b->ffn_eps, h);
    if (block_ffn(b, h, B, rest, ids, weights, y)) return -1;
    for (int64_t i = 0; i < B * D; i++) out[i] = x1[i] + y[i];
    return 0;
}

/* One position of B <= 16 sequences through a whole model of n_blocks such blocks: x (B, D) the
 * tokens' rows of embed (V, D), each block's output the next one's input (B = 1:
 * moekit_plan_one_token, else block_tokens), then hidden (B, D) = rmsnorm(that, norm) and logits
 * (B, V) = hidden @ head^T, the head's product split between the threads as every product here.
 * cos_h and sin_h (hd / 2, or the latent attention's rope / 2) the position's angles, shared by
 * every block; pos the cached positions
 * of every block's cache (each written at pos). scratch: the largest block's (block_tokens'
 * size); xs: 2 B D floats; ids and weights: B times the largest top_k. Returns 0, or -1 if a
 * block or the head could not run (some caches may be written at pos: the caller runs the step
 * again from the start, which rewrites them). */
int moekit_decode_tokens(const block_plan *blocks, int64_t n_blocks, const float *embed,
                         const int64_t *tokens, int64_t B, const float *cos_h, const float *sin_h,
                         int64_t pos, const float *norm, double norm_eps, const weight_ref *head,
                         float *scratch, float *xs, int64_t *ids, float *weights, float *hidden,
                         float *logits) {
    const int64_t D = head->I;
    const float *in = B == 1 ? embed + tokens[0] * D : xs; /* a lone token's row, read in place */
    for (int64_t r = 0; B > 1 && r < B; r++)
        memcpy(xs + r * D, embed + tokens[r] * D, (size_t)D * sizeof(float));
    for (int64_t i = 0; i < n_blocks; i++) {
        const block_plan *b = &blocks[i];
        float *out = xs + ((i + 1) % 2) * B * D;
        const int failed =
            B == 1 ? moekit_plan_one_token(b, in, cos_h, sin_h, pos, scratch, ids, weights, out)
                   : block_tokens(in, B, b, cos_h, sin_h, pos, scratch, ids, weights, out);
        if (failed) return -1;
        in = out;
    }
    moekit_rmsnorm_f32(in, B, D, norm, norm_eps, hidden);
    void *p = prepared(head, hidden, B);
    if (p == NULL) return -1;
#pragma omp parallel if (head->O * head->I >= min_parallel_weights)
    product(head, p, B, logits);
    release(head, p);
    return 0;
}
