/* edgecompress integer kernels for microcontrollers: int8 NHWC activations with per-tensor affine
 * quantization, int8 weights with per-output-channel scales, int32 accumulators and fixed-point
 * requantization (multiplier and shift, Jacob et al. 2018). C99, no dynamic memory, no floats.
 * The rounding matches the TFLite / TFLite Micro reference kernels bit for bit. */
#ifndef EC_KERNELS_H
#define EC_KERNELS_H

#include <stdint.h>

typedef struct {
    int32_t ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, ph, pw;
    int32_t in_zp, out_zp, act_min, act_max;
    const int8_t *w;       /* conv: OHWI; depthwise: 1 x kh x kw x oc */
    const int32_t *bias;   /* oc values at scale s_in * s_w[c] */
    const int32_t *mult;   /* oc fixed-point multipliers */
    const int8_t *shift;   /* oc shifts */
} ec_conv_t;

typedef struct {
    int32_t n_in, n_out, in_zp, out_zp, act_min, act_max;
    const int8_t *w;       /* n_out x n_in */
    const int32_t *bias;
    const int32_t *mult;
    const int8_t *shift;
} ec_fc_t;

typedef struct {
    int32_t ih, iw, c, oh, ow, kh, kw, sh, sw, act_min, act_max;
} ec_pool_t;

typedef struct {
    int32_t n, zp1, zp2, out_zp, act_min, act_max;
    int32_t m1, m2, mo;
    int8_t s1, s2, so;
} ec_add_t;

int32_t ec_requant(int32_t x, int32_t multiplier, int shift);
void ec_conv(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_dwconv(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_fc(const ec_fc_t *p, const int8_t *in, int8_t *out);
void ec_maxpool(const ec_pool_t *p, const int8_t *in, int8_t *out);
void ec_avgpool(const ec_pool_t *p, const int8_t *in, int8_t *out);
void ec_add(const ec_add_t *p, const int8_t *a, const int8_t *b, int8_t *out);
void ec_relu(int32_t n, int32_t zp, const int8_t *in, int8_t *out);

#endif
