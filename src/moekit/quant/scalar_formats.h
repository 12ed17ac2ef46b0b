/* One number of each stored format as float32, exactly as moekit.quant.schemes.dequantize computes
 * it: IEEE half (int4's scales and zero points), E8M0 (MXFP4's scales), E2M1 (MXFP4's values); and
 * a group of 32 4-bit weights. Included by quant/kernels.c and inference/decode_latent.h. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

static float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        float f = ldexpf((float)mantissa, -24);
        return sign ? -f : f;
    }
    if (exponent == 31) return from_bits(sign | 0x7f800000u | (mantissa << 13));
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

/* 2^(e - 127 - halve), exactly (e = 0 and 1 give subnormals; e = 255 gives 2^128 = inf unhalved,
 * as the reference's exp2 does). */
static float e8m0_to_float(uint8_t e, int halve) {
    int exponent = (int)e - halve;
    if (exponent >= 1) return exponent >= 255 ? INFINITY : from_bits((uint32_t)exponent << 23);
    return from_bits(0x00400000u >> -exponent); /* 2^-127 >> k */
}

static const float E2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* The 32 weights of one 4-bit group into v, as dequantize computes them: b its 16 bytes (element
 * 2j low, 2j + 1 high); MXFP4 E2M1 times d (its E8M0 scale, decoded), int4 (q - 8) d, or q d + m
 * with a zero point m (NULL: none). */
static void dequantize_group(const uint8_t *b, int mxfp4, float d, const float *m, float *v) {
    for (int j = 0; j < 16; j++) {
        const int lo = b[j] & 15, hi = b[j] >> 4;
        if (mxfp4)
            v[2 * j] = E2M1[lo] * d, v[2 * j + 1] = E2M1[hi] * d;
        else if (m == NULL)
            v[2 * j] = (float)(lo - 8) * d, v[2 * j + 1] = (float)(hi - 8) * d;
        else
            v[2 * j] = (float)lo * d + *m, v[2 * j + 1] = (float)hi * d + *m;
    }
}

/* Group `at` (row * groups a row + group) of a 4-bit weight, b its 16 bytes, into v: with its
 * scale (scales: E8M0 bytes for MXFP4, else IEEE halves) and its zero point where offsets is not
 * NULL; dequantize_group's numbers. */
static void dequantize_group_at(const uint8_t *b, int mxfp4, const void *scales,
                                const uint16_t *offsets, int64_t at, float *v) {
    if (mxfp4) {
        dequantize_group(b, 1, e8m0_to_float(((const uint8_t *)scales)[at], 0), NULL, v);
        return;
    }
    const float m = offsets ? fp16_to_float(offsets[at]) : 0.0f;
    dequantize_group(b, 0, fp16_to_float(((const uint16_t *)scales)[at]), offsets ? &m : NULL, v);
}
