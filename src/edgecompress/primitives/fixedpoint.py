"""Integer-only arithmetic for int8 inference (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", section 2.2).

A real multiplier ``M = s_in * s_w / s_out`` is stored as an int32 ``m`` in [2**30, 2**31) and a shift,
``M = m * 2**(shift - 31)``; applying it is a rounding doubling high multiply and a rounding right
shift. The rounding matches the TFLite / TFLite Micro reference kernels (gemmlowp), so these functions,
the generated C kernels and both TFLite runtimes agree bit for bit. Everything here works on numpy
int64 arrays and is vectorised.
"""
from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real`` as (int32 multiplier, shift) with ``real ~= m * 2**(shift - 31)`` (TFLite QuantizeMultiplier)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)  # real = q * 2**shift, q in [0.5, 1)
    q_fixed = int(_round_half_away(q * (1 << 31)))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"multiplier {real} is too large for int32 fixed point")
    return q_fixed, shift


def _round_half_away(x: float) -> float:
    return math.floor(x + 0.5) if x >= 0 else -math.floor(-x + 0.5)


def _trunc_div_pow2(v: np.ndarray, bits: int) -> np.ndarray:
    """C integer division of int64 ``v`` by 2**bits (rounds toward zero)."""
    return np.where(v >= 0, v >> bits, -((-v) >> bits))


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    out = _trunc_div_pow2(ab + nudge, 31)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, np.int64(INT32_MAX), out)


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2**exponent, rounding half away from zero."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> exponent) + (remainder > threshold).astype(np.int64)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: np.ndarray | int,
                                     shift: np.ndarray | int) -> np.ndarray:
    """``x * M`` in fixed point, as TFLite's MultiplyByQuantizedMultiplier (double rounding)."""
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = np.asarray(x, dtype=np.int64) * (np.int64(1) << left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, out_zp: int,
               qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """int32 accumulators -> int8 outputs: scale by (multiplier, shift), add the zero point, clamp."""
    out = multiply_by_quantized_multiplier(acc, multiplier, shift) + out_zp
    return np.clip(out, qmin, qmax).astype(np.int8)


ADD_LEFT_SHIFT = 20


def add_params(s1: float, s2: float, s_out: float) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(multiplier, shift) for each input and the output of an int8 add (TFLite's scheme, left shift 20)."""
    twice_max = 2.0 * max(s1, s2)
    return (quantize_multiplier(s1 / twice_max), quantize_multiplier(s2 / twice_max),
            quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_out)))


def add_int8(a: np.ndarray, zp_a: int, b: np.ndarray, zp_b: int, params, out_zp: int,
             qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """Element-wise int8 add of two tensors with their own scales, as TFLite's reference kernel."""
    (m1, s1), (m2, s2), (mo, so) = params
    x1 = (a.astype(np.int64) - zp_a) * (1 << ADD_LEFT_SHIFT)
    x2 = (b.astype(np.int64) - zp_b) * (1 << ADD_LEFT_SHIFT)
    total = multiply_by_quantized_multiplier(x1, m1, s1) + multiply_by_quantized_multiplier(x2, m2, s2)
    return np.clip(multiply_by_quantized_multiplier(total, mo, so) + out_zp, qmin, qmax).astype(np.int8)


def avg_round(total: np.ndarray, count: int) -> np.ndarray:
    """Integer mean rounding half away from zero (TFLite's int8 average pool)."""
    total = np.asarray(total, dtype=np.int64)
    up = (total + count // 2) // count
    down = -((-total + count // 2) // count)
    return np.where(total > 0, up, down)
