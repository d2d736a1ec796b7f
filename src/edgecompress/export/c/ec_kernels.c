/* edgecompress integer kernels; see ec_kernels.h. Signed right shifts are arithmetic (as on every
 * compiler edgecompress is tested with: gcc for the host and arm-none-eabi-gcc). */
#include "ec_config.h" /* generated with the model: the kernels it calls (EC_USE_...) */
#include "ec_kernels.h"
#include <string.h>
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#endif

#ifdef EC_ALL_KERNELS
#define EC_USE_CONV 1
#define EC_USE_DWCONV 1
#define EC_USE_FC 1
#define EC_USE_MAXPOOL 1
#define EC_USE_AVGPOOL 1
#define EC_USE_ADD 1
#define EC_USE_RELU 1
#define EC_USE_MUL 1
#define EC_USE_LUT 1
#define EC_USE_CONCAT 1
#define EC_USE_RESCALE 1
#define EC_USE_GATHER 1
#define EC_PACKED_KERNELS 1
#define EC_USE_CONV_PACKED 1
#define EC_USE_FC_PACKED 1
#define EC_PACKED_INT4 1
#define EC_PACKED_CODEBOOK 1
#define EC_PACKED_CHANNEL 1
#define EC_SPARSE_KERNELS 1
#define EC_USE_CONV_SPARSE 1
#define EC_USE_FC_SPARSE 1
#define EC_SPARSE_MASK 1
#define EC_SPARSE_RUNS 1
#define EC_SPARSE_RUNS4 1
#define EC_SPARSE_BLOCKS 1
#define EC_SPARSE_VALUES 1
#define EC_SPARSE_TABLE 1
#endif

/* Which variants of the compressed formats a kernel decodes: a test at run time only where the model
 * stores both, so the compiler drops the code of a variant the model does not use. */
#if !defined(EC_PACKED_CODEBOOK)
#define EC_IS_INT4(w) 1
#elif !defined(EC_PACKED_INT4)
#define EC_IS_INT4(w) 0
#else
#define EC_IS_INT4(w) ((w)->format == EC_INT4)
#endif
#if !defined(EC_SPARSE_BLOCKS)
#define EC_HAS_BLOCKS(w) 0
#elif !defined(EC_SPARSE_MASK) && !defined(EC_SPARSE_RUNS) && !defined(EC_SPARSE_RUNS4)
#define EC_HAS_BLOCKS(w) 1
#else
#define EC_HAS_BLOCKS(w) ((w)->block != 0)
#endif
#if !defined(EC_SPARSE_RUNS) && !defined(EC_SPARSE_RUNS4)
#define EC_HAS_MASK(w) 1
#elif !defined(EC_SPARSE_MASK)
#define EC_HAS_MASK(w) 0
#else
#define EC_HAS_MASK(w) ((w)->mask != 0)
#endif
#if !defined(EC_SPARSE_VALUES)
#define EC_HAS_TABLE(w) 1
#elif !defined(EC_SPARSE_TABLE)
#define EC_HAS_TABLE(w) 0
#else
#define EC_HAS_TABLE(w) ((w)->table != 0)
#endif
/* The run length before stored entry e: a byte, or a nibble (two a byte, low nibble first). */
#define EC_GAP4(g, e) (((uint32_t)(g)[(e) >> 1] >> (((e) & 1u) << 2)) & 15u)
#if !defined(EC_SPARSE_RUNS4)
#define EC_GAP(w, g, e) ((uint32_t)(g)[e])
#elif !defined(EC_SPARSE_RUNS)
#define EC_GAP(w, g, e) EC_GAP4(g, e)
#else
#define EC_GAP(w, g, e) ((w)->run_bits == 4 ? EC_GAP4(g, e) : (uint32_t)(g)[e])
#endif

#define EC_ADD_LEFT_SHIFT 20

#ifdef EC_SPARSE_BLOCKS
/* The index of the lowest set bit of x != 0 (Armv7-M: RBIT and CLZ). */
#if defined(__GNUC__)
#define EC_CTZ(x) __builtin_ctz(x)
#else
static int32_t ec_ctz(uint32_t x) {
    int32_t n = 0;
    for (; !(x & 1u); x >>= 1) ++n;
    return n;
}
#define EC_CTZ(x) ec_ctz(x)
#endif
#endif

/* Inner loops kept out of line, so that the compiler gives them every register whether one kernel or
 * several call them. */
#if defined(__GNUC__)
#define EC_NOINLINE __attribute__((noinline))
#else
#define EC_NOINLINE
#endif

