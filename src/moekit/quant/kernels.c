/* Few-row products over quantized weights for CPU decode: y (R, O) = x (R, I) @ W^T (+ b), x
 * float32, R <= 16 a pass (moekit_q_linear makes passes of more), W (O, I) stored in one of
 * moekit.quant.schemes' layouts (its docstring is binding; `dequantize` there is the reference):
 *   bf16     uint16 (O, I)                                  w = bits << 16
 *   int8     int8 (O, I), float32 scales (O,)               w = s[o] * q
 *   int4     uint8 (O, I/2), float16 scales (O, I/32),      w = d * (nibble - 8)
 *            float16 offsets (O, I/32) or none              w = d * nibble + m (zero point)
 *   mxfp4    uint8 (O, I/2), uint8 E8M0 scales (O, I/32)    w = E2M1[nibble] * 2^(e - 127)
 * with byte j of a 4-bit row holding element 2j in its low nibble and 2j + 1 in its high one.
 *
 * A decode step's products stream their weights: each weight row is read once, dequantized in
 * registers and multiplied by every row of x, accumulating in float32; the output rows are split
 * between OpenMP threads. Like decode_kernels.c it links the libgomp torch has already loaded
 * (same soname), so it shares torch's thread pool and thread count; products under
 * MIN_PARALLEL_WEIGHTS run on one thread (the fork costs more than it saves). Each output element
 * is summed by one thread in an order fixed by I and R alone: results do not depend on the thread
 * count (they may on R: rows of x are processed in blocks whose accumulator count depends on the
 * block's size).
 *
 * Three bodies, all compiled on x86-64 and chosen at run time (moekit_q_set_path forces one, for
 * the tests): AVX-512 (AVX512F/BW/VNNI: the AVX2 body with 16-lane steps for int8 weights and for
 * the int8-activation path, its sums bit for bit the AVX2 body's; -DMOEKIT_NO_AVX512 leaves it
 * out), AVX2+FMA+F16C, and a portable C one (the same algorithm: a row dequantized once, in
 * chunks, then multiplied by the R rows; the compiler vectorizes what it can). Other CPUs
 * (aarch64, Apple clang) and -DMOEKIT_PORTABLE compile only the portable body.
 *
 * The AVX2 body's tricks:
 *   - bf16: a bfloat16 is the top half of a float32: of a 32-bit lane holding two, a shift left
 *     by 16 gives the even element and a mask the odd one, with x de-interleaved per 16 once per
 *     call to match (x_perm).
 *   - bf16 and int8 prefetch the weight stream in software, PREFETCH bytes ahead: from DRAM the
 *     hardware prefetchers alone left int8 ~15% slower (measured); the float path's 4-bit
 *     bodies are compute-bound and a prefetch is one more instruction a group (7% slower,
 *     measured); the int8-activation path prefetches X8_PREFETCH bytes ahead.
 *   - int8: widen, convert, and multiply by the channel's scale once, after the row's dot.
 *   - 4-bit: x is de-interleaved once per call (x_perm: per group of 32, the 16 even elements,
 *     then the 16 odd ones), so the low nibbles of a group's 16 bytes multiply x_perm[0:16] and
 *     the high nibbles x_perm[16:32] with no shuffling of the weights. A row's scales (and
 *     offsets) are converted to float once per SEGMENT groups (vcvtph2ps, 8 at a time).
 *   - int4: 8 bytes zero-extended to 32-bit lanes, nibbles split by a mask and a shift,
 *     converted, then w = fma(q, d, m) (m = -8 d without a zero point): the reference's float32
 *     weights exactly, shared by every row of x; ~20 instructions a group of 32 at one row.
 *   - MXFP4: a pshufb table maps each nibble to twice its E2M1 value as int8 (all integers;
 *     llama.cpp's kvalues_mxfp4 trick), with the scale halved (2^(e - 128), from a 256-entry
 *     table); the group's scale multiplies the group's dot once (d * sum(x q)).
 * Not written: an AVX-512 float path for bf16 and 4-bit weights (bf16 decodes at 87-94% of the
 * stream bound on the AVX2 body; 4-bit takes int8 x by default), AVX512-BF16 dot products
 * (they would round x to bf16).
 *
 * The int8-activation path (moekit_q_set_x8 chooses the kinds that take it; its own comment
 * in kernels_portable.h) quantizes x to int8 per block of 32 and multiplies integers instead.
 *
 * moekit_q_swiglu_expert runs a SwiGLU expert's two products and its activation in one call.
 * moekit_q_prepare / moekit_q_rows / moekit_q_release are moekit_q_linear in its two steps (x
 * prepared once, then any range of output rows on the calling thread): the whole-layer calls of
 * moekit/inference/decode_glue.c split a product's rows between their own threads with them.
 * Built and loaded by moekit/quant/kernels.py (through moekit/cbuild.py); tests/
 * test_quant_kernels.py holds every body to F.linear over the dequantized weight, and the AVX-512
 * body to the AVX2 one bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MIN_PARALLEL_WEIGHTS 65536
#define GROUP 32
#define MAX_ROWS 16
#define ROWS_A_CALL 16 /* weight rows a body's call computes (their sums on the caller's stack) */
#define CHUNK 256 /* portable body: weights dequantized at a time (a multiple of GROUP) */

