/* moekit/inference/decode_glue.c's multi-head latent attention (DeepSeek-V2/V3, Moonlight, Kimi
 * K2) for one decode position of B <= 16 sequences in one call, in the latent space as
 * moekit/inference/decode_mla.py's torch twin computes it (its docstring has the algebra):
 *
 *     q = q_proj(x), or q_b_proj(rmsnorm(q_a_proj(x)));  [c | k_rope] = kv_a_proj(x)
 *     c = rmsnorm(c) and k_rope rotated, written at position pos of the two caches
 *     per head h: q_lat = q_nope W_UK[h] (R);  scores_j = (q_lat . c_j + q_rope . k_rope_j) scale
 *                 o_lat = softmax(scores) c (R);  y[h] = W_UV[h] o_lat (v)
 *     out = o_proj(y)
 *
 * kv_b_proj (H (nope + v), R) holds W_UK[h] (nope, R) and W_UV[h] (v, R) head by head; its rows
 * are read as float32 (`float_row`: the weight `QuantizedWeight.dequantize` gives) and every sum
 * here is float32, but W_UV's product takes o_lat as the quantized kernels take every product's x
 * (int8 per block of 32 for int4 and MXFP4 weights by default: `quant.kernels.set_activations`).
 * Included by decode_glue.c, after the weight references, `product` and `rope`. */

/* The latent attention as its block reads it: q (H qk, D), or q_a (Rq, D), q_a_norm (Rq) and q_b
 * (H qk, Rq) where q.O is 0 (the low-rank query); kv_a (R + rope, D), kv_a_norm (R); kv_b
 * (H (nope + v), R), float32 or any quantized kind (`float_row`); o (D, H v); the two norms'
 * eps; the heads and their parts' widths (qk = nope + rope); interleave: the rotary pairs come
 * interleaved (x0, x1), (x2, x3) ... and are gathered into halves before the rotation
 * (rope_interleave). */
typedef struct {
    weight_ref q, q_a, q_b, kv_a, kv_b, o;
    const float *q_a_norm, *kv_a_norm;
    double eps;
    int64_t H, nope, rope, v, R;
    float scale;
    int32_t interleave;
} latent_ref;

/* The widest vector unit this CPU has, chosen when the library loads, for the loops below that
 * the compiler vectorizes (no sums across lanes: the same bits on every unit). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones) /* (an ifunc: glibc's ELF loader resolves it) */
#define WIDEST __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef WIDEST
#define WIDEST
#endif

/* y (n) += a x (n). */
WIDEST static void axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#include "../quant/scalar_formats.h" /* from_bits, fp16_to_float, e8m0_to_float, dequantize_group */

/* Row o of w (I floats) as float32, as `QuantizedWeight.dequantize` computes it: a float32 row in
 * place, else into buf: bf16 widened; int8 times its row's scale; int4 (its nibbles, element 2j
 * low, in groups of 32) (q - 8) times its group's half scale, or q scale + offset with zero
 * points; MXFP4 E2M1 times 2^(byte - 127). */
WIDEST static const float *float_row(const weight_ref *w, int64_t o, float *buf) {
    const int64_t I = w->I;
    if (w->kind < 0) return (const float *)w->data + o * w->ld;
    if (w->kind == 0) { /* bf16: the high half of a float32 */
        const uint16_t *r = (const uint16_t *)w->data + o * I;
        for (int64_t i = 0; i < I; i++) buf[i] = from_bits((uint32_t)r[i] << 16);
        return buf;
    }
    if (w->kind == 1) {
        const int8_t *r = (const int8_t *)w->data + o * I;
        const float s = ((const float *)w->scales)[o];
        for (int64_t i = 0; i < I; i++) buf[i] = (float)r[i] * s;
        return buf;
    }
    const uint8_t *r = (const uint8_t *)w->data + o * (I / 2);
    const uint16_t *offsets = w->kind == 3 ? (const uint16_t *)w->offsets : NULL;
    for (int64_t g = 0; g < I / 32; g++) /* kinds 2, 3 (zero points) and 4 (MXFP4) */
        dequantize_group_at(r + g * 16, w->kind == 4, w->scales, offsets, o * (I / 32) + g,
                            buf + g * 32);
    return buf;
}