static inline int32_t ec_clamp(int32_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* gemmlowp SaturatingRoundingDoublingHighMul: round(a * b / 2^31), saturating the one overflow. */
static int32_t ec_high_mul(int32_t a, int32_t b) {
    int64_t ab, v;
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    ab = (int64_t)a * (int64_t)b;
    v = ab + (ab >= 0 ? (int64_t)(1 << 30) : (int64_t)(1 - (1 << 30)));
    return (int32_t)(v >= 0 ? (v >> 31) : -((-v) >> 31));
}

/* gemmlowp RoundingDivideByPOT: x / 2^e, rounding half away from zero. */
static int32_t ec_div_pot(int32_t x, int e) {
    const int32_t mask = (int32_t)(((int64_t)1 << e) - 1);
    const int32_t rem = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (rem > threshold ? 1 : 0);
}

#if defined(EC_USE_CONV) || defined(EC_USE_FC) || defined(EC_SPARSE_BLOCKS)
/* sum over i < n of (x[i] - zp) * w[i]. With the DSP extension (Cortex-M4/M7/M55) four products a
 * step: two SXTB16 per operand widen int8 pairs to int16, SSUB16 subtracts the zero point (exact:
 * x - zp is within +-255), two SMLAD multiply-accumulate; the sum is the same integer. */
EC_NOINLINE static int32_t ec_dot(const int8_t *x, const int8_t *w, int32_t n, int32_t zp) {
    int32_t acc = 0, i = 0;
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
    const uint32_t zp2 = ((uint32_t)zp & 0xFFFFu) * 0x10001u;
    for (; i + 8 <= n; i += 8) {  /* two words a step: less loop overhead */
        uint32_t xv, wv, xu, wu;
        memcpy(&xv, x + i, 4);
        memcpy(&wv, w + i, 4);
        memcpy(&xu, x + i + 4, 4);
        memcpy(&wu, w + i + 4, 4);
        acc = (int32_t)__smlad(__ssub16(__sxtb16(xv), zp2), __sxtb16(wv), acc);
        acc = (int32_t)__smlad(__ssub16(__sxtb16((xv >> 8) | (xv << 24)), zp2), __sxtb16((wv >> 8) | (wv << 24)), acc);
        acc = (int32_t)__smlad(__ssub16(__sxtb16(xu), zp2), __sxtb16(wu), acc);
        acc = (int32_t)__smlad(__ssub16(__sxtb16((xu >> 8) | (xu << 24)), zp2), __sxtb16((wu >> 8) | (wu << 24)), acc);
    }
    for (; i + 4 <= n; i += 4) {
        uint32_t xv, wv;
        memcpy(&xv, x + i, 4);
        memcpy(&wv, w + i, 4);
        acc = (int32_t)__smlad(__ssub16(__sxtb16(xv), zp2), __sxtb16(wv), acc);
        acc = (int32_t)__smlad(__ssub16(__sxtb16((xv >> 8) | (xv << 24)), zp2), __sxtb16((wv >> 8) | (wv << 24)), acc);
    }
#endif
    for (; i < n; ++i) acc += ((int32_t)x[i] - zp) * w[i];
    return acc;
}
#endif

int32_t ec_requant(int32_t x, int32_t multiplier, int shift) {
    const int left = shift > 0 ? shift : 0;
    const int right = shift > 0 ? 0 : -shift;
    return ec_div_pot(ec_high_mul((int32_t)((uint32_t)x << left), multiplier), right);
}

/* Convolution, grouped when groups > 1: output channel o reads the icg = ic / groups input
 * channels of its group, o / (oc / groups). */
#ifdef EC_USE_CONV
void ec_conv(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    const int32_t icg = p->ic / p->groups, ocg = p->oc / p->groups, ic = p->ic, kw = p->kw, zp = p->in_zp;
    int32_t oy, ox, o, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            const int32_t ky0 = y0 < 0 ? -y0 : 0, ky1 = y0 + p->kh > p->ih ? p->ih - y0 : p->kh;
            const int32_t kx0 = x0 < 0 ? -x0 : 0, kx1 = x0 + kw > p->iw ? p->iw - x0 : kw;
            for (o = 0; o < p->oc; ++o) {
                const int8_t *w = p->w + o * p->kh * kw * icg;
                const int8_t *src = in + (y0 * p->iw + x0) * ic + (o / ocg) * icg;
                int32_t acc = p->bias[o];
                for (ky = ky0; ky < ky1; ++ky) {
                    const int8_t *row = src + ky * p->iw * ic, *wrow = w + ky * kw * icg;
                    if (icg == ic) {  /* the taps of a kernel row are contiguous in the input and the weights */
                        acc += ec_dot(row + kx0 * ic, wrow + kx0 * ic, (kx1 - kx0) * ic, zp);
                    } else {
                        for (kx = kx0; kx < kx1; ++kx) acc += ec_dot(row + kx * ic, wrow + kx * icg, icg, zp);
                    }
                }
                acc = ec_requant(acc, p->mult[o * p->per_channel], p->shift[o * p->per_channel]) + p->out_zp;
                out[(oy * p->ow + ox) * p->oc + o] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
            }
        }
    }
}
#endif