enum { PATH_PORTABLE = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { BF16 = 0, INT8 = 1, INT4 = 2, INT4_ZP = 3, MXFP4 = 4 };

typedef struct {
    int kind;
    int64_t I;
    const void *data;        /* row o: I elements (bf16, int8) or I/2 bytes (4-bit) */
    const void *scales;      /* int8: float (O,); int4: fp16 (O, I/32); mxfp4: uint8 (O, I/32) */
    const uint16_t *offsets; /* int4 with zero point: fp16 (O, I/32); else NULL */
} weight_t;

#include "scalar_formats.h"

static float E8M0_HALF[256]; /* 2^(e - 128): the AVX2 body's halved MXFP4 scales */

/* The bodies, one file each (a unity build: moekit.cbuild hashes the files a source includes). */
#include "kernels_portable.h"
#include "kernels_avx2.h"
#include "kernels_avx2_x8.h"
#include "kernels_avx512.h"

/* ---------------------------------------------------------------- entry points */

static int active_path = -1; /* -1: not chosen yet */

/* Choose the body: -1 the best this CPU runs, PATH_PORTABLE, PATH_AVX2 or PATH_AVX512 (the AVX2
 * body with the int8-activation path's AVX-512 VNNI steps), if the CPU has it. Returns the body
 * now in use, or -1 if the one asked for cannot run here. */
int moekit_q_set_path(int path) {
    for (int e = 0; e < 256; e++) E8M0_HALF[e] = e8m0_to_float((uint8_t)e, 1);
    if (path > PATH_AVX512 || (path == PATH_AVX2 && !avx2_supported()) ||
        (path == PATH_AVX512 && !avx512_supported()))
        return -1;
    if (path < 0)
        path = avx512_supported() ? PATH_AVX512 : avx2_supported() ? PATH_AVX2 : PATH_PORTABLE;
    return active_path = path;
}

static int x8_kinds = 0; /* bit k set: kind k runs the int8-activation path (where I % 32 == 0) */

/* Choose which kinds quantize x to int8 (bit k for kind k; bf16's bit is ignored); -1 leaves the
 * choice as it is. Returns the mask now in use. */
int moekit_q_set_x8(int mask) {
    if (mask >= 0) x8_kinds = mask & ~(1 << BF16);
    return x8_kinds;
}

/* A product's x prepared once for one weight kind: what every weight row's dot then reads. The
 * float path's AVX2 x_perm (bf16: de-interleaved per 16; 4-bit: per group of 32, evens then odds)
 * and sx (4-bit: each group's 4 vectors of x_perm summed lane by lane, int4's m * sum(x) term);
 * or the int8-activation path's codes (R, I), xd and xs (R, I/32), xd4 (R, 4 I/32: each scale 4
 * times, as the 4-bit steps read). One allocation, released by moekit_q_release. */
typedef struct {
    int kind, path, x8;
    int64_t R, I;
    const float *x;
    float *xp, *sx;
    int8_t *codes;
    float *xd, *xs, *xd4;
} prepared_t;

/* A row's first n_blocks codes (each block its evens, then its odds), regrouped per k blocks: the
 * k blocks' evens, then their odds, as the 4-bit steps read k blocks at once. */
static void regroup_codes(int8_t *codes, int64_t n_blocks, int k) {
    int8_t t[4 * GROUP];
    for (int64_t g = 0; g + k <= n_blocks; g += k) {
        int8_t *c = codes + g * GROUP;
        for (int j = 0; j < k; j++) {
            memcpy(t + j * (GROUP / 2), c + j * GROUP, GROUP / 2);
            memcpy(t + (k + j) * (GROUP / 2), c + j * GROUP + GROUP / 2, GROUP / 2);
        }
        memcpy(c, t, (size_t)k * GROUP);
    }
}

static void prepare_x8(prepared_t *p) {
    const int64_t R = p->R, I = p->I, G = I / GROUP;
    const int perm = p->kind != INT8;
    if (p->path != PATH_PORTABLE) {
        quantize_x_avx2(p->x, R * G, perm, p->codes, p->xd, p->xs);
        /* 4-bit: per 4 blocks (AVX-512) where whole, then per pair, as x8_quad and x8_pair read;
         * a last odd block stays as it is (x8_step) */
        const int64_t quads = p->path == PATH_AVX512 ? G / 4 * 4 : 0;
        for (int64_t r = 0; perm && r < R; r++) {
            regroup_codes(p->codes + r * I, quads, 4);
            regroup_codes(p->codes + r * I + quads * GROUP, G - quads, 2);
        }
        for (int64_t k = 0; perm && k < R * G; k++)
            p->xd4[4 * k] = p->xd4[4 * k + 1] = p->xd4[4 * k + 2] = p->xd4[4 * k + 3] = p->xd[k];
    } else {
        quantize_x_portable(p->x, R * G, 0, p->codes, p->xd, p->xs);
    }
}

static void prepare_float(prepared_t *p) {
    const int64_t R = p->R, I = p->I;
    const float *x = p->x;
    float *xp = p->xp, *sx = p->sx;
    if (p->kind == BF16) { /* per full 32 weights, x de-interleaved per 16; the tail as it is */
        const int64_t full = I / 32 * 32;
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x + r * I;
            float *pr = xp + r * I;
            for (int64_t i = 0; i < full; i += 16)
                for (int j = 0; j < 8; j++) {
                    pr[i + j] = xr[i + 2 * j];
                    pr[i + 8 + j] = xr[i + 2 * j + 1];
                }
            for (int64_t i = full; i < I; i++) pr[i] = xr[i];
        }
        return;
    }
    for (int64_t i = 0; i < R * I; i += GROUP) {
        for (int j = 0; j < GROUP / 2; j++) {
            xp[i + j] = x[i + 2 * j];
            xp[i + GROUP / 2 + j] = x[i + 2 * j + 1];
        }
        for (int j = 0; j < 8; j++)
            sx[i / 4 + j] = (xp[i + j] + xp[i + 8 + j]) + (xp[i + 16 + j] + xp[i + 24 + j]);
    }
}

