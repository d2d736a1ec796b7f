"""The ONNX form of quantized computation, for ``torch.onnx.export``: each function's forward is the
torch simulation and its ``symbolic`` the ONNX operators (QuantizeLinear / DequantizeLinear,
DynamicQuantizeLinear + MatMulInteger / ConvInteger, MatMulNBits, Gather + DequantizeLinear), with
the buffers' scales and zero points as initializers; and the bit packing MatMulNBits reads."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from . import quant as Q


def const(t: torch.Tensor) -> torch.Tensor:
    """A copy the ONNX tracer sees as a constant (transforms of buffers must not become graph ops)."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """A scale as the export stores it: float16 when every value is exactly a float16 (the same
    numbers in half the bytes), otherwise the float32 buffer itself."""
    half = scale.detach().to(torch.float16)
    return const(half) if torch.equal(half.float(), scale.detach().float()) else scale


def scalar_zero_point(zp: torch.Tensor) -> torch.Tensor:
    """One scalar zero for an all-zero (symmetric) zero point tensor, else the tensor."""
    return const(zp.reshape(-1)[:1].reshape(())) if zp.numel() and not bool(zp.any()) else zp


class QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int):  # type: ignore[override]
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
        return (q - zp.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


class Clip(torch.autograd.Function):
    """Clamp to a quantizer's range before its QuantizeLinear (which clamps the same way). In the
    file it keeps ONNX Runtime from moving the QuantizeLinear above a float MaxPool, where the pool
    would run on uint8 in NCHW, its slow path; ONNX Runtime then folds the Clip into the quantize."""

    @staticmethod
    def forward(ctx, x, lo, hi):  # type: ignore[override]
        return torch.clamp(x, lo, hi)

    @staticmethod
    def symbolic(g, x, lo, hi):
        return g.op("Clip", x, lo, hi)


class DQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zp, axis: int):  # type: ignore[override]
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zp.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zp, axis):
        return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


class Half(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w16):  # type: ignore[override]
        return w16.float()

    @staticmethod
    def symbolic(g, w16):
        return g.op("Cast", w16, to_i=1)


class DynamicMatMul(torch.autograd.Function):
    """x (float) @ dequant(wT int8 (K, N)) + b, x quantized to uint8 at run time. ``w_scale`` may be
    float16 (a Cast to float follows it; ONNX Runtime folds the Cast when it loads the model)."""

    @staticmethod
    def forward(ctx, x, wt, w_scale, w_zp, bias):  # type: ignore[override]
        s, z = Q.dynamic_params(x)
        xq = torch.clamp(torch.round(x / s) + z, 0, 255)
        w = (wt.float() - w_zp.float()) * w_scale.float()
        return torch.matmul((xq - z) * s, w) + bias

    @staticmethod
    def symbolic(g, x, wt, w_scale, w_zp, bias):
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, wt, xz, w_zp)
        y = g.op("Cast", acc, to_i=1)
        if w_scale.type().scalarType() == "Half":
            w_scale = g.op("Cast", w_scale, to_i=1)
        y = g.op("Mul", y, g.op("Mul", xs, w_scale))
        return g.op("Add", y, bias)


class MatMulNBits(torch.autograd.Function):
    """x @ W.T + b with W in ``bits``-bit blocks along K (ONNX Runtime's com.microsoft.MatMulNBits)."""

    @staticmethod
    def forward(ctx, x, w_deq, packed, scales, zps, bias, k: int, n: int, bits: int, block: int):  # type: ignore[override]
        return torch.matmul(x, w_deq.t()) + bias

    @staticmethod
    def symbolic(g, x, w_deq, packed, scales, zps, bias, k, n, bits, block):
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, zps, K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        return g.op("Add", y, bias)


def pack_nbits(codes: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Unsigned codes (N, K) -> MatMulNBits' uint8 layout (N, K // block, block * bits // 8), low bits first."""
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // block, block)
    if bits == 8:
        return c.to(torch.uint8)
    per = 8 // bits
    c = c.reshape(n, k // block, block // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.int32)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out.to(torch.uint8)


def pack_zero_points(zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points (N, blocks) -> MatMulNBits' packed uint8 (N * ceil(blocks * bits / 8))."""
    n, nb = zp.shape
    if bits == 8:
        return zp.to(torch.uint8).reshape(-1)
    per = 8 // bits
    pad = (-nb) % per
    z = torch.cat([zp.to(torch.int32), torch.zeros(n, pad, dtype=torch.int32)], dim=1).reshape(n, -1, per)
    out = torch.zeros(z.shape[:-1], dtype=torch.int32)
    for j in range(per):
        out |= z[..., j] << (bits * j)
    return out.to(torch.uint8).reshape(-1)


class DynamicConv(torch.autograd.Function):
    """Conv with int8 weights and uint8 inputs quantized at run time (ONNX ConvInteger)."""

    @staticmethod
    def forward(ctx, x, qw, w_scale, w_zp, bias, stride, padding, dilation, groups):  # type: ignore[override]
        s, z = Q.dynamic_params(x)
        xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
        shape = [-1] + [1] * (qw.dim() - 1)
        w = (qw.float() - w_zp.float().reshape(shape if w_zp.dim() else [])) * w_scale.reshape(shape)
        conv = F.conv1d if qw.dim() == 3 else F.conv2d
        return conv(xq, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, qw, w_scale, w_zp, bias, stride, padding, dilation, groups):
        nd = len(stride)
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("ConvInteger", xq, qw, xz, w_zp, strides_i=stride, pads_i=list(padding) * 2,
                   dilations_i=dilation, group_i=groups)
        y = g.op("Cast", acc, to_i=1)
        shape = g.op("Constant", value_t=torch.tensor([1, -1] + [1] * nd, dtype=torch.int64))
        y = g.op("Mul", y, g.op("Reshape", g.op("Mul", xs, w_scale), shape))
        return g.op("Add", y, g.op("Reshape", bias, shape))


class GatherColumns(torch.autograd.Function):
    """Embedding lookup on an int8 table with one scale per column (embedding dimension): Gather the
    int8 rows, then DequantizeLinear along the last axis."""

    @staticmethod
    def forward(ctx, ids, qtable, scale, zp):  # type: ignore[override]
        return (qtable[ids].float() - zp.float()) * scale

    @staticmethod
    def symbolic(g, ids, qtable, scale, zp):
        return g.op("DequantizeLinear", g.op("Gather", qtable, ids, axis_i=0), scale, zp, axis_i=-1)