#ifdef EC_USE_DWCONV
/* sum over i < n of (x[i * xs] - zp) * w[i * ws]: a row of depthwise taps */
EC_NOINLINE static int32_t ec_dot_strided(const int8_t *x, int32_t xs, const int8_t *w, int32_t ws, int32_t n,
                                          int32_t zp) {
    int32_t acc = 0;
    for (; n > 0; --n, x += xs, w += ws) acc += ((int32_t)*x - zp) * *w;
    return acc;
}

/* Four channels of a depthwise window (depth multiplier 1): acc[i] += sum over the window's taps of
 * (x[tap + i] - zp) * w[tap + i]. With the DSP extension a tap is one word of four input channels and
 * one of four weights: SXTB16 widens the even and odd bytes, SSUB16 subtracts the zero point,
 * SMLABB / SMLATT multiply-accumulate the bottom and top halves (each channel on its own). */
EC_NOINLINE static void ec_dw4(const int8_t *x, int32_t x_step, int32_t x_row, const int8_t *w, int32_t w_step,
                               int32_t w_row, int32_t nky, int32_t nkx, int32_t zp, int32_t *acc) {
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], ky, kx;
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
    const uint32_t zp2 = ((uint32_t)zp & 0xFFFFu) * 0x10001u;
#endif
    for (ky = 0; ky < nky; ++ky, x += x_row, w += w_row) {
        const int8_t *xp = x, *wp = w;
        for (kx = 0; kx < nkx; ++kx, xp += x_step, wp += w_step) {
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
            uint32_t xv, wv, xe, xo, we, wo;
            memcpy(&xv, xp, 4);
            memcpy(&wv, wp, 4);
            xe = __ssub16(__sxtb16(xv), zp2);
            xo = __ssub16(__sxtb16((xv >> 8) | (xv << 24)), zp2);
            we = __sxtb16(wv);
            wo = __sxtb16((wv >> 8) | (wv << 24));
            a0 = __smlabb((int32_t)xe, (int32_t)we, a0);
            a2 = __smlatt((int32_t)xe, (int32_t)we, a2);
            a1 = __smlabb((int32_t)xo, (int32_t)wo, a1);
            a3 = __smlatt((int32_t)xo, (int32_t)wo, a3);
#else
            a0 += ((int32_t)xp[0] - zp) * wp[0];
            a1 += ((int32_t)xp[1] - zp) * wp[1];
            a2 += ((int32_t)xp[2] - zp) * wp[2];
            a3 += ((int32_t)xp[3] - zp) * wp[3];
#endif
        }
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
}

/* Depthwise convolution: output channel o reads input channel o / (oc / ic). Only the taps inside the
 * input are visited (no test per tap); with a depth multiplier of 1, four channels at a time. */
void ec_dwconv(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    const int32_t mult = p->oc / p->ic, ic = p->ic, oc = p->oc, kw = p->kw, zp = p->in_zp;
    const int32_t in_row = p->iw * ic, w_row = kw * oc, quad = mult == 1 ? oc & ~3 : 0;
    int32_t oy, ox, o, ky, i, acc[4];
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            const int32_t ky0 = y0 < 0 ? -y0 : 0, ky1 = y0 + p->kh > p->ih ? p->ih - y0 : p->kh;
            const int32_t kx0 = x0 < 0 ? -x0 : 0, kx1 = x0 + kw > p->iw ? p->iw - x0 : kw;
            const int32_t first = (y0 + ky0) * in_row + (x0 + kx0) * ic, wfirst = ky0 * w_row + kx0 * oc;
            int8_t *dst = out + (oy * p->ow + ox) * oc;
            for (o = 0; o < oc; o += o < quad ? 4 : 1) {
                if (o < quad) {
                    for (i = 0; i < 4; ++i) acc[i] = p->bias[o + i];
                    ec_dw4(in + first + o, ic, in_row, p->w + wfirst + o, oc, w_row, ky1 - ky0, kx1 - kx0, zp, acc);
                } else {
                    acc[0] = p->bias[o];
                    for (ky = ky0; ky < ky1; ++ky)
                        acc[0] += ec_dot_strided(in + first + (ky - ky0) * in_row + o / mult, ic,
                                                 p->w + wfirst + (ky - ky0) * w_row + o, oc, kx1 - kx0, zp);
                }
                for (i = 0; i < (o < quad ? 4 : 1); ++i) {
                    const int32_t q = o + i;
                    const int32_t v = ec_requant(acc[i], p->mult[q * p->per_channel], p->shift[q * p->per_channel]);
                    dst[q] = (int8_t)ec_clamp(v + p->out_zp, p->act_min, p->act_max);
                }
            }
        }
    }
}
#endif

