/* moekit/inference/decode_glue.c's MoE layers in one call: a decoded token's (routing, its top-k
 * gated experts, the weighted sum, the shared experts), a few tokens' (each chosen expert once, on
 * its tokens' rows together), the experts' part alone (offloaded experts, fetched by the caller)
 * and the shared experts alone. Included by
 * decode_glue.c, after the weight references and the row functions the products run. */

/* o (n) = the gated activation of gate g (n) and up u (n): act's (`glu`), or silu(g) * u where
 * act is NULL (moekit_q_glu's SwiGLU, without needing the quantized kernels' library). */
static void gated_activation(const float *g, const float *u, int64_t n, const activation_ref *act,
                             float *o) {
    if (act)
        glu(g, u, n, act->clamped, act->alpha, act->limit, o);
    else
        for (int64_t f = 0; f < n; f++) o[f] = g[f] / (1.0f + expf(-g[f])) * u[f];
}

/* s (T) = 1 / (1 + exp(-s)) in place: the shared experts' scales from their gate's logits. */
static void sigmoid_scales(float *s, int64_t T) {
    for (int64_t t = 0; t < T; t++) s[t] = 1.0f / (1.0f + expf(-s[t]));
}

/* Gated experts over grouped rows: expert j of J, w_in[j] (2F, D) = [W_gate; W_up] and w_out[j]
 * (D, F) (with their biases where the refs hold them), runs on its n[j] rows at xs[j] (D floats
 * each), each product over all n[j] rows at once as moekit's per-expert path computes it; the
 * activation silu(gate) * up or act's. Row r (over all experts, in order) goes to y's row
 * token[r] (D floats) times weight[r]: y = y_r w_r where first[r], else y + y_r w_r, so that a
 * token's experts, given in increasing expert order, sum as moekit's selected_experts_forward
 * sums them. work: N (3F + D) floats, N the rows of all experts. Returns 0, or -1 if a product's
 * x cannot be prepared (nothing meaningful in y). */
static int grouped_experts(int64_t J, const int64_t *n, const float *const *xs,
                           const weight_ref *w_in, const weight_ref *w_out,
                           const activation_ref *act, const int64_t *token, const float *weight,
                           const unsigned char *first, float *work, float *y) {
    const int64_t F = w_out[0].I, D = w_out[0].O, f_tasks = (F + ROWS_A_TASK - 1) / ROWS_A_TASK;
    int64_t start[J > 0 ? J : 1], N = 0;
    for (int64_t j = 0; j < J; j++) start[j] = N, N += n[j];
    float *h = work, *a = h + N * 2 * F, *out = a + N * F; /* [gate | up], activations, outputs */
    void *px[J > 0 ? J : 1], *pa[J > 0 ? J : 1];
    int failed = act != NULL && glu == NULL; /* (the caller checks; a mismatch: the reference) */
    for (int64_t j = 0; j < J; j++) { /* one token's x once per kind: its experts share it */
        const int shared = j > 0 && xs[j] == xs[0] && n[j] == n[0] && w_in[j].kind == w_in[0].kind;
        px[j] = shared ? px[0] : prepared(&w_in[j], xs[j], n[j]);
        pa[j] = NULL;
        failed |= px[j] == NULL;
    }
    if (failed) goto done;
#pragma omp parallel if (J * 3 * F * D >= min_parallel_weights)
    {
        /* gate and up rows of one range on one thread: its activations need no barrier */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < J * f_tasks; t++) {
            int64_t j = t / f_tasks, f0 = (t % f_tasks) * ROWS_A_TASK;
            int64_t f1 = f0 + ROWS_A_TASK < F ? f0 + ROWS_A_TASK : F;
            float *hj = h + start[j] * 2 * F;
            rows(&w_in[j], px[j], n[j], f0, f1, hj);
            rows(&w_in[j], px[j], n[j], F + f0, F + f1, hj);
            for (int64_t r = 0; r < n[j]; r++) {
                const float *g = hj + r * 2 * F;
                gated_activation(g + f0, g + F + f0, f1 - f0, act, a + (start[j] + r) * F + f0);
            }
        }
#pragma omp single
        for (int64_t j = 0; j < J; j++) {
            pa[j] = prepared(&w_out[j], a + start[j] * F, n[j]);
            if (pa[j] == NULL) failed = 1;
        }
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t d0 = 0; d0 < D; d0 += ROWS_A_TASK) {
                int64_t d1 = d0 + ROWS_A_TASK < D ? d0 + ROWS_A_TASK : D;
                for (int64_t j = 0; j < J; j++)
                    rows(&w_out[j], pa[j], n[j], d0, d1, out + start[j] * D);
                for (int64_t r = 0; r < N; r++) {
                    const float *o = out + r * D;
                    float *yt = y + token[r] * D;
                    for (int64_t d = d0; d < d1; d++)
                        yt[d] = first[r] ? o[d] * weight[r] : yt[d] + o[d] * weight[r];
                }
            }
        }
    }