/* x (R, I) contiguous float32 prepared for weights of `kind` (the path and the int8-activation
 * choice as they stand now): a handle for moekit_q_rows, or NULL if R, I or the kind is out of
 * range (R <= 16; 4-bit I a multiple of 32) or memory runs out. x must outlive the handle. */
void *moekit_q_prepare(int kind, const float *x, int64_t R, int64_t I) {
    const int grouped = kind == INT4 || kind == INT4_ZP || kind == MXFP4;
    if (R < 1 || R > MAX_ROWS || I < 1 || kind < BF16 || kind > MXFP4) return NULL;
    if (grouped && I % GROUP) return NULL;
    if (active_path < 0) moekit_q_set_path(-1);
    const int path = active_path, x8 = (x8_kinds >> kind) & 1 && I % GROUP == 0;
    const int64_t G = I / GROUP;
    size_t floats = 0, bytes = 0;
    if (x8)
        floats = (size_t)(R * G * 6), bytes = (size_t)(R * I);
    else if (path != PATH_PORTABLE && (kind == BF16 || grouped))
        floats = (size_t)(R * I) + (grouped ? (size_t)(R * I / 4) : 0);
    prepared_t *p = malloc(sizeof *p + floats * sizeof(float) + bytes);
    if (p == NULL) return NULL;
    float *f = (float *)(p + 1);
    *p = (prepared_t){kind, path, x8, R, I, x, NULL, NULL, NULL, NULL, NULL, NULL};
    if (x8) {
        p->xd = f, p->xs = f + R * G, p->xd4 = f + 2 * R * G, p->codes = (int8_t *)(f + floats);
        prepare_x8(p);
    } else if (floats) {
        p->xp = f, p->sx = grouped ? f + R * I : NULL;
        prepare_float(p);
    }
    return p;
}