#ifdef EC_USE_FC
void ec_fc(const ec_fc_t *p, const int8_t *in, int8_t *out) {
    int32_t o;
    for (o = 0; o < p->n_out; ++o) {
        int32_t acc = p->bias[o] + ec_dot(in, p->w + o * p->n_in, p->n_in, p->in_zp);
        acc = ec_requant(acc, p->mult[o * p->per_channel], p->shift[o * p->per_channel]) + p->out_zp;
        out[o] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
    }
}
#endif

#ifdef EC_USE_MAXPOOL
void ec_maxpool(const ec_pool_t *p, const int8_t *in, int8_t *out) {
    int32_t oy, ox, c, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            for (c = 0; c < p->c; ++c) {
                int32_t m = -128;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t iy = oy * p->sh + ky - p->ph;
                    if (iy < 0 || iy >= p->ih) continue; /* padding never wins the max */
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t ix = ox * p->sw + kx - p->pw;
                        if (ix < 0 || ix >= p->iw) continue;
                        {
                            const int32_t v = in[(iy * p->iw + ix) * p->c + c];
                            if (v > m) m = v;
                        }
                    }
                }
                out[(oy * p->ow + ox) * p->c + c] = (int8_t)ec_clamp(m, p->act_min, p->act_max);
            }
        }
    }
}
#endif

#ifdef EC_USE_AVGPOOL
void ec_avgpool(const ec_pool_t *p, const int8_t *in, int8_t *out) {
    const int32_t count = p->kh * p->kw;
    int32_t oy, ox, c, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            for (c = 0; c < p->c; ++c) {
                int32_t acc = 0;
                for (ky = 0; ky < p->kh; ++ky)
                    for (kx = 0; kx < p->kw; ++kx)
                        acc += in[((oy * p->sh + ky) * p->iw + ox * p->sw + kx) * p->c + c];
                acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
                out[(oy * p->ow + ox) * p->c + c] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
            }
        }
    }
}
#endif

#ifdef EC_USE_ADD
void ec_add(const ec_add_t *p, const int8_t *a, const int8_t *b, int8_t *out) {
    int32_t i;
    for (i = 0; i < p->n; ++i) {
        const int32_t x1 = ((int32_t)a[i] - p->zp1) * (1 << EC_ADD_LEFT_SHIFT);
        const int32_t x2 = ((int32_t)b[i] - p->zp2) * (1 << EC_ADD_LEFT_SHIFT);
        const int32_t sum = ec_requant(x1, p->m1, p->s1) + ec_requant(x2, p->m2, p->s2);
        const int32_t v = ec_requant(sum, p->mo, p->so) + p->out_zp;
        out[i] = (int8_t)ec_clamp(v, p->act_min, p->act_max);
    }
}
#endif

#ifdef EC_USE_MUL
void ec_mul(const ec_mul_t *p, const int8_t *a, const int8_t *b, int8_t *out) {
    const int32_t c = p->c;
    int32_t i, ch;
    for (i = 0; i < p->pixels; ++i, a += c, out += c) {
        const int8_t *g = p->gate ? b : b + i * c;
        for (ch = 0; ch < c; ++ch) {  /* |product| <= 255 * 255: exact in int32 */
            const int32_t v = ec_requant(((int32_t)a[ch] - p->zp1) * ((int32_t)g[ch] - p->zp2), p->mult, p->shift);
            out[ch] = (int8_t)ec_clamp(v + p->out_zp, p->act_min, p->act_max);
        }
    }
}
#endif

#ifdef EC_USE_LUT
void ec_lut(int32_t n, const int8_t *table, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < n; ++i) out[i] = table[(int32_t)in[i] + 128];
}
#endif

#ifdef EC_USE_GATHER
void ec_gather(int32_t pixels, int32_t c_in, int32_t c_out, const int16_t *index, const int8_t *in, int8_t *out) {
    int32_t i, j;
    for (i = 0; i < pixels; ++i, in += c_in, out += c_out)
        for (j = 0; j < c_out; ++j) out[j] = in[index[j]];
}
#endif