done:
    for (int64_t j = 0; j < J; j++) {
        if (j == 0 || px[j] != px[0]) release(&w_in[j], px[j]);
        release(&w_out[j], pa[j]);
    }
    return failed ? -1 : 0;
}

/* One token x (D) through K gated experts (chosen in increasing expert order), as
 * grouped_experts runs them: y (D) = sum_k weights[k] * expert_k(x), summed y = y_0 w_0, then
 * y = y + y_k w_k. h: scratch of K * (3F + D) floats. Returns as grouped_experts. */
int moekit_experts_one_token(const float *x, int64_t K, const weight_ref *w_in,
                             const weight_ref *w_out, const activation_ref *act,
                             const float *weights, float *h, float *y) {
    int64_t n[K > 0 ? K : 1], token[K > 0 ? K : 1];
    const float *xs[K > 0 ? K : 1];
    unsigned char first[K > 0 ? K : 1];
    for (int64_t k = 0; k < K; k++) n[k] = 1, xs[k] = x, token[k] = 0, first[k] = k == 0;
    return grouped_experts(K, n, xs, w_in, w_out, act, token, weights, first, h, y);
}

/* The shared experts of a MoE layer (moekit's SharedExperts), fused into one gated FFN of width
 * SW: w_in (2SW, D) = [W_gate; W_up], w_out (D, SW), with their biases where the refs hold them;
 * the output scaled by sigmoid(x @ gate^T) where gate is (1, D) (Qwen2-MoE's shared gate), not
 * where it has no rows (gate.O 0: ungated). */
typedef struct {
    weight_ref w_in, w_out, gate;
} shared_ref;

/* y (T, D) = the shared experts of T tokens x (T, D): their rows through the one gated FFN as
 * grouped_experts runs an expert, each row's output times its scale (1, or 1 / (1 + exp(-g)) of
 * its gate logit g: o * 1 is o). work: T (3 SW + D + 1) floats. Returns as grouped_experts. */
int moekit_shared_tokens(const float *x, int64_t T, const shared_ref *s,
                         const activation_ref *act, float *work, float *y) {
    float *scale = work, *h = scale + T;
    int64_t n[1] = {T}, token[T > 0 ? T : 1];
    const float *xs[1] = {x};
    unsigned char first[T > 0 ? T : 1];
    for (int64_t t = 0; t < T; t++) token[t] = t, first[t] = 1, scale[t] = 1.0f;
    if (s->gate.O) {
        void *p = prepared(&s->gate, x, T);
        if (p == NULL) return -1;
        rows(&s->gate, p, T, 0, 1, scale); /* (T, 1): each token's logit */
        release(&s->gate, p);
        sigmoid_scales(scale, T);
    }
    return grouped_experts(1, n, xs, &s->w_in, &s->w_out, act, token, scale, first, h, y);
}

/* moekit_shared_tokens' own arithmetic for a caller that runs the products itself (its
 * projections called as modules, whose hooks then run): a (T, SW) = the activation of h (T, 2 SW)
 * = [gate | up] rows, and where gate_logits (T) is given, those logits made the rows' scales in
 * place, as moekit_shared_tokens computes both. */
