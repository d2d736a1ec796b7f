"""``QuantLayer``: a Linear / Conv1d / Conv2d that computes with quantized tensors.

Its buffers hold the integer weights and every scale and zero point; ``specs()`` turns them into one
``QuantSpec`` per tensor. The forward pass is the torch simulation; under ``torch.onnx.export`` the
same computation is emitted as ONNX operators (QuantizeLinear / DequantizeLinear, DynamicQuantizeLinear
+ MatMulInteger, MatMulNBits, Cast from float16) whose scale and zero point initializers are these
buffers, so the file holds exactly the spec's numbers.

Modes: ``static`` (int weights, activations quantized with calibrated specs, int32 bias),
``dynamic`` (int8 weights, uint8 activations quantized at run time), ``weight_only`` (int4/int8
grouped or float16 weights, float activations), ``qat`` (trains with fake quant, then behaves as static).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import quant as Q
from .quant import QuantSpec


def _c(t: torch.Tensor) -> torch.Tensor:
    """A copy the ONNX tracer sees as a constant (transforms of buffers must not become graph ops)."""
    return torch.from_numpy(t.detach().cpu().numpy().copy())


def _compact(scale: torch.Tensor) -> torch.Tensor:
    """A scale as the export stores it: float16 when every value is exactly a float16 (the same
    numbers in half the bytes), otherwise the float32 buffer itself."""
    half = scale.detach().to(torch.float16)
    return _c(half) if torch.equal(half.float(), scale.detach().float()) else scale


def _zero_point(zp: torch.Tensor) -> torch.Tensor:
    """One scalar zero for an all-zero (symmetric) zero point tensor, else the tensor."""
    return _c(zp.reshape(-1)[:1].reshape(())) if zp.numel() and not bool(zp.any()) else zp


# ---- export-only functions: forward is the simulation, symbolic the ONNX form -----------------

class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int):  # type: ignore[override]
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
        return (q - zp.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


class _Clip(torch.autograd.Function):
    """Clamp to a quantizer's range before its QuantizeLinear (which clamps the same way). In the
    file it keeps ONNX Runtime from moving the QuantizeLinear above a float MaxPool, where the pool
    would run on uint8 in NCHW, its slow path; ONNX Runtime then folds the Clip into the quantize."""

    @staticmethod
    def forward(ctx, x, lo, hi):  # type: ignore[override]
        return torch.clamp(x, lo, hi)

    @staticmethod
    def symbolic(g, x, lo, hi):
        return g.op("Clip", x, lo, hi)


class _DQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale, zp, axis: int):  # type: ignore[override]
        shape = [1] * q.dim()
        shape[axis] = -1
        return (q.float() - zp.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zp, axis):
        return g.op("DequantizeLinear", q, scale, zp, axis_i=axis)


class _Half(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w16):  # type: ignore[override]
        return w16.float()

    @staticmethod
    def symbolic(g, w16):
        return g.op("Cast", w16, to_i=1)


class _DynamicMatMul(torch.autograd.Function):
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


class _MatMulNBits(torch.autograd.Function):
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


# ---- the layer -----------------------------------------------------------------------------

ACT = (nn.ReLU, nn.ReLU6)


class QuantLayer(nn.Module):
    """``layer`` (Linear/Conv1d/Conv2d) with quantized weight and, by mode, quantized activations.

    ``act`` is an activation fused after the layer (ReLU), applied before the output quantizer, so
    ONNX Runtime folds it into the integer kernel.
    """

    def __init__(self, layer: nn.Module, mode: str, w_spec: QuantSpec, in_spec: QuantSpec | None = None,
                 out_spec: QuantSpec | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.mode = mode
        self.act = act
        self.kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        self._w = w_spec
        self._in = in_spec
        self._out = out_spec
        self.lsq = False
        self.guard_input = False  # the input comes from a float op: clamp before quantizing (see _Clip)
        self.register_buffer("qweight", torch.empty(0))
        for name, spec in (("w", w_spec), ("in", in_spec), ("out", out_spec)):
            self._store(name, spec)
        if w_spec.calibrated:
            self.freeze()

    # buffers <-> specs: the buffers are the source of truth (state_dict, export)
    def _store(self, name: str, spec: QuantSpec | None) -> None:
        if spec is None or spec.is_float or spec.scale is None:
            return
        zdtype = Q.int_dtype(spec) if name != "w" or self.mode != "weight_only" else torch.int32
        self.register_buffer(f"{name}_scale", spec.scale.clone())
        self.register_buffer(f"{name}_zp", spec.zero_point.to(zdtype).clone())

    def _spec(self, name: str) -> QuantSpec | None:
        base = {"w": self._w, "in": self._in, "out": self._out}[name]
        if base is None or base.is_float or not hasattr(self, f"{name}_scale"):
            return base
        return base.with_params(getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp").to(torch.int32))

    def set_spec(self, name: str, spec: QuantSpec) -> None:
        setattr(self, f"_{name}", spec)
        self._store(name, spec)

    @property
    def w_spec(self) -> QuantSpec:
        return self._spec("w")

    @property
    def in_spec(self) -> QuantSpec | None:
        return self._spec("in")

    @property
    def out_spec(self) -> QuantSpec | None:
        return self._spec("out")

    @property
    def bias_spec(self) -> QuantSpec | None:
        """int32, scale = input scale x weight scale (per output channel), zero point 0."""
        if self.mode not in ("static", "qat") or self.layer.bias is None or self.in_spec is None:
            return None
        w, x = self.w_spec, self.in_spec
        scale = (x.scale * w.scale).reshape(-1).to(torch.float32)
        if scale.numel() == 1:
            scale = scale.expand(self.layer.bias.shape[0]).clone()
        return QuantSpec(bits=32, signed=True, symmetric=True, granularity="channel", axis=0).with_params(
            scale, torch.zeros_like(scale, dtype=torch.int32))

    def specs(self) -> dict[str, QuantSpec]:
        """One spec per quantized tensor: weight, bias (int32), input, output."""
        out = {"weight": self.w_spec}
        for key, s in (("bias", self.bias_spec), ("input", self.in_spec), ("output", self.out_spec)):
            if s is not None:
                out[key] = s
        return out

    # ---- calibrated weights ----------------------------------------------------------------
    def freeze(self, codes: torch.Tensor | None = None, recalibrate: bool = False) -> None:
        """Store integer weight codes (from ``codes``, e.g. GPTQ's, or by rounding the float weight)
        and set the float weight to their dequantized value. ``recalibrate``: new min-max scales."""
        spec = self._w if recalibrate else self.w_spec
        w = self.layer.weight.detach()
        with torch.no_grad():
            if spec.is_float:
                self.qweight = w.to(torch.float16)
                self.layer.weight.copy_(self.qweight.float())
                return
            if spec.scale is None:
                spec = Q.calibrate(w, spec)
                if self.mode == "dynamic":  # scales the export stores as float16 (half the bytes)
                    spec = spec.with_params(Q.half_up(spec.scale), spec.zero_point)
                self.set_spec("w", spec)
            q = Q.quantize(w, spec) if codes is None else codes.float()
            self.qweight = q.to(torch.int32 if spec.bits > 8 else Q.int_dtype(spec))
            self.layer.weight.copy_(Q.dequantize(q, spec))

    def _weight(self) -> torch.Tensor:
        if self.training and self.mode == "qat":
            if self.lsq:
                return Q.fake_quant_lsq(self.layer.weight, self.w_lsq, self._w)
            w = self.layer.weight
            return Q.fake_quant_ste(w, Q.calibrate(w.detach(), self._w))
        return self.layer.weight

    def _bias(self) -> torch.Tensor | None:
        b = self.layer.bias
        bs = self.bias_spec
        if b is None or bs is None:
            return b
        if self.training:
            return b
        return Q.fake_quant(b, bs)

    def _quant_act(self, x: torch.Tensor, name: str) -> torch.Tensor:
        spec = self._spec(name)
        if spec is None:
            return x
        if self.training and self.mode == "qat":
            if self.lsq and hasattr(self, f"{name}_lsq"):  # without one: a grid another module fixes
                return Q.fake_quant_lsq(x, getattr(self, f"{name}_lsq"), spec)
            return Q.fake_quant_ste(x, spec)
        if torch.onnx.is_in_onnx_export():
            return _QDQ.apply(x, getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp"), spec.qmin, spec.qmax)
        return Q.fake_quant(x, spec)

    def _compute(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            y = self._export_forward(x)
        elif self.mode == "dynamic":
            s, z = Q.dynamic_params(x)
            xq = (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s
            y = self._compute(xq, self.layer.weight, self.layer.bias)
        else:
            x = self._quant_act(x, "in")
            y = self._compute(x, self._weight(), self._bias())
        if self.act is not None:
            y = self.act(y)
        return self._quant_act(y, "out")

    # ---- ONNX form -------------------------------------------------------------------------
    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.w_spec
        bias = self.layer.bias
        if bias is None:
            out_ch = self.layer.weight.shape[0]
            bias = torch.zeros(out_ch)
        if self.mode == "dynamic" and self.kind == "linear":
            wt = _c(self.qweight.t().contiguous())
            return _DynamicMatMul.apply(x, wt, _compact(self.w_scale), _zero_point(self.w_zp), _c(bias))
        if self.mode == "weight_only" and spec.is_float:
            w = _Half.apply(self.qweight)
            return self._compute(x, w, self.layer.bias)
        if self.mode == "weight_only" and self.kind == "linear" and spec.granularity != "tensor" \
                and nbits_block_ok(self.layer.weight.shape[1], spec.group_size) and spec.bits in (4, 8):
            return self._export_nbits(x, spec, _c(bias))
        if self.mode == "dynamic":  # conv: ConvInteger on uint8 inputs quantized at run time
            l = self.layer
            # ONNX Runtime's ConvInteger takes one weight zero point; symmetric specs have all zeros
            zp = _c(self.w_zp.reshape(-1)[:1].reshape(())) if not bool(self.w_zp.any()) else self.w_zp
            return _DynamicConv.apply(x, self.qweight, self.w_scale, zp, _c(bias), list(l.stride), list(l.padding),
                                      list(l.dilation), l.groups)
        if self.mode in ("static", "qat"):
            s_in = self.in_spec
            if self.guard_input and s_in is not None:
                lo = (s_in.qmin - s_in.zero_point.float()) * s_in.scale
                hi = (s_in.qmax - s_in.zero_point.float()) * s_in.scale
                x = _Clip.apply(x, _c(lo.reshape(())), _c(hi.reshape(())))
            x = self._quant_act(x, "in")
        w = self._export_weight(spec)
        b = self.layer.bias
        bs = self.bias_spec
        if b is not None and bs is not None:
            bq = _c(Q.quantize(b.detach(), bs).to(torch.int32))
            b = _DQ.apply(bq, _c(bs.scale), _c(bs.zero_point), 0)
        if self.kind == "linear" and x.dim() != 2:
            # pre-transposed weight, so that DequantizeLinear feeds MatMul directly
            y = torch.matmul(x, self._export_weight(spec, transposed=True))
            return y if b is None else y + b
        return self._compute(x, w, b)

    def _export_weight(self, spec: QuantSpec, transposed: bool = False) -> torch.Tensor:
        q, scale, zp, axis = self.qweight, self.w_scale, self.w_zp, spec.axis
        if spec.granularity == "group":
            raise ValueError("grouped integer weights export through MatMulNBits (Linear, weight_only) only")
        if transposed:
            q = _c(q.t().contiguous())
            axis = 1 - axis if spec.granularity == "channel" else 0
        if zp.dtype != q.dtype:
            zp = _c(zp.to(q.dtype))
        if spec.granularity == "tensor":
            return _DQ.apply(q, scale, zp, 0)
        return _DQ.apply(q, scale, zp, axis)

    def _export_nbits(self, x: torch.Tensor, spec: QuantSpec, bias: torch.Tensor) -> torch.Tensor:
        n, k = self.layer.out_features, self.layer.in_features
        bits = 4 if spec.bits <= 4 else 8
        block = spec.group_size if spec.granularity == "group" else k  # per-channel: one block spans K
        scales = _c(self.w_scale.reshape(-1))
        zps = self.w_zp.reshape(n, -1)
        offset = 2 ** (bits - 1) if spec.signed else 0
        packed = _c(pack_nbits(self.qweight.to(torch.int32) + offset, bits, block))
        zp_packed = _c(pack_zero_points(zps.to(torch.int32) + offset, bits))
        return _MatMulNBits.apply(x, _c(self.layer.weight), packed, scales, zp_packed, bias, k, n, bits, block)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, weight={self.w_spec.describe()}"


class _DynamicConv(torch.autograd.Function):
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


class ActQuant(nn.Module):
    """Quantizes one activation tensor that no layer owns: the output of a residual add (after its
    ReLU) or of an average pool. In ONNX it is a QuantizeLinear / DequantizeLinear pair, so ONNX
    Runtime runs the op before it as QLinearAdd / QLinearGlobalAveragePool.

    Until ``set_spec`` it passes values through and, with an ``observer``, records their range.
    """

    def __init__(self, spec: QuantSpec, observer: Q.Observer | None = None, kind: str = "add") -> None:
        super().__init__()
        self._spec0 = spec
        self.kind = kind
        self.observer = observer
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zp", torch.empty(0, dtype=Q.int_dtype(spec)))

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    @property
    def spec(self) -> QuantSpec | None:
        if not self.calibrated:
            return None
        return self._spec0.with_params(self.scale, self.zp.to(torch.int32))

    def set_spec(self, spec: QuantSpec) -> None:
        self._spec0 = spec
        self.scale = spec.scale.clone()
        self.zp = spec.zero_point.to(Q.int_dtype(spec)).clone()
        self.observer = None

    def finish(self) -> None:
        """Fix the spec from what the observer saw."""
        if self.observer is not None:
            self.set_spec(self.observer.result())

    def specs(self) -> dict[str, QuantSpec]:
        s = self.spec
        return {} if s is None else {"output": s}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec is None:
            if self.observer is not None:
                self.observer.observe(x.detach())
            return x
        if torch.onnx.is_in_onnx_export():
            return _QDQ.apply(x, self.scale, self.zp, spec.qmin, spec.qmax)
        if self.training:
            return Q.fake_quant_ste(x, spec)
        return Q.fake_quant(x, spec)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.kind}, " + (s.describe() if s is not None else "not calibrated")


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quants(model: nn.Module) -> dict[str, ActQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


def int8_mismatch(model: nn.Module) -> tuple[str, str, str] | None:
    """The first place a runtime's int8 form (static or QAT layers, int8 weights with zero point 0 per
    tensor or per output channel, 8-bit activations) cannot hold, as ``(name, part, what)``: part
    ``mode`` (what: the layer's mode), ``weight``, ``input``, ``output`` (a layer's spec) or ``act``
    (an activation quantizer's spec), what described; None when every quantizer fits."""
    for name, ql in quant_layers(model).items():
        if ql.mode not in ("static", "qat"):
            return name, "mode", ql.mode
        w = ql.w_spec
        if w.is_float or w.bits > 8 or w.granularity == "group" or bool(w.zero_point.any()) or \
                (w.granularity == "channel" and w.axis != 0):
            return name, "weight", w.describe()
        for part, s in (("input", ql.in_spec), ("output", ql.out_spec)):
            if s is not None and s.bits != 8:
                return name, part, s.describe()
    for name, aq in act_quants(model).items():
        if aq.spec is not None and aq.spec.bits != 8:
            return name, "act", aq.spec.describe()
    return None


def int8_refusal(model: nn.Module, fmt: str, runtime: str, mode_rule: str, weight_rule: str) -> str | None:
    """The one-line refusal of export ``fmt`` for the first ``int8_mismatch``: ``mode_rule`` follows a
    layer's mode, ``weight_rule`` its weight spec; activations say ``runtime``'s are 8-bit."""
    bad = int8_mismatch(model)
    if bad is None:
        return None
    name, part, what = bad
    if part == "mode":
        return f"export {fmt}: layer {name} is quantized with mode {what}; {mode_rule}"
    if part == "weight":
        return f"export {fmt}: layer {name} weight is {what}; {weight_rule}"
    where = f"{name} output" if part == "act" else f"layer {name} {part}"
    return f"export {fmt}: {where} is {what}; {runtime}'s activations are 8-bit (act_bits: 8)"


def is_quantized(model: nn.Module) -> bool:
    from .qrnn import QuantRNNBase
    return any(isinstance(m, (QuantLayer, QuantEmbedding, ActQuant, QuantRNNBase)) for m in model.modules())


def tensor_specs(model: nn.Module) -> dict[str, QuantSpec]:
    """Every quantized tensor of ``model`` by name (``fc1.weight``, ``fc1.input``, ``block1.add.output``)
    and its spec (recurrent layers: ``rnn.weight_ih_l0``, ``rnn.weight_hh_l0``, ...)."""
    from .qrnn import QuantRNNBase
    return {f"{name}.{key}": s for name, m in model.named_modules()
            if isinstance(m, (QuantLayer, QuantEmbedding, ActQuant, QuantRNNBase)) for key, s in m.specs().items()}


def nbits_block_ok(k: int, group: int | None) -> bool:
    block = group or k
    return block >= 16 and (block & (block - 1)) == 0 and k % block == 0 and math.log2(block) <= 12


class _GatherColumns(torch.autograd.Function):
    """Embedding lookup on an int8 table with one scale per column (embedding dimension): Gather the
    int8 rows, then DequantizeLinear along the last axis."""

    @staticmethod
    def forward(ctx, ids, qtable, scale, zp):  # type: ignore[override]
        return (qtable[ids].float() - zp.float()) * scale

    @staticmethod
    def symbolic(g, ids, qtable, scale, zp):
        return g.op("DequantizeLinear", g.op("Gather", qtable, ids, axis_i=0), scale, zp, axis_i=-1)


class QuantEmbedding(nn.Module):
    """An nn.Embedding whose table is int8, symmetric, one scale per column (embedding dimension):
    the looked-up rows are dequantized after the Gather, so the table is never expanded to float, and
    the file holds ``dim`` scales, not one per vocabulary entry."""

    def __init__(self, emb: nn.Embedding, bits: int = 8) -> None:
        super().__init__()
        self.emb = emb
        spec = Q.calibrate(emb.weight.detach(), QuantSpec(bits=bits, signed=True, symmetric=True,
                                                          granularity="channel", axis=1))
        self._w = spec
        self.register_buffer("w_scale", spec.scale.clone())
        self.register_buffer("w_zp", spec.zero_point.to(torch.int8).clone())
        self.register_buffer("qweight", Q.quantize(emb.weight.detach(), spec).to(torch.int8))
        with torch.no_grad():
            emb.weight.copy_(Q.dequantize(self.qweight, spec))

    @property
    def w_spec(self) -> QuantSpec:
        return self._w.with_params(self.w_scale, self.w_zp.to(torch.int32))

    def specs(self) -> dict[str, QuantSpec]:
        return {"weight": self.w_spec}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _GatherColumns.apply(ids, self.qweight, self.w_scale, self.w_zp)
        return self.emb(ids)

    def extra_repr(self) -> str:
        return f"weight={self.w_spec.describe()}"