#ifdef EC_USE_RESCALE
void ec_rescale(int32_t n, int32_t in_zp, int32_t out_zp, int32_t mult, int shift, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < n; ++i)
        out[i] = (int8_t)ec_clamp(ec_requant((int32_t)in[i] - in_zp, mult, shift) + out_zp, -128, 127);
}
#endif

#ifdef EC_USE_CONCAT
void ec_concat(int32_t pixels, int32_t c_in, int32_t c_out, int32_t c0, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < pixels; ++i) memcpy(out + i * c_out + c0, in + i * c_in, (size_t)c_in);
}
#endif

#ifdef EC_USE_RELU
void ec_relu(int32_t n, int32_t zp, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < n; ++i) out[i] = in[i] > zp ? in[i] : (int8_t)zp;
}
#endif

/* ---- compressed weights, decoded on the fly (no scratch buffer) ---------------------------- */
#if defined(EC_PACKED_KERNELS) || defined(EC_SPARSE_KERNELS)

/* The index of m = 2^bits - 1 bits that starts at bit `bit` of an LSB-first stream (which has one
 * byte of padding at its end). */
#define EC_INDEX(s, bit, m) ((int32_t)((((uint32_t)(s)[(bit) >> 3] | ((uint32_t)(s)[((bit) >> 3) + 1] << 8)) \
                                        >> ((bit) & 7u)) & (m)))

static int8_t ec_out(int32_t acc, const int32_t *mult, const int8_t *shift, int32_t o, int32_t zp,
                     int32_t lo, int32_t hi) {
    return (int8_t)ec_clamp(ec_requant(acc, mult[o], shift[o]) + zp, lo, hi);
}
#endif

#ifdef EC_PACKED_KERNELS
/* The codebook of output row o: its own table (table_stride entries a row, where the model stores
 * per-channel tables) or the layer's. */
#ifdef EC_PACKED_CHANNEL
#define EC_ROW_TABLE(w, o) ((w)->table + (o) * (w)->table_stride)
#else
#define EC_ROW_TABLE(w, o) ((w)->table)
#endif

/* sum over i < n of (src[i] - zp) * weight j + i of an int4 or codebook weight set, in output row o. Out of
 * line, so that its loop keeps the accumulator in a register (inlined into the convolution it did not:
 * the compressed LeNet-5 ran 36.0 M instructions on Cortex-M4 instead of 32.8 M). */
EC_NOINLINE static int32_t ec_dot_packed(const ec_weights_t *w, int32_t o, uint32_t j, const int8_t *src, int32_t n,
                                         int32_t zp) {
    int32_t acc = 0, i;
    (void)o;  /* only per-channel tables read it */
    if (EC_IS_INT4(w)) {
        for (i = 0; i < n; ++i, ++j) {
            const int32_t v = (int32_t)(((uint32_t)w->packed[j >> 1] >> ((j & 1u) << 2)) & 15u);
            acc += ((int32_t)src[i] - zp) * ((v ^ 8) - 8);
        }
    } else {
        const uint32_t bits = (uint32_t)w->bits, m = (1u << bits) - 1u;
        const uint8_t *packed = w->packed;
        const int8_t *tab = EC_ROW_TABLE(w, o);
        uint32_t bit = j * bits;
        for (i = 0; i < n; ++i, bit += bits) acc += ((int32_t)src[i] - zp) * tab[EC_INDEX(packed, bit, m)];
    }
    return acc;
}

#ifdef EC_USE_CONV_PACKED
void ec_conv_packed(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    const int32_t icg = p->ic / p->groups, ocg = p->oc / p->groups, k = p->kh * p->kw * icg;
    int32_t oy, ox, o, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            for (o = 0; o < p->oc; ++o) {
                const int32_t c0 = (o / ocg) * icg;
                int32_t acc = p->bias[o];
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t y = y0 + ky;
                    if (y < 0 || y >= p->ih) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t x = x0 + kx;
                        if (x < 0 || x >= p->iw) continue;
                        acc += ec_dot_packed(p->fw, o, (uint32_t)(o * k + (ky * p->kw + kx) * icg),
                                             in + (y * p->iw + x) * p->ic + c0, icg, p->in_zp);
                    }
                }
                out[(oy * p->ow + ox) * p->oc + o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp,
                                                            p->act_min, p->act_max);
            }
        }
    }
}
#endif

#ifdef EC_USE_FC_PACKED
void ec_fc_packed(const ec_fc_t *p, const int8_t *in, int8_t *out) {
    int32_t o;
    for (o = 0; o < p->n_out; ++o) {
        const int32_t acc = p->bias[o] + ec_dot_packed(p->fw, o, (uint32_t)(o * p->n_in), in, p->n_in, p->in_zp);
        out[o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp, p->act_min, p->act_max);
    }
}
#endif
#endif

