/* edgecompress integer kernels for microcontrollers: int8 NHWC activations with per-tensor affine
 * quantization, int8 weights with per-output-channel scales, int32 accumulators and fixed-point
 * requantization (multiplier and shift, Jacob et al. 2018). C99, no dynamic memory, no floats.
 * The rounding matches the TFLite / TFLite Micro reference kernels bit for bit. */
#ifndef EC_KERNELS_H
#define EC_KERNELS_H

#include <stdint.h>

/* Only the kernels a model calls are compiled: its generated ec_config.h defines EC_USE_<KERNEL>
 * for each (and the compressed-weight variants it stores); EC_ALL_KERNELS compiles every one. */

/* Weights stored in a compressed format (see edgecompress/export/cformats.py), decoded on the fly.
 * Rows are output channels, each in the order the kernels read it (conv: kh x kw x channels of
 * its group; Linear: inputs). */
enum { EC_INT4 = 1, EC_CODEBOOK = 2, EC_SPARSE = 3, EC_SPARSE_CODEBOOK = 4 };

typedef struct {           /* bytes, not words: 32 bytes of flash per compressed layer */
    uint8_t format;          /* EC_INT4 ... EC_SPARSE_CODEBOOK */
    uint8_t bits;            /* bits per codebook index (1..8) */
    uint8_t run_bits;        /* run lengths: 8 (a byte each) or 4 (two a byte, low nibble first) */
    uint8_t block;           /* sparse formats with blocks: weights per block (2, 4 or 8); else 0 */
    const int8_t *values;    /* EC_SPARSE: the stored codes, row after row */
    const uint8_t *packed;   /* EC_INT4: two codes per byte, low nibble first; codebook formats:
                                indices, LSB first, one padding byte at the end */
    const int8_t *table;     /* codebook formats: the values the indices select (with table_stride,
                                row o's table starts at entry o * table_stride) */
    const uint8_t *mask;     /* sparse formats with a bitmask: ceil(K / 8) bytes per row, bit i set
                                when weight i of the row is stored; with blocks, ceil(ceil(K / block) / 8)
                                bytes per row, bit i set when the block of weights i * block ... is
                                stored (all its block codes, zeros included); NULL with run lengths */
    const uint8_t *gaps;     /* run lengths: zeros skipped before each stored entry (at most 255, or 15 with
                                4-bit runs; a longer gap continues with a stored zero) */
    const uint16_t *count;   /* run lengths: entries per row */
    int32_t table_stride;    /* codebook with a table per output row: entries of each; 0: one table */
} ec_weights_t;

typedef struct {
    int32_t ih, iw, ic, oh, ow, oc, kh, kw, sh, sw, ph, pw, groups;
    int32_t in_zp, out_zp, act_min, act_max;
    int32_t per_channel;   /* 1: mult and shift hold oc values; 0: one for every channel */
    const int8_t *w;       /* conv: OHWI, I = ic / groups; depthwise: 1 x kh x kw x oc */
    const int32_t *bias;   /* oc values at scale s_in * s_w[c] */
    const int32_t *mult;   /* fixed-point multipliers (oc, or 1 when per_channel is 0) */
    const int8_t *shift;   /* shifts (as mult) */
    const ec_weights_t *fw; /* compressed weights (ec_conv_packed / ec_conv_sparse), else NULL */
} ec_conv_t;

typedef struct {
    int32_t n_in, n_out, in_zp, out_zp, act_min, act_max;
    int32_t per_channel;   /* as ec_conv_t's */
    const int8_t *w;       /* n_out x n_in */
    const int32_t *bias;
    const int32_t *mult;
    const int8_t *shift;
    const ec_weights_t *fw; /* compressed weights (ec_fc_packed / ec_fc_sparse), else NULL */
} ec_fc_t;

typedef struct {
    int32_t ih, iw, c, oh, ow, kh, kw, sh, sw, ph, pw, act_min, act_max;
} ec_pool_t;

typedef struct {
    int32_t n, zp1, zp2, out_zp, act_min, act_max;
    int32_t m1, m2, mo;
    int8_t s1, s2, so;
} ec_add_t;

typedef struct {
    int32_t pixels, c, zp1, zp2, out_zp, act_min, act_max;
    int32_t gate;          /* 1: b holds c values (a channel gate) that every pixel of a uses; 0: as many as a */
    int32_t mult;
    int8_t shift;
} ec_mul_t;

int32_t ec_requant(int32_t x, int32_t multiplier, int shift);
void ec_conv(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_dwconv(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_fc(const ec_fc_t *p, const int8_t *in, int8_t *out);
void ec_maxpool(const ec_pool_t *p, const int8_t *in, int8_t *out);
void ec_avgpool(const ec_pool_t *p, const int8_t *in, int8_t *out);
void ec_add(const ec_add_t *p, const int8_t *a, const int8_t *b, int8_t *out);
void ec_relu(int32_t n, int32_t zp, const int8_t *in, int8_t *out);
/* (a - zp1) * (b - zp2) requantized to the output grid (TFLite's int8 MUL); b a tensor like a or a gate. */
void ec_mul(const ec_mul_t *p, const int8_t *a, const int8_t *b, int8_t *out);
/* out[i] = table[in[i] + 128]: an activation (sigmoid, hardswish, ...) tabulated for the two grids. */
void ec_lut(int32_t n, const int8_t *table, const int8_t *in, int8_t *out);
/* Channels picked per pixel: out channel j is in channel index[j] (a chunk, a channel shuffle). */
void ec_gather(int32_t pixels, int32_t c_in, int32_t c_out, const int16_t *index, const int8_t *in, int8_t *out);
/* (in - in_zp) requantized to another grid (TFLite's int8 -> int8 QUANTIZE): a concatenation's input. */
void ec_rescale(int32_t n, int32_t in_zp, int32_t out_zp, int32_t mult, int shift, const int8_t *in, int8_t *out);
/* Channel concatenation, one input at a time: the c_in channels of each of the pixels of in go to
 * channels c0 ... c0 + c_in - 1 of out (c_out channels); every input is on the output's grid. */
void ec_concat(int32_t pixels, int32_t c_in, int32_t c_out, int32_t c0, const int8_t *in, int8_t *out);
/* The same convolution (any groups; depthwise is groups = ic) and Linear with compressed weights. */
void ec_conv_packed(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_conv_sparse(const ec_conv_t *p, const int8_t *in, int8_t *out);
void ec_fc_packed(const ec_fc_t *p, const int8_t *in, int8_t *out);
void ec_fc_sparse(const ec_fc_t *p, const int8_t *in, int8_t *out);

#endif
