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

from . import onnxops as ops
from . import quant as Q
from .observers import Observer
from .qembedding import QuantEmbedding
from .quant import QuantSpec


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
        self.guard_input = False  # the input comes from a float op: clamp before quantizing (see ops.Clip)
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
            return ops.QDQ.apply(x, getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp"), spec.qmin, spec.qmax)
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
            wt = ops.const(self.qweight.t().contiguous())
            return ops.DynamicMatMul.apply(x, wt, ops.compact_scale(self.w_scale), ops.scalar_zero_point(self.w_zp),
                                           ops.const(bias))
        if self.mode == "weight_only" and spec.is_float:
            w = ops.Half.apply(self.qweight)
            return self._compute(x, w, self.layer.bias)
        if self.mode == "weight_only" and self.kind == "linear" and spec.granularity != "tensor" \
                and nbits_block_ok(self.layer.weight.shape[1], spec.group_size) and spec.bits in (4, 8):
            return self._export_nbits(x, spec, ops.const(bias))
        if self.mode == "dynamic":  # conv: ConvInteger on uint8 inputs quantized at run time
            l = self.layer
            # ONNX Runtime's ConvInteger takes one weight zero point; symmetric specs have all zeros
            zp = ops.const(self.w_zp.reshape(-1)[:1].reshape(())) if not bool(self.w_zp.any()) else self.w_zp
            return ops.DynamicConv.apply(x, self.qweight, self.w_scale, zp, ops.const(bias), list(l.stride),
                                         list(l.padding), list(l.dilation), l.groups)
        if self.mode in ("static", "qat"):
            s_in = self.in_spec
            if self.guard_input and s_in is not None:
                lo = (s_in.qmin - s_in.zero_point.float()) * s_in.scale
                hi = (s_in.qmax - s_in.zero_point.float()) * s_in.scale
                x = ops.Clip.apply(x, ops.const(lo.reshape(())), ops.const(hi.reshape(())))
            x = self._quant_act(x, "in")
        w = self._export_weight(spec)
        b = self.layer.bias
        bs = self.bias_spec
        if b is not None and bs is not None:
            bq = ops.const(Q.quantize(b.detach(), bs).to(torch.int32))
            b = ops.DQ.apply(bq, ops.const(bs.scale), ops.const(bs.zero_point), 0)
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
            q = ops.const(q.t().contiguous())
            axis = 1 - axis if spec.granularity == "channel" else 0
        if zp.dtype != q.dtype:
            zp = ops.const(zp.to(q.dtype))
        if spec.granularity == "tensor":
            return ops.DQ.apply(q, scale, zp, 0)
        return ops.DQ.apply(q, scale, zp, axis)

    def _export_nbits(self, x: torch.Tensor, spec: QuantSpec, bias: torch.Tensor) -> torch.Tensor:
        n, k = self.layer.out_features, self.layer.in_features
        bits = 4 if spec.bits <= 4 else 8
        block = spec.group_size if spec.granularity == "group" else k  # per-channel: one block spans K
        scales = ops.const(self.w_scale.reshape(-1))
        zps = self.w_zp.reshape(n, -1)
        offset = 2 ** (bits - 1) if spec.signed else 0
        packed = ops.const(ops.pack_nbits(self.qweight.to(torch.int32) + offset, bits, block))
        zp_packed = ops.const(ops.pack_zero_points(zps.to(torch.int32) + offset, bits))
        return ops.MatMulNBits.apply(x, ops.const(self.layer.weight), packed, scales, zp_packed, bias, k, n, bits, block)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, weight={self.w_spec.describe()}"


class ActQuant(nn.Module):
    """Quantizes one activation tensor that no layer owns: the output of a residual add (after its
    ReLU) or of an average pool. In ONNX it is a QuantizeLinear / DequantizeLinear pair, so ONNX
    Runtime runs the op before it as QLinearAdd / QLinearGlobalAveragePool.

    Until ``set_spec`` it passes values through and, with an ``observer``, records their range.
    """

    def __init__(self, spec: QuantSpec, observer: Observer | None = None, kind: str = "add") -> None:
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
            return ops.QDQ.apply(x, self.scale, self.zp, spec.qmin, spec.qmax)
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