#ifdef EC_SPARSE_KERNELS
/* The value of stored entry e: a code, or a codebook index's value (locals has_tab, vals, tab, packed, bits,
 * imask). */
#define EC_ENTRY(e) (has_tab ? tab[EC_INDEX(packed, (uint32_t)(e) * bits, imask)] \
                             : vals[e])
/* Rows with run lengths, the common case of a pruned layer: small loops, few live values (kept out
 * of line so that the compiler gives them every register). */

#ifdef EC_USE_FC_SPARSE
/* sum of (x[position] - zp) * value over the n stored entries from entry e of a row with run lengths */
EC_NOINLINE static int32_t ec_runs(const int8_t *x, const ec_weights_t *w, uint32_t e, int32_t n, int32_t zp) {
    const uint8_t *gaps = w->gaps;
    const int8_t *vals = w->values;
    int32_t acc = 0;
    for (; n > 0; --n, ++e) {
        x += EC_GAP(w, gaps, e);
        acc += ((int32_t)*x++ - zp) * vals[e];
    }
    return acc;
}

EC_NOINLINE static int32_t ec_runs_codebook(const int8_t *x, const ec_weights_t *w, uint32_t e, int32_t n,
                                            int32_t zp) {
    const uint8_t *packed = w->packed, *gaps = w->gaps;
    const int8_t *tab = w->table;
    const uint32_t bits = (uint32_t)w->bits, m = (1u << bits) - 1u;
    uint32_t bit = e * bits;
    int32_t acc = 0;
    for (; n > 0; --n, ++e, bit += bits) {
        x += EC_GAP(w, gaps, e);
        acc += ((int32_t)*x++ - zp) * tab[EC_INDEX(packed, bit, m)];
    }
    return acc;
}

void ec_fc_sparse(const ec_fc_t *p, const int8_t *in, int8_t *out) {
    const ec_weights_t *w = p->fw;
    const int8_t *vals = w->values, *tab = w->table;
    const uint8_t *packed = w->packed;
    const uint32_t bits = (uint32_t)w->bits, imask = (1u << bits) - 1u;
    const int has_tab = EC_HAS_TABLE(w);
    const int32_t row_bytes = (p->n_in + 7) >> 3, zp = p->in_zp;
    uint32_t e = 0;  /* stored entries of the rows before */
    int32_t o;
    for (o = 0; o < p->n_out; ++o) {
        int32_t acc = p->bias[o];
#ifdef EC_SPARSE_BLOCKS
        if (EC_HAS_BLOCKS(w)) {  /* a dot product per stored block */
            const int32_t bs = w->block, n_in = p->n_in, mask_bytes = ((n_in + bs - 1) / bs + 7) >> 3;
            const uint8_t *m = w->mask + o * mask_bytes;
            int32_t b, j;
            for (b = 0; b < mask_bytes; ++b) {
                uint32_t set = m[b];
                while (set) {  /* each set bit, lowest first */
                    const int32_t pos = (8 * b + EC_CTZ(set)) * bs, n = n_in - pos < bs ? n_in - pos : bs;
                    set &= set - 1u;
                    if (has_tab) {
                        for (j = 0; j < n; ++j) acc += ((int32_t)in[pos + j] - zp) * EC_ENTRY(e + (uint32_t)j);
                    } else {
                        acc += ec_dot(in + pos, vals + e, n, zp);
                    }
                    e += (uint32_t)bs;
                }
            }
        } else
#endif
        if (EC_HAS_MASK(w)) {
            const uint8_t *m = w->mask + o * row_bytes;
            int32_t b;
            for (b = 0; b < row_bytes; ++b) {
                const int8_t *x = in + 8 * b;
                uint32_t set;
                for (set = m[b]; set; set >>= 1, ++x)
                    if (set & 1u) { acc += ((int32_t)*x - zp) * EC_ENTRY(e); ++e; }
            }
        } else {
            const int32_t n = w->count[o];
            acc += has_tab ? ec_runs_codebook(in, w, e, n, zp) : ec_runs(in, w, e, n, zp);
            e += (uint32_t)n;
        }
        out[o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp, p->act_min, p->act_max);
    }
}
#endif

#ifdef EC_USE_CONV_SPARSE
/* A convolution row with run lengths, groups = 1, the window inside the input (no bounds checks):
 * the taps of a kernel row are contiguous in the input as in the row, so a position within the
 * kernel row (row_len = kw * ic values) is an offset from the row's first input; row_step moves to
 * the next input row. */
