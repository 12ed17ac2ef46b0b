/* moekit/quant/kernels.c's portable body: the float path (a row dequantized in chunks, then
 * multiplied by the rows of x) and the int8-activation path in plain C. Included by kernels.c. */

/* ---------------------------------------------------------------- portable body */

/* Weights [i0, i0 + n) of row o as float; int8 unscaled (its scale multiplies the row's dot). */
static void dequantize_chunk(const weight_t *w, int64_t o, int64_t i0, int64_t n, float *out) {
    const int64_t I = w->I, G = I / GROUP;
    if (w->kind == BF16) {
        const uint16_t *row = (const uint16_t *)w->data + o * I + i0;
        for (int64_t k = 0; k < n; k++) out[k] = from_bits((uint32_t)row[k] << 16);
        return;
    }
    if (w->kind == INT8) {
        const int8_t *row = (const int8_t *)w->data + o * I + i0;
        for (int64_t k = 0; k < n; k++) out[k] = (float)row[k];
        return;
    }
    const uint8_t *bytes = (const uint8_t *)w->data + o * (I / 2);
    for (int64_t g = i0 / GROUP; g < (i0 + n) / GROUP; g++)
        dequantize_group_at(bytes + g * (GROUP / 2), w->kind == MXFP4, w->scales,
                            w->kind == MXFP4 ? NULL : w->offsets, o * G + g,
                            out + (g * GROUP - i0));
}

/* sums[r] = x[r, :] . W[o, :] for r < R: the row dequantized CHUNK weights at a time, each chunk
 * multiplied by every row of x into 32 lanes per row, the lanes summed in a fixed tree. */
static void row_portable(const weight_t *w, const float *x, int64_t R, int64_t o, float *sums) {
    const int64_t I = w->I;
    float acc[MAX_ROWS][32];
    float buf[CHUNK];
    memset(acc, 0, sizeof acc);
    for (int64_t i0 = 0; i0 < I; i0 += CHUNK) {
        int64_t n = I - i0 < CHUNK ? I - i0 : CHUNK;
        dequantize_chunk(w, o, i0, n, buf);
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * I + i0;
            int64_t k = 0;
            for (; k + 32 <= n; k += 32)
                for (int j = 0; j < 32; j++) acc[r][j] += xr[k + j] * buf[k + j];
            for (int j = 0; k + j < n; j++) acc[r][j] += xr[k + j] * buf[k + j];
        }
    }
    for (int64_t r = 0; r < R; r++) {
        float lanes[8];
        for (int j = 0; j < 8; j++)
            lanes[j] = (acc[r][j] + acc[r][j + 8]) + (acc[r][j + 16] + acc[r][j + 24]);
        sums[r] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
                  ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    }
}

/* ================================================================ int8-activation path
 *
 * llama.cpp's q8_0 idea (ggml-cpu's ggml_vec_dot_q4_0_q8_0 / q8_0_q8_0 / mxfp4_q8_0, our own
 * code): each row of x is quantized once per call to int8 per block of 32 (xd = max|x| / 127,
 * code = round-half-even(x / xd), exactly torch.round(x / xd)), and each block's weights are
 * multiplied by the codes in integers: sum(q_w q_x) is exact in int32, and a weight row's dot is
 * sum over blocks of (weight scale * xd) * that integer, accumulated in float32 in a fixed order.
 * int4 (w = d nibble + m, m = -8 d without a zero point): the unsigned nibbles times the codes,
 * plus sum over blocks of m * xs, xs = xd * sum(codes) (the dequantized x block's sum, as q8_1
 * keeps it): the result is exactly the product of the dequantized weight and the dequantized x,
 * up to float32 summation order. int8: the channel's scale after the row. MXFP4: twice the E2M1
 * value as int8 (a table), the scale halved. The 4-bit bodies quantize x de-interleaved per block
 * (the 16 even elements, then the 16 odd: a byte's low nibbles, then its high ones). */

/* codes (R, I) int8, xd and xs (R, I/32): the quantized rows of x (I a multiple of 32). perm:
 * each block's codes in x_perm's order (evens, then odds). */
static void quantize_x_portable(const float *x, int64_t n_blocks, int perm, int8_t *codes,
                                float *xd, float *xs) {
    for (int64_t k = 0; k < n_blocks; k++) {
        const float *v = x + k * GROUP;
        float amax = 0.0f;
        for (int j = 0; j < GROUP; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        int sum = 0;
        for (int j = 0; j < GROUP; j++) {
            int q = d == 0.0f ? 0 : (int)nearbyintf(v[j] / d);
            sum += q;
            int at = perm ? (j & 1) * (GROUP / 2) + j / 2 : j;
            codes[k * GROUP + at] = (int8_t)q;
        }
        xd[k] = d;
        xs[k] = d * (float)sum;
    }
}

static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* sums[r] = x[r, :] . W[o, :] over the quantized x, each block's integer dot exact, then
 * (weight scale * xd) times it added in float32 block by block; int4's offset term apart. */
static void row_x8_portable(const weight_t *w, const int8_t *codes, const float *xd,
                            const float *xs, int64_t R, int64_t o, float *sums) {
    const int64_t I = w->I, G = I / GROUP;
    for (int64_t r = 0; r < R; r++) {
        const int8_t *q = codes + r * I;
        const float *dr = xd + r * G, *sr = xs + r * G;
        float acc = 0.0f, corr = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const int8_t *qg = q + g * GROUP;
            int32_t dot = 0;
            float scale;
            if (w->kind == INT8) {
                const int8_t *wg = (const int8_t *)w->data + o * I + g * GROUP;
                for (int j = 0; j < GROUP; j++) dot += (int32_t)wg[j] * qg[j];
                scale = 1.0f;
            } else {
                const uint8_t *b = (const uint8_t *)w->data + o * (I / 2) + g * (GROUP / 2);
                if (w->kind == MXFP4) {
                    for (int j = 0; j < GROUP / 2; j++)
                        dot += E2M1_X2[b[j] & 15] * qg[2 * j] + E2M1_X2[b[j] >> 4] * qg[2 * j + 1];
                    scale = e8m0_to_float(((const uint8_t *)w->scales)[o * G + g], 1);
                } else {
                    for (int j = 0; j < GROUP / 2; j++)
                        dot += (b[j] & 15) * qg[2 * j] + (b[j] >> 4) * qg[2 * j + 1];
                    scale = fp16_to_float(((const uint16_t *)w->scales)[o * G + g]);
                    float m = w->offsets ? fp16_to_float(w->offsets[o * G + g]) : -8.0f * scale;
                    corr += m * sr[g];
                }
            }
            acc += scale * dr[g] * (float)dot;
        }
        sums[r] = acc + corr;
    }
}

/* The portable bodies over weight rows [o0, o1), their sums as FOR_ROWS lays them out. */
static void rows_portable(const weight_t *w, const float *x, int64_t R, int64_t o0, int64_t o1,
                          float *out) {
    for (int64_t o = o0; o < o1; o++) row_portable(w, x, R, o, out + (o - o0) * MAX_ROWS);
}

static void rows_x8_portable(const weight_t *w, const int8_t *codes, const float *xd,
                             const float *xs, int64_t R, int64_t o0, int64_t o1, float *out) {
    for (int64_t o = o0; o < o1; o++)
        row_x8_portable(w, codes, xd, xs, R, o, out + (o - o0) * MAX_ROWS);
}