/* x (rope) rotated at the position's angles into out: gathered from interleaved pairs first. */
static void rope_latent(const float *x, int64_t n, int interleave, const float *cos_h,
                        const float *sin_h, float *out) {
    float halves[n > 0 ? n : 1];
    if (interleave)
        for (int64_t i = 0; i < n / 2; i++) halves[i] = x[2 * i], halves[n / 2 + i] = x[2 * i + 1];
    rope(interleave ? halves : x, cos_h, sin_h, n / 2, out);
}

#define HEADS_A_TASK 8 /* at most: heads whose products over the cache read each latent once */

/* Heads [h0, h1) (at most HEADS_A_TASK) of sequence b: q (B, H qk) as projected (q_rope already
 * rotated), the caches' first L positions (the last `window` of them where window > 0) -> y
 * (B, H v) at those heads' columns. The products over the cache (the heads' scores at once) and
 * W_UV run the kernels' row functions (`rows`: the float32 kernel's, or the quantized kernels',
 * which take o_lat as they take every product's x: float32 for bf16 and int8 weights, int8 per
 * block of 32 for int4 and MXFP4 by default); the sums over W_UK's rows (`float_row`'s) and the
 * cache's are `axpy`s. work: latent_work floats. Returns 0, or -1 if o_lat cannot be prepared
 * for kv_b. */
static int latent_heads(const latent_ref *w, int64_t b, int64_t h0, int64_t h1, const float *q,
                        const float *latent_cache, const float *rope_cache, int64_t L,
                        int64_t window, int64_t max_len, float *work, float *y) {
    const int64_t R = w->R, nope = w->nope, rp = w->rope, qk = nope + rp, e = nope + w->v;
    const int64_t first = window > 0 && L > window ? L - window : 0, n = L - first, nh = h1 - h0;
    const float *c = latent_cache + (b * max_len + first) * R;
    const float *kr = rope_cache + (b * max_len + first) * rp;
    float *q_lat = work, *o_lat = q_lat + nh * R, *scores = o_lat + nh * R;
    float *s_rope = scores + nh * n, *q_rope = s_rope + nh * n, *row = q_rope + nh * rp;
    float *kv = row + R; /* a row of W_UV's product (kv_b's O wide) */
    for (int64_t i = 0; i < nh * R; i++) q_lat[i] = o_lat[i] = 0.0f;
    for (int64_t g = 0; g < nh; g++) {
        const float *qh = q + (b * w->H + h0 + g) * qk;
        for (int64_t i = 0; i < nope; i++) /* q_lat = q_nope W_UK[h] */
            axpy(q_lat + g * R, qh[i], float_row(&w->kv_b, (h0 + g) * e + i, row), R);
        memcpy(q_rope + g * rp, qh + nope, rp * sizeof(float));
    }
    f32_rows(q_lat, nh, R, c, R, 0, n, n, NULL, scores); /* (nh, n) */
    f32_rows(q_rope, nh, rp, kr, rp, 0, n, n, NULL, s_rope);
    for (int64_t g = 0; g < nh; g++) {
        float *sg = scores + g * n, top = -INFINITY, total = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            sg[j] = (sg[j] + s_rope[g * n + j]) * w->scale;
            if (sg[j] > top) top = sg[j];
        }
        for (int64_t j = 0; j < n; j++) total += sg[j] = expf(sg[j] - top);
        for (int64_t j = 0; j < n; j++) sg[j] /= total;
    }
    for (int64_t j = 0; j < n; j++) /* o_lat = probs c, each cached latent read once */
        for (int64_t g = 0; g < nh; g++) axpy(o_lat + g * R, scores[g * n + j], c + j * R, R);
    for (int64_t g = 0; g < nh; g++) { /* y[h] = W_UV[h] o_lat */
        const int64_t h = h0 + g;
        void *p = prepared(&w->kv_b, o_lat + g * R, 1);
        if (p == NULL) return -1;
        rows(&w->kv_b, p, 1, h * e + nope, (h + 1) * e, kv);
        release(&w->kv_b, p);
        memcpy(y + (b * w->H + h) * w->v, kv + h * e + nope, (size_t)w->v * sizeof(float));
    }
    return 0;
}

/* The floats of latent_heads' work over L cached positions. */
static int64_t latent_work(const latent_ref *w, int64_t L) {
    return HEADS_A_TASK * (2 * w->R + 2 * L + w->rope) + w->R + w->kv_b.O;
}