EC_NOINLINE static int32_t ec_conv_runs(const int8_t *src, const ec_weights_t *w, uint32_t e, int32_t n,
                                        int32_t row_len, int32_t row_step, int32_t zp) {
    const uint8_t *gaps = w->gaps;
    const int8_t *vals = w->values;
    int32_t acc = 0, c = -1;
    for (; n > 0; --n, ++e) {
        c += (int32_t)EC_GAP(w, gaps, e) + 1;
        while (c >= row_len) {
            c -= row_len;
            src += row_step;
        }
        acc += ((int32_t)src[c] - zp) * vals[e];
    }
    return acc;
}

EC_NOINLINE static int32_t ec_conv_runs_codebook(const int8_t *src, const ec_weights_t *w, uint32_t e, int32_t n,
                                                 int32_t row_len, int32_t row_step, int32_t zp) {
    const uint8_t *packed = w->packed, *gaps = w->gaps;
    const int8_t *tab = w->table;
    const uint32_t bits = (uint32_t)w->bits, m = (1u << bits) - 1u;
    uint32_t bit = e * bits;
    int32_t acc = 0, c = -1;
    for (; n > 0; --n, ++e, bit += bits) {
        c += (int32_t)EC_GAP(w, gaps, e) + 1;
        while (c >= row_len) {
            c -= row_len;
            src += row_step;
        }
        acc += ((int32_t)src[c] - zp) * tab[EC_INDEX(packed, bit, m)];
    }
    return acc;
}

#ifdef EC_SPARSE_BLOCKS
/* A convolution row with block positions: the sum over its stored blocks of (input - zp) * code, each
 * weight's tap and channel followed from the last (as ec_conv_sparse does). With groups = 1, stored codes
 * and the window inside the input, a kernel row (kw * ic weights) is contiguous in the input, so a
 * block is one run of products (one a kernel row where it crosses rows); else each weight is followed
 * as a tap and a channel, and a block within one tap is one dot product. *entry moves past the row's
 * stored codes. */
EC_NOINLINE static int32_t ec_conv_blocks(const ec_conv_t *p, const int8_t *in, int32_t base, int32_t o, int32_t y0,
                                          int32_t x0, int inside, uint32_t *entry) {
    const ec_weights_t *w = p->fw;
    const int8_t *vals = w->values, *tab = w->table;
    const uint8_t *packed = w->packed;
    const uint32_t bits = (uint32_t)w->bits, imask = (1u << bits) - 1u;
    const int has_tab = EC_HAS_TABLE(w);
    const int32_t icg = p->ic / p->groups, ic = p->ic, iw = p->iw, kw = p->kw, zp = p->in_zp, bs = w->block;
    const int32_t k = p->kh * kw * icg, mask_bytes = ((k + bs - 1) / bs + 7) >> 3, row_skip = (iw - kw) * ic;
    const uint8_t *m = w->mask + o * mask_bytes;
    uint32_t e = *entry;
    int32_t acc = 0, ky = 0, kx = 0, c = 0, tap = 0, at = 0, b, j;
    if (inside && icg == ic && !has_tab) {  /* groups = 1, window inside: each kernel row contiguous in the input */
        const int32_t row_len = kw * ic, row_step = iw * ic;
        for (b = 0; b < mask_bytes; ++b) {
            uint32_t set = m[b];
            while (set) {
                const int32_t pos = (8 * b + EC_CTZ(set)) * bs, n = k - pos < bs ? k - pos : bs;
                int32_t r = pos / row_len, off = pos - r * row_len, done = 0;
                set &= set - 1u;
                while (done < n) {  /* the block's part in kernel row r */
                    const int32_t len = row_len - off < n - done ? row_len - off : n - done;
                    const int8_t *x = in + base + r * row_step + off, *v = vals + e + done;
                    for (j = 0; j < len; ++j) acc += ((int32_t)x[j] - zp) * v[j];
                    done += len;
                    ++r;
                    off = 0;
                }
                e += (uint32_t)bs;
            }
        }
        *entry = e;
        return acc;
    }
    for (b = 0; b < mask_bytes; ++b) {
        uint32_t set = m[b];
        while (set) {  /* each set bit, lowest first */
            const int32_t pos = (8 * b + EC_CTZ(set)) * bs;
            set &= set - 1u;
            {
                const int32_t n = k - pos < bs ? k - pos : bs;
                c += pos - at;  /* from weight `at` to the block's first */
                at = pos + n;
                while (c >= icg) {  /* to its tap */
                    c -= icg;
                    tap += ic;
                    if (++kx == kw) { kx = 0; ++ky; tap += row_skip; }
                }
                if (inside && !has_tab && n <= icg - c) {
                    acc += ec_dot(in + base + tap + c, vals + e, n, zp);
                    c += n;
                } else {
                    for (j = 0; j < n; ++j, ++c) {
                        while (c >= icg) {
                            c -= icg;
                            tap += ic;
                            if (++kx == kw) { kx = 0; ++ky; tap += row_skip; }
                        }
                        if (inside || (y0 + ky >= 0 && y0 + ky < p->ih && x0 + kx >= 0 && x0 + kx < iw))
                            acc += ((int32_t)in[base + tap + c] - zp) * EC_ENTRY(e + (uint32_t)j);
                    }
                }
                e += (uint32_t)bs;
            }
        }
    }
    *entry = e;
    return acc;
}
#endif