void moekit_shared_parts(const float *h, int64_t T, int64_t SW, const activation_ref *act,
                         float *gate_logits, float *a) {
    for (int64_t t = 0; t < T; t++)
        gated_activation(h + t * 2 * SW, h + t * 2 * SW + SW, SW, act, a + t * SW);
    if (gate_logits) sigmoid_scales(gate_logits, T);
}

/* y (T, D) += the shared experts of x (T, D) where `shared` is given (moekit_shared_tokens, into
 * work: T (3 SW + 2 D + 1) floats), as MoELayer adds them: y + shared(x), element by element. */
static int add_shared(const float *x, int64_t T, const shared_ref *shared,
                      const activation_ref *act, float *work, float *y) {
    if (shared == NULL) return 0;
    const int64_t D = shared->w_out.O;
    float *ys = work;
    if (moekit_shared_tokens(x, T, shared, act, ys + T * D, ys)) return -1;
    for (int64_t i = 0; i < T * D; i++) y[i] = y[i] + ys[i];
    return 0;
}

/* The router's logits for T tokens x (T, D) (+ its bias; float32) and each token's top-k routing
 * (moekit_route_topk_f32): ids and weights (T, K) best first; scores: T E floats of scratch. */
static void route_tokens(const float *x, int64_t T, const weight_ref *router,
                         const float *expert_bias, int64_t K, int sigmoid, int normalize,
                         float scaling, int64_t n_groups, int64_t topk_groups, float *logits,
                         float *scores, int64_t *ids, float *weights) {
    const int64_t E = router->O;
    rows(router, x, T, 0, E, logits);
    for (int64_t t = 0; t < T; t++)
        moekit_route_topk_f32(logits + t * E, E, expert_bias, K, sigmoid, normalize, scaling,
                              n_groups, topk_groups, scores + t * E, ids + t * K, weights + t * K);
}

/* One token's MoE layer: logits (E) = router x (+ its bias; float32), the top-k routing of
 * moekit_route_topk_f32 (ids and weights best first, into ids and weights), then
 * moekit_experts_one_token over the chosen experts in increasing expert order, then the shared
 * experts added where given (add_shared; NULL: none). w_in and w_out: the E experts' weights, act
 * their activation (and the shared experts'); scratch: max(2E + K (3F + D), 3 SW + 2 D + 1)
 * floats. Returns as moekit_experts_one_token. */
int moekit_moe_one_token(const float *x, const weight_ref *router, const float *expert_bias,
                         int64_t K, int sigmoid, int normalize, float scaling, int64_t n_groups,
                         int64_t topk_groups, const weight_ref *w_in, const weight_ref *w_out,
                         const activation_ref *act, const shared_ref *shared, float *scratch,
                         int64_t *ids, float *weights, float *y) {
    const int64_t E = router->O;
    float *logits = scratch, *scores = scratch + E, *h = scores + E;
    route_tokens(x, 1, router, expert_bias, K, sigmoid, normalize, scaling, n_groups, topk_groups,
                 logits, scores, ids, weights);
    int64_t order[K > 0 ? K : 1];
    for (int64_t k = 0; k < K; k++) { /* insertion sort by expert: K is small */
        int64_t j = k;
        for (; j > 0 && ids[order[j - 1]] > ids[k]; j--) order[j] = order[j - 1];
        order[j] = k;
    }
    weight_ref chosen_in[K > 0 ? K : 1], chosen_out[K > 0 ? K : 1];
    float chosen_weights[K > 0 ? K : 1];
    for (int64_t k = 0; k < K; k++) {
        chosen_in[k] = w_in[ids[order[k]]], chosen_out[k] = w_out[ids[order[k]]];
        chosen_weights[k] = weights[order[k]];
    }
    if (moekit_experts_one_token(x, K, chosen_in, chosen_out, act, chosen_weights, h, y))
        return -1;
    return add_shared(x, 1, shared, act, scratch, y);
}

/* T decoded tokens x (T, D) through the MoE layer, each routed as moekit_moe_one_token routes it
 * (ids and weights (T, K)), then every chosen expert once, on its tokens' rows together (tokens
 * in order), as moekit's selected_experts_forward runs them: the same products, the same sums;
 * then the shared experts added where given (add_shared). scratch: T max(2E + K (3F + 2D), 3 SW +
 * 2 D + 1) floats. Returns as grouped_experts. */
