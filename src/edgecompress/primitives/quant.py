"""Quantization math: one ``QuantSpec`` per tensor and pure functions (observers: ``observers``).

A ``QuantSpec`` says how one tensor is stored: integer bits (2 to 8; 32 for biases) or float16,
signed or unsigned, symmetric or affine, per-tensor / per-channel / per-group, a float or a
power-of-two scale, and, once calibrated, the scale and zero point themselves. Everything that
simulates, exports or packs a quantized tensor reads these same numbers.

Rounding is half to even and a value is quantized as ``clamp(round(x * (1 / scale)) + zp, qmin, qmax)``,
exactly as ``torch.fake_quantize_per_channel_affine`` does, so the two agree bit for bit.

Groups: a tensor of shape ``(C, ...)`` is viewed as ``(C, K)`` (``K`` = the rest flattened) and cut
into blocks of ``group_size`` consecutive elements along ``K``; the scale has shape ``(C, K // group_size)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """How one tensor is quantized. ``scale``/``zero_point`` are None until calibrated.

    Shapes: per-tensor 0-d; per-channel ``(C,)`` along ``axis``; per-group ``(C, K // group_size)``.
    ``zero_point`` holds integers (as int32) and is all zeros for symmetric specs.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: int | None = None
    scale_type: Literal["float", "pow2"] = "float"
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 8 or self.bits in (16, 32)):
            raise ValueError(f"bits must be 2..8, 16 (float16) or 32 (bias); got {self.bits}")
        if self.granularity == "group" and not self.group_size:
            raise ValueError("group granularity needs group_size")

    @property
    def is_float(self) -> bool:
        """float16 storage: no scale or zero point, the value is rounded to half precision."""
        return self.bits == 16

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        # symmetric signed ranges are restricted (-127..127) so that zero sits in the middle
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def calibrated(self) -> bool:
        return self.is_float or self.scale is not None

    def with_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> QuantSpec:
        return replace(self, scale=scale.detach().to(torch.float32).clone(),
                       zero_point=zero_point.detach().to(torch.int32).clone())

    def describe(self) -> str:
        if self.is_float:
            return "float16"
        kind = {"tensor": "per-tensor", "channel": f"per-channel(axis {self.axis})",
                "group": f"per-group({self.group_size})"}[self.granularity]
        return (f"{'' if self.signed else 'u'}int{self.bits} {'sym' if self.symmetric else 'affine'} {kind}"
                + (" pow2" if self.scale_type == "pow2" else ""))

    def to_dict(self) -> dict:
        """Plain numbers (lists) for JSON and for other exporters."""
        d = {k: getattr(self, k) for k in ("bits", "signed", "symmetric", "granularity", "axis", "group_size",
                                           "scale_type")}
        d["scale"] = None if self.scale is None else self.scale.tolist()
        d["zero_point"] = None if self.zero_point is None else self.zero_point.tolist()
        return d


# ---- reductions and parameters -------------------------------------------------------------

