/* edgecompress integer kernels; see ec_kernels.h. Signed right shifts are arithmetic (as on every
 * compiler edgecompress is tested with: gcc for the host and arm-none-eabi-gcc). */
#include "ec_kernels.h"

#define EC_ADD_LEFT_SHIFT 20

static int32_t ec_clamp(int32_t v, int32_t lo, int32_t hi) {
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

int32_t ec_requant(int32_t x, int32_t multiplier, int shift) {
    const int left = shift > 0 ? shift : 0;
    const int right = shift > 0 ? 0 : -shift;
    return ec_div_pot(ec_high_mul((int32_t)((uint32_t)x << left), multiplier), right);
}

void ec_conv(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    int32_t oy, ox, o, ky, kx, c;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            for (o = 0; o < p->oc; ++o) {
                int32_t acc = p->bias[o];
                const int8_t *w = p->w + o * p->kh * p->kw * p->ic;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t y = y0 + ky;
                    if (y < 0 || y >= p->ih) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t x = x0 + kx;
                        const int8_t *src, *wk;
                        if (x < 0 || x >= p->iw) continue;
                        src = in + (y * p->iw + x) * p->ic;
                        wk = w + (ky * p->kw + kx) * p->ic;
                        for (c = 0; c < p->ic; ++c) acc += ((int32_t)src[c] - p->in_zp) * wk[c];
                    }
                }
                acc = ec_requant(acc, p->mult[o], p->shift[o]) + p->out_zp;
                out[(oy * p->ow + ox) * p->oc + o] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
            }
        }
    }
}

void ec_dwconv(const ec_conv_t *p, const int8_t *in, int8_t *out) {
    const int32_t mult = p->oc / p->ic;
    int32_t oy, ox, o, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            const int32_t y0 = oy * p->sh - p->ph, x0 = ox * p->sw - p->pw;
            for (o = 0; o < p->oc; ++o) {
                const int32_t c = o / mult;
                int32_t acc = p->bias[o];
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t y = y0 + ky;
                    if (y < 0 || y >= p->ih) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t x = x0 + kx;
                        if (x < 0 || x >= p->iw) continue;
                        acc += ((int32_t)in[(y * p->iw + x) * p->ic + c] - p->in_zp)
                               * p->w[(ky * p->kw + kx) * p->oc + o];
                    }
                }
                acc = ec_requant(acc, p->mult[o], p->shift[o]) + p->out_zp;
                out[(oy * p->ow + ox) * p->oc + o] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
            }
        }
    }
}

void ec_fc(const ec_fc_t *p, const int8_t *in, int8_t *out) {
    int32_t o, i;
    for (o = 0; o < p->n_out; ++o) {
        const int8_t *w = p->w + o * p->n_in;
        int32_t acc = p->bias[o];
        for (i = 0; i < p->n_in; ++i) acc += ((int32_t)in[i] - p->in_zp) * w[i];
        acc = ec_requant(acc, p->mult[o], p->shift[o]) + p->out_zp;
        out[o] = (int8_t)ec_clamp(acc, p->act_min, p->act_max);
    }
}

void ec_maxpool(const ec_pool_t *p, const int8_t *in, int8_t *out) {
    int32_t oy, ox, c, ky, kx;
    for (oy = 0; oy < p->oh; ++oy) {
        for (ox = 0; ox < p->ow; ++ox) {
            for (c = 0; c < p->c; ++c) {
                int32_t m = -128;
                for (ky = 0; ky < p->kh; ++ky) {
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t v = in[((oy * p->sh + ky) * p->iw + ox * p->sw + kx) * p->c + c];
                        if (v > m) m = v;
                    }
                }
                out[(oy * p->ow + ox) * p->c + c] = (int8_t)ec_clamp(m, p->act_min, p->act_max);
            }
        }
    }
}

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

void ec_relu(int32_t n, int32_t zp, const int8_t *in, int8_t *out) {
    int32_t i;
    for (i = 0; i < n; ++i) out[i] = in[i] > zp ? in[i] : (int8_t)zp;
}