int moekit_moe_tokens(const float *x, int64_t T, const weight_ref *router,
                      const float *expert_bias, int64_t K, int sigmoid, int normalize,
                      float scaling, int64_t n_groups, int64_t topk_groups,
                      const weight_ref *w_in, const weight_ref *w_out,
                      const activation_ref *act, const shared_ref *shared, float *scratch,
                      int64_t *ids, float *weights, float *y) {
    const int64_t E = router->O, D = w_out[0].O, N = T * K;
    float *logits = scratch, *scores = logits + T * E, *xg = scores + T * E, *work = xg + N * D;
    route_tokens(x, T, router, expert_bias, K, sigmoid, normalize, scaling, n_groups, topk_groups,
                 logits, scores, ids, weights);
    const int64_t most = E < N ? E : N; /* experts that can be chosen */
    int64_t n[most > 0 ? most : 1], token[N > 0 ? N : 1], J = 0, r = 0;
    weight_ref used_in[most > 0 ? most : 1], used_out[most > 0 ? most : 1];
    const float *xs[most > 0 ? most : 1];
    float weight[N > 0 ? N : 1];
    unsigned char first[N > 0 ? N : 1], seen[T > 0 ? T : 1];
    memset(seen, 0, sizeof seen);
    for (int64_t e = 0; e < E; e++) { /* the experts in increasing order, their tokens in order */
        const int64_t r0 = r;
        for (int64_t t = 0; t < T; t++) {
            const int64_t *chosen = ids + t * K;
            for (int64_t k = 0; k < K; k++)
                if (chosen[k] == e) { /* a token's first row is its lowest expert's */
                    token[r] = t, weight[r] = weights[t * K + k], first[r] = !seen[t];
                    seen[t] = 1;
                    memcpy(xg + r * D, x + t * D, (size_t)D * sizeof(float));
                    r++;
                }
        }
        if (r > r0)
            n[J] = r - r0, used_in[J] = w_in[e], used_out[J] = w_out[e], xs[J] = xg + r0 * D, J++;
    }
    if (grouped_experts(J, n, xs, used_in, used_out, act, token, weight, first, work, y))
        return -1;
    return add_shared(x, T, shared, act, scratch, y);
}

/* A dense block's FFN (moekit's DenseFFN): w_down (silu(w_gate x) * (w_up x)), gate and up (F, D)
 * and down (D, F) stored apart as its checkpoint keeps them, no biases. */
typedef struct {
    weight_ref gate, up, down;
} dense_ref;

/* y (T, D) = the dense FFN of T rows x (T, D), every product over all T rows at once, the
 * activation gated_activation's SwiGLU. work: 3 T F floats. Returns 0, or -1 if a product's x
 * cannot be prepared (nothing meaningful in y). */
int moekit_dense_tokens(const float *x, int64_t T, const dense_ref *d, float *work, float *y) {
    const int64_t F = d->gate.O;
    float *g = work, *u = g + T * F, *a = u + T * F;
    void *px = prepared(&d->gate, x, T);
    void *pu = d->up.kind == d->gate.kind ? px : prepared(&d->up, x, T);
    void *pa = NULL;
    int failed = px == NULL || pu == NULL;
    if (failed) goto done;
#pragma omp parallel if (3 * F * d->gate.I >= min_parallel_weights)
    {
        product(&d->gate, px, T, g);
        product(&d->up, pu, T, u);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t f0 = 0; f0 < T * F; f0 += ROWS_A_TASK * 64) {
            const int64_t n = T * F - f0 < ROWS_A_TASK * 64 ? T * F - f0 : ROWS_A_TASK * 64;
            gated_activation(g + f0, u + f0, n, NULL, a + f0);
        }
#pragma omp single
        {
            pa = prepared(&d->down, a, T);
            failed = pa == NULL;
        }
        if (!failed) product(&d->down, pa, T, y);
    }
done:
    release(&d->gate, px);
    if (pu != px) release(&d->up, pu);
    release(&d->down, pa);
    return failed ? -1 : 0;
}