def _as_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(C, ...) -> (C, K // g, g) along the channel axis."""
    x2 = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    return x2.reshape(x2.shape[0], -1, spec.group_size)


def minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` at the spec's granularity (shapes as the scale's)."""
    x = x.detach().float()
    if spec.granularity == "tensor":
        return x.min(), x.max()
    if spec.granularity == "channel":
        x2 = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
        return x2.min(dim=1).values, x2.max(dim=1).values
    g = _as_groups(x, spec)
    return g.min(dim=2).values, g.max(dim=2).values


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover [lo, hi] (zero always exactly representable)."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = torch.maximum(-lo, hi) if spec.signed else hi
        scale = amax / float(qmax)
    else:
        scale = (hi - lo) / float(qmax - qmin)
    scale = torch.clamp(scale, min=EPS)
    if spec.scale_type == "pow2":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    if spec.symmetric:
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def calibrate(x: torch.Tensor, spec: QuantSpec) -> QuantSpec:
    """``spec`` with the min-max scale and zero point of ``x``."""
    if spec.is_float:
        return spec
    return spec.with_params(*qparams(*minmax(x, spec), spec))


def half_up(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 values >= ``scale`` (as float32): a scale an export can store in half the
    bytes, never smaller than the min-max one, so nothing more is clipped. Values below float16's
    normal range (2**-14) stay as they are (they would lose precision)."""
    s = scale.float()
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return torch.where(s < 2.0 ** -14, s, h.float())


# ---- quantize / dequantize -------------------------------------------------------------------

def _expand(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A scale or zero point broadcast against ``x``."""
    if spec.granularity == "tensor":
        return p
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return p.reshape(shape)
    moved = x.movedim(spec.axis, 0)
    full = p.repeat_interleave(spec.group_size, dim=1).reshape(moved.shape)
    return full.movedim(0, spec.axis)


def quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes of ``x`` (as float32 holding integers; exact up to 2**24)."""
    if spec.scale is None:
        raise ValueError("spec is not calibrated")
    scale = _expand(spec.scale, x, spec)
    zp = _expand(spec.zero_point, x, spec).to(torch.float32)
    return torch.clamp(torch.round(x / scale) + zp, spec.qmin, spec.qmax)  # x / scale, as ONNX QuantizeLinear


def dequantize(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    scale = _expand(spec.scale, q, spec)
    zp = _expand(spec.zero_point, q, spec).to(torch.float32)
    return (q.to(torch.float32) - zp) * scale


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value the deployed model computes with."""
    if spec.is_float:
        return x.to(torch.float16).to(x.dtype)
    return dequantize(quantize(x, spec), spec)


def int_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest torch integer type that stores the codes (int8/uint8/int32)."""
    if spec.bits == 32:
        return torch.int32
    return torch.int8 if spec.signed else torch.uint8


# ---- training-time fake quant (gradients) --------------------------------------------------

class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


def fake_quant_ste(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake quant with the straight-through estimator: gradient 1 inside the range, 0 outside."""
    if spec.is_float:
        return x + (x.to(torch.float16).to(x.dtype) - x).detach()
    scale = _expand(spec.scale, x, spec)
    zp = _expand(spec.zero_point, x, spec).to(torch.float32)
    q = _RoundSTE.apply(x / scale) + zp
    q = torch.clamp(q, spec.qmin, spec.qmax)
    return (q - zp) * scale


def fake_quant_lsq(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Learned step size quantization (Esser et al. 2020): ``scale`` is a trainable tensor shaped like
    ``spec.scale``; its gradient is scaled by 1 / sqrt(numel * qmax)."""
    grad_scale = 1.0 / math.sqrt(x.numel() / max(scale.numel(), 1) * max(spec.qmax, 1))
    s = scale * grad_scale + (scale - scale * grad_scale).detach()
    s = _expand(s.abs() + EPS, x, spec)
    zp = _expand(spec.zero_point, x, spec).to(torch.float32)
    q = torch.clamp(_RoundSTE.apply(x / s) + zp, spec.qmin, spec.qmax)
    return (q - zp) * s


def dynamic_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's uint8 scale and zero point for ``x`` (computed at run time)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zp


# ---- weight transforms: GPTQ rounding, cross-layer equalization, batch-norm folding ----------

def mse_qparams(x: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None, steps: int = 20,
                low: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``x`` (R, n) that minimize the (``weight``-weighted, (n,))
    squared error of its fake quant, among ``steps`` shrinks of the min-max range down to ``low``
    of it (the MSE observer, one range per row: a channel or a group of a weight). The first of
    equal errors wins, so a row min-max already fits exactly keeps its min-max range."""
    x = x.float()
    a = torch.linspace(1.0, low, steps).reshape(-1, 1)
    sc, zp = qparams(x.min(dim=1).values * a, x.max(dim=1).values * a, spec)  # (steps, R)
    zf = zp.float().unsqueeze(2)
    q = torch.clamp(torch.round(x * (1.0 / sc).unsqueeze(2)) + zf, spec.qmin, spec.qmax)
    d = (q - zf) * sc.unsqueeze(2) - x
    err = (d * d * weight).sum(dim=2) if weight is not None else (d * d).sum(dim=2)
    best = err.argmin(dim=0, keepdim=True)  # first minimum
    return sc.gather(0, best).squeeze(0), zp.gather(0, best).squeeze(0)


def calibrate_mse(w: torch.Tensor, spec: QuantSpec, steps: int = 20, low: float = 0.5) -> QuantSpec:
    """``spec`` with per-channel or per-group weight scales chosen by ``mse_qparams`` (per-tensor:
    min-max)."""
    if spec.is_float or spec.granularity == "tensor":
        return calibrate(w, spec)
    if spec.granularity == "channel":
        x2 = w.detach().movedim(spec.axis, 0).reshape(w.shape[spec.axis], -1)
        return spec.with_params(*mse_qparams(x2, spec, steps=steps, low=low))
    g = _as_groups(w.detach(), spec)
    sc, zp = mse_qparams(g.reshape(-1, spec.group_size), spec, steps=steps, low=low)
    return spec.with_params(sc.reshape(g.shape[:2]), zp.reshape(g.shape[:2]))


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``h``'s inverse, in float32 (float64 when float32 is not accurate
    enough for a factorization to succeed)."""
    for dtype in (torch.float32, torch.float64):
        lower, info = torch.linalg.cholesky_ex(h.to(dtype))
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.float()
    raise ValueError("GPTQ: the damped Hessian is not positive definite")


def gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
         block: int = 128, mse: bool = False) -> tuple[torch.Tensor, QuantSpec]:
    """Error-compensating rounding (Frantar et al. 2023, GPTQ) of a weight (C, K) given the Hessian
    ``X^T X`` (K, K) of its inputs. Columns are rounded in order; each rounding error is spread over
    the columns not yet rounded, lazily: within a block of ``block`` columns, then onto the rest in one
    matrix product. Per-group scales are set from the updated weights when a group starts (by min-max,
    or with ``mse`` by the shrink of the range with the least Hessian-weighted error); per-channel and
    per-tensor scales come from the original weights. Returns integer codes (C, K) and the calibrated spec.
    Runs on one thread (restored after): its thousands of tiny ops only wait on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, hessian, spec, damp, block, mse)
    finally:
        torch.set_num_threads(threads)


def _gptq(w, hessian, spec, damp, block, mse):
    w = w.detach().float().reshape(w.shape[0], -1).clone()
    c, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = _upper_inverse_cholesky(h)
    hdiag = torch.diag(h)
    group = spec.granularity == "group"
    g = spec.group_size if group else k
    if group and block % g:
        block = g * max(1, block // g)
    if not group:
        spec = calibrate_mse(w, spec) if mse else calibrate(w, spec)
        s_full = spec.scale.expand(c) if spec.scale.dim() == 0 else spec.scale.reshape(c)
        z_full = spec.zero_point.expand(c) if spec.zero_point.dim() == 0 else spec.zero_point.reshape(c)
    scales = torch.zeros(c, k // g)
    zps = torch.zeros(c, k // g, dtype=torch.int32)
    codes = torch.zeros_like(w)
    _gptq_columns(w, hinv, hdiag, spec, g, block, mse, scales, zps, codes, None if group else (s_full, z_full))
    if group:
        spec = spec.with_params(scales, zps)
    return codes, spec


def _gptq_columns(w, hinv, hdiag, spec, g, block, mse, scales, zps, codes, fixed) -> None:
    """GPTQ's column loop: fills ``codes``, ``scales``, ``zps`` in place; ``fixed``: (scale, zero
    point) per row for per-channel/per-tensor specs, None for groups."""
    c, k = w.shape
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    s = inv = z = None
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb = w[:, i0:i1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            col = i0 + j
            if col % g == 0:
                if fixed is None:  # groups lie inside a block (block is a multiple of g)
                    chunk = wb[:, j:j + g]
                    if mse:
                        sc, zc = mse_qparams(chunk, spec, weight=hdiag[col:col + g])
                    else:
                        sc, zc = qparams(chunk.min(dim=1).values, chunk.max(dim=1).values, spec)
                else:
                    sc, zc = fixed
                scales[:, col // g], zps[:, col // g] = sc, zc
                s, inv, z = sc, 1.0 / sc, zc.float()
            q = torch.clamp(torch.round(wb[:, j] * inv) + z, qmin, qmax)
            codes[:, col] = q
            e = (wb[:, j] - (q - z) * s) / hb[j, j]
            wb[:, j + 1:].addr_(e, hb[j, j + 1:], alpha=-1)
            err[:, j] = e
        w[:, i1:].addmm_(err, hinv[i0:i1, i1:], alpha=-1)


def equalize_scales(w1: torch.Tensor, w2: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Cross-layer equalization (Nagel et al. 2019): per-channel factors ``s`` such that dividing the
    output channels of ``w1`` by ``s`` and multiplying the matching input channels of ``w2`` by ``s``
    gives both the same per-channel range (sqrt(r1 * r2)). ``repeat``: inputs of ``w2`` per channel of
    ``w1`` (a Flatten after a conv)."""
    r1 = w1.detach().reshape(w1.shape[0], -1).abs().max(dim=1).values
    w2c = w2.detach().transpose(0, 1).reshape(w1.shape[0], repeat, w2.shape[0], -1)
    r2 = w2c.abs().amax(dim=(1, 2, 3))
    s = torch.sqrt(r1 / r2.clamp(min=EPS)).clamp(min=1e-4, max=1e4)
    return torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))


def fold_batchnorm(w: torch.Tensor, b: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv."""
    std = torch.sqrt(var + eps)
    g = gamma if gamma is not None else torch.ones_like(mean)
    factor = g / std
    shape = [-1] + [1] * (w.dim() - 1)
    b = b if b is not None else torch.zeros_like(mean)
    return w * factor.reshape(shape), (b - mean) * factor + (beta if beta is not None else 0)