/* One decode position's latent attention for B <= 16 sequences (the header's comment): x (B, D);
 * latent_cache (B, 1, max_len, R) and rope_cache (B, 1, max_len, rope) with pos positions filled,
 * written at pos; cos and sin (rope / 2) the position's angles; attends every cached position,
 * or the last `window` where window > 0. out (B, D). scratch: B (H (nope + rope) + Rq + R + rope
 * + H v) floats (Rq: 0 without the low-rank query; decode_mla.latent_floats).
 * Returns 0, or -1 if a product's x cannot be prepared (the caches may be written at pos: the
 * caller, which has not counted it, runs the step's reference, which writes it again). */
int moekit_latent_attention_block(const float *x, int64_t B, const latent_ref *w,
                                  const float *cos_h, const float *sin_h, float *latent_cache,
                                  float *rope_cache, int64_t pos, int64_t max_len, int64_t window,
                                  float *scratch, float *out) {
    const int64_t H = w->H, R = w->R, rp = w->rope, qk = w->nope + rp, L = pos + 1;
    const int64_t Rq = w->q.O ? 0 : w->q_a.O;
    float *q = scratch, *qa = q + B * H * qk, *kva = qa + B * Rq, *y = kva + B * (R + rp);
    const weight_ref *wq = w->q.O ? &w->q : &w->q_a;
    void *px = prepared(wq, x, B);
    void *pkv = w->kv_a.kind == wq->kind ? px : prepared(&w->kv_a, x, B);
    void *pqa = NULL, *py = NULL;
    int failed = px == NULL || pkv == NULL;
    const int64_t weights = (wq->O + w->kv_a.O) * wq->I + w->kv_b.O * R + w->o.O * w->o.I +
                            (w->q.O ? 0 : w->q_b.O * w->q_b.I);
    const int64_t cached = B * H * L * (R + rp); /* the numbers the heads read of the caches */
    const int parallel =
        weights >= min_parallel_weights || (B * H > HEADS_A_TASK && cached >= 262144);
    if (failed) goto done;
#pragma omp parallel if (parallel)
    {
        product(wq, px, B, w->q.O ? q : qa);
        product(&w->kv_a, pkv, B, kva);
#pragma omp barrier
        if (!w->q.O) {
#pragma omp single
            {
                moekit_rmsnorm_f32(qa, B, Rq, w->q_a_norm, w->eps, qa);
                pqa = prepared(&w->q_b, qa, B);
                failed = pqa == NULL;
            }
            if (!failed) product(&w->q_b, pqa, B, q);
#pragma omp barrier
        }
#pragma omp single
        if (!failed)
            for (int64_t b = 0; b < B; b++) { /* the caches at pos; each head's q_rope rotated */
                const float *kv = kva + b * (R + rp);
                float *at = latent_cache + (b * max_len + pos) * R;
                moekit_rmsnorm_f32(kv, 1, R, w->kv_a_norm, w->eps, at);
                rope_latent(kv + R, rp, w->interleave, cos_h, sin_h,
                            rope_cache + (b * max_len + pos) * rp);
                for (int64_t h = 0; h < H; h++) {
                    float *qr = q + (b * H + h) * qk + w->nope;
                    float rotated[rp > 0 ? rp : 1];
                    rope_latent(qr, rp, w->interleave, cos_h, sin_h, rotated);
                    memcpy(qr, rotated, (size_t)rp * sizeof(float));
                }
            }
        if (!failed) {
            float *work = malloc((size_t)latent_work(w, L) * sizeof(float));
            int head_failed = work == NULL;
            /* tasks of (sequence, group of heads), the groups as even as HEADS_A_TASK allows */
            const int64_t groups = (H + HEADS_A_TASK - 1) / HEADS_A_TASK;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < B * groups; t++) {
                const int64_t b = t / groups, h0 = t % groups * H / groups;
                const int64_t h1 = (t % groups + 1) * H / groups;
                head_failed |= head_failed || latent_heads(w, b, h0, h1, q, latent_cache,
                                                           rope_cache, L, window, max_len, work, y);
            }
            free(work);
            if (head_failed) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp barrier
#pragma omp single
            if (!failed) {
                py = prepared(&w->o, y, B);
                failed = py == NULL;
            }
            if (!failed) product(&w->o, py, B, out);
        }
    }
done:
    release(wq, px);
    if (pkv != px) release(&w->kv_a, pkv);
    if (pqa) release(&w->q_b, pqa);
    release(&w->o, py);
    return failed ? -1 : 0;
}