void moekit_q_release(void *prepared) { free(prepared); }

/* Rows [o0, o1) of y (R, O) = x @ W^T (+ bias), x the prepared handle's, W (O, I) of its kind in
 * the layouts above (offsets NULL but for int4 with a zero point), on the calling thread. Each
 * element is summed in an order fixed by I and R alone, whichever thread computes it. */
void moekit_q_rows(const void *prepared, const void *data, const void *scales,
                   const uint16_t *offsets, int64_t o0, int64_t o1, int64_t O, const float *bias,
                   float *y) {
    const prepared_t *p = prepared;
    const int four_bit_int = p->kind == INT4 || p->kind == INT4_ZP;
    const int kind = four_bit_int ? (offsets != NULL ? INT4_ZP : INT4) : p->kind;
    const weight_t w = {kind, p->I, data, scales, offsets};
    const int64_t R = p->R;
    float out[ROWS_A_CALL * MAX_ROWS];
    for (int64_t c0 = o0; c0 < o1; c0 += ROWS_A_CALL) {
        const int64_t c1 = o1 - c0 < ROWS_A_CALL ? o1 : c0 + ROWS_A_CALL;
        if (p->x8 && p->path == PATH_AVX512)
            rows_x8_avx512(&w, p->codes, p->xd, p->xd4, p->xs, R, c0, c1, out);
        else if (p->x8 && p->path == PATH_AVX2)
            rows_x8_avx2(&w, p->codes, p->xd, p->xd4, p->xs, R, c0, c1, out);
        else if (p->x8)
            rows_x8_portable(&w, p->codes, p->xd, p->xs, R, c0, c1, out);
        else if (p->path == PATH_AVX512 && kind == INT8)
            rows_int8_avx512(&w, p->x, R, c0, c1, out);
        else if (p->path != PATH_PORTABLE)
            rows_avx2(&w, p->x, p->xp, p->sx, R, c0, c1, out);
        else
            rows_portable(&w, p->x, R, c0, c1, out);
        for (int64_t o = c0; o < c1; o++) {
            const float *sums = out + (o - c0) * MAX_ROWS;
            const float scale = kind == INT8 ? ((const float *)scales)[o] : 1.0f;
            const float b = bias ? bias[o] : 0.0f;
            for (int64_t r = 0; r < R; r++)
                y[r * O + o] = (kind == INT8 ? sums[r] * scale : sums[r]) + b;
        }
    }
}

/* y (R, O) = x (R, I) @ W^T (+ bias): x and y contiguous float32, W's tensors contiguous in the
 * layouts above (offsets NULL but for int4 with a zero point), bias (O,) or NULL; the output rows
 * split between threads; more than MAX_ROWS rows of x in passes of MAX_ROWS (the weights read
 * once a pass: a prompt's few dozen rows, where dequantizing the weights for a GEMM costs more).
 * Returns 0, or -1 if R, I or the kind is out of range (nothing written) or memory runs out
 * (the passes before it written). */