/* Sparse convolution: the row position of each stored weight is followed as a tap offset (ky, kx)
 * and a channel c, so an entry costs an advance, a bounds check (only where the window overlaps the
 * padding) and a multiply-accumulate; zeros cost nothing (a zero byte of a bitmask skips eight). */
void ec_conv_sparse(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    const ec_weights_t *w = p->fw;
    const int8_t *vals = w->values, *tab = w->table;
    const uint8_t *packed = w->packed, *gaps = w->gaps;
    const uint32_t bits = (uint32_t)w->bits, imask = (1u << bits) - 1u;
    const int has_tab = EC_HAS_TABLE(w);
    const int32_t icg = p->ic / p->groups, ocg = p->oc / p->groups, ic = p->ic, iw = p->iw, kw = p->kw;
    const int32_t row_bytes = (p->kh * kw * icg + 7) >> 3, zp = p->in_zp, row_skip = (iw - kw) * ic;
    int32_t oy, ox, o;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            const int inside = y0 >= 0 && x0 >= 0 && y0 + p->kh <= p->ih && x0 + kw <= iw;
            uint32_t e = 0;
            for (o = 0; o < p->oc; ++o) {
                const int32_t base = (y0 * iw + x0) * ic + (o / ocg) * icg;
                const uint8_t *m = EC_HAS_MASK(w) ? w->mask + o * row_bytes : 0;
#ifdef EC_SPARSE_BLOCKS
                if (EC_HAS_BLOCKS(w)) {
                    const int32_t acc = p->bias[o] + ec_conv_blocks(p, in, base, o, y0, x0, inside, &e);
                    out[(oy * p->ow + ox) * p->oc + o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp,
                                                                p->act_min, p->act_max);
                    continue;
                }
#endif
                if (inside && !m && icg == ic) {
                    const int32_t n = w->count[o];
                    const int32_t acc = p->bias[o] + (has_tab ? ec_conv_runs_codebook(in + base, w, e, n, kw * ic,
                                                                                      iw * ic, zp)
                                                              : ec_conv_runs(in + base, w, e, n, kw * ic, iw * ic, zp));
                    e += (uint32_t)n;
                    out[(oy * p->ow + ox) * p->oc + o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp,
                                                                p->act_min, p->act_max);
                    continue;
                }
                const uint8_t *m_end = m ? m + row_bytes : 0;
                int32_t acc = p->bias[o], ky = 0, kx = 0, c = 0, tap = 0, step = 0, rem = 0;
                int32_t left = m ? 0 : w->count[o];
                uint32_t set = 0;
                for (;;) {
                    if (m) {  /* the next set bit of the row's mask */
                        while (!set) {
                            step += rem;
                            if (m == m_end) break;
                            set = *m++;
                            rem = 8;
                        }
                        if (!set) break;
                        while (!(set & 1u)) { set >>= 1; ++step; --rem; }
                        set >>= 1;
                        --rem;
                    } else {
                        if (left-- == 0) break;
                        step += (int32_t)EC_GAP(w, gaps, e);
                    }
                    c += step;
                    step = 1;
                    while (c >= icg) {  /* to the next tap */
                        c -= icg;
                        tap += ic;
                        if (++kx == kw) { kx = 0; ++ky; tap += row_skip; }
                    }
                    if (inside || (y0 + ky >= 0 && y0 + ky < p->ih && x0 + kx >= 0 && x0 + kx < iw))
                        acc += ((int32_t)in[base + tap + c] - zp) * EC_ENTRY(e);
                    ++e;
                }
                out[(oy * p->ow + ox) * p->oc + o] = ec_out(acc, p->mult, p->shift, o * p->per_channel, p->out_zp,
                                                            p->act_min, p->act_max);
            }
        }
    }
}
#endif
#endif