int moekit_q_linear(int kind, const float *x, int64_t R, int64_t I, const void *data,
                    const void *scales, const uint16_t *offsets, int64_t O, const float *bias,
                    float *y) {
    if (O < 1 || (kind == INT4_ZP) != (offsets != NULL)) return -1;
    if (R > MAX_ROWS) {
        for (int64_t r0 = 0; r0 < R; r0 += MAX_ROWS) { /* a pass fails only as the first would */
            const int64_t n = R - r0 < MAX_ROWS ? R - r0 : MAX_ROWS;
            if (moekit_q_linear(kind, x + r0 * I, n, I, data, scales, offsets, O, bias, y + r0 * O))
                return -1;
        }
        return 0;
    }
    void *p = moekit_q_prepare(kind, x, R, I);
    if (p == NULL) return -1;
#pragma omp parallel for schedule(static) if (O > ROWS_A_CALL && O * I >= MIN_PARALLEL_WEIGHTS)
    for (int64_t o0 = 0; o0 < O; o0 += ROWS_A_CALL)
        moekit_q_rows(p, data, scales, offsets, o0, O - o0 < ROWS_A_CALL ? O : o0 + ROWS_A_CALL, O,
                      bias, y);
    moekit_q_release(p);
    return 0;
}

/* A gated expert's activation of n pairs (gate, up) into act (which may be gate itself): SwiGLU,
 * silu(g) u = g / (1 + exp(-g)) u, as torch computes silu (clamped 0), or GPT-OSS's clamped
 * SwiGLU (clamped 1; moekit.experts.activate): g = min(g, limit), u clamped to [-limit, limit],
 * g sigmoid(alpha g) (u + 1). The one definition the C MoE layers (moekit/inference/
 * decode_glue.c, through the pointer moekit_layers_set_ops hands it) and the per-expert products
 * (moekit_q_glu_rows) run, so they agree bit for bit. */
void moekit_q_glu(const float *gate, const float *up, int64_t n, int clamped, float alpha,
                  float limit, float *act) {
    if (!clamped) {
        for (int64_t f = 0; f < n; f++) act[f] = gate[f] / (1.0f + expf(-gate[f])) * up[f];
        return;
    }
    for (int64_t f = 0; f < n; f++) {
        float g = gate[f] > limit ? limit : gate[f]; /* NaN stays NaN, as torch.clamp keeps it */
        float u = up[f] > limit ? limit : up[f] < -limit ? -limit : up[f];
        act[f] = g * (1.0f / (1.0f + expf(-(g * alpha)))) * (u + 1.0f);
    }
}

/* act (R, F) = moekit_q_glu of h (R, 2F) = [gate | up] row by row; act may be h itself (row r's
 * result lands below row r's own inputs, on rows already consumed). */
void moekit_q_glu_rows(const float *h, int64_t R, int64_t F, int clamped, float alpha,
                       float limit, float *act) {
    for (int64_t r = 0; r < R; r++)
        moekit_q_glu(h + r * 2 * F, h + r * 2 * F + F, F, clamped, alpha, limit, act + r * F);
}

/* One SwiGLU expert over quantized weights, in one call: h (R, 2F) = x (R, D) @ W_in^T with W_in
 * (2F, D) = [W_gate; W_up], then silu(gate) * up (moekit_q_glu) compacted in place into h's
 * first R * F floats, then y (R, D) = that @ W_out^T with W_out (D, F). h is scratch of R * 2F
 * floats. Returns 0, or -1 as moekit_q_linear (nothing meaningful in y). */
int moekit_q_swiglu_expert(int kind_in, const float *x, int64_t R, int64_t D, const void *data_in,
                           const void *scales_in, const uint16_t *offsets_in, int64_t F,
                           int kind_out, const void *data_out, const void *scales_out,
                           const uint16_t *offsets_out, float *h, float *y) {
    if (moekit_q_linear(kind_in, x, R, D, data_in, scales_in, offsets_in, 2 * F, NULL, h)) return -1;
    moekit_q_glu_rows(h, R, F, 0, 0.0f, 0.0f, h);
    return moekit_q_linear(kind_out, h, R, F, data_out, scales_out, offsets_out, D, NULL, y);
}
