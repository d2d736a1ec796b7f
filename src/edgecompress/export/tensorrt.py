"""TensorRT-ready ONNX: the explicitly quantized (QuantizeLinear / DequantizeLinear) form TensorRT builds
int8 engines from, written from our static int8 model without recalibrating anything.

It starts from our int8 QDQ export (every scale and zero point there is a ``QuantSpec``'s) and rewrites
it to TensorRT's rules:

- activations are symmetric int8 with zero point 0. Our static activations are uint8 affine (scale
  ``s``, zero point ``z``: the grid spans ``[-z*s, (255-z)*s]``); ``symmetric_int8`` gives the int8
  spec that covers the same range, scale ``max(z, 255-z) * s / 127``. For a ReLU output (``z = 0``)
  that is about twice the step: the negative half of int8 is unused, the cost of TensorRT having no
  uint8. ``bench.runtimes`` measures what the conversion costs in agreement;
- weights are float initializers (our integer codes times their scales, so QuantizeLinear gives the
  codes back exactly) followed by QuantizeLinear and DequantizeLinear with our per-channel scales on
  the output-channel axis (Conv: 0; Gemm with transB: 0; MatMul: 1);
- biases are float (the int32 bias dequantized): TensorRT quantizes a bias itself from the input and
  weight scales, which are the ones our int32 bias was quantized with;
- every residual Add reads two DequantizeLinear outputs, so TensorRT fuses it into int8.

``violations(path)`` checks those rules on a file; the tests run it on every built-in conv task.
"""
from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import args
from ..errors import RecipeError
from ..primitives.qlayer import int8_refusal, quant_layers
from ..primitives.quant import QuantSpec
from ..files import write_atomic

QDQ = ("QuantizeLinear", "DequantizeLinear")
#: ops TensorRT runs in int8 when their data and weight inputs come from DequantizeLinear
WEIGHTED = ("Conv", "Gemm", "MatMul")


def symmetric_int8(spec: QuantSpec) -> QuantSpec:
    """The int8 spec with zero point 0 whose range covers ``spec``'s grid (``spec`` itself when it is
    already one). Per-tensor and per-channel specs keep their granularity and axis."""
    zp = spec.zero_point
    if spec.signed and spec.bits == 8 and not bool(zp.any()):
        return spec
    lo = (spec.qmin - zp.float()) * spec.scale
    hi = (spec.qmax - zp.float()) * spec.scale
    amax = torch.maximum(-lo, hi)
    out = QuantSpec(bits=8, signed=True, symmetric=True, granularity=spec.granularity, axis=spec.axis)
    return out.with_params((amax / 127.0).to(torch.float32), torch.zeros_like(zp, dtype=torch.int32))


def check_model(model: nn.Module) -> None:
    """Refuse, in one line naming the layer and its spec, what TensorRT's int8 Q/DQ form cannot hold."""
    if not quant_layers(model):
        raise RecipeError("export onnx-tensorrt needs a quantize stage with mode static or qat; "
                          "the model has no quantized layer")
    line = int8_refusal(model, "onnx-tensorrt", "TensorRT",
                        "TensorRT's int8 form needs mode static or qat (int8 weights and activations)",
                        "TensorRT takes int8 weights with zero point 0, per-tensor or per-channel (symmetric: "
                        "true, granularity: channel)")
    if line is not None:
        raise RecipeError(line)


def export_tensorrt(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write the TensorRT-ready int8 ONNX file of a static (or QAT) int8 model; returns the path."""
    import onnx

    from .onnx_quant import drop_unused_initializers, export_quantized

    args.exporter("export_tensorrt", model, example_input, path)
    check_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.load(str(export_quantized(model, example_input, Path(tmp) / "int8.onnx")))
    _rewrite(proto)
    drop_unused_initializers(proto)

    def write(tmp: Path) -> None:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))

    return write_atomic(path, write)


def _axis(n) -> int:
    return next((a.i for a in n.attribute if a.name == "axis"), 1)


def _dequantize(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """Float values of integer codes, in float32 as ONNX's DequantizeLinear computes them."""
    if scale.ndim == 1 and codes.ndim > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((codes.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * scale.astype(np.float32))


def _rewrite(proto) -> None:
    """Our int8 QDQ graph -> TensorRT's rules (see the module docstring), in place."""
    from onnx import helper, numpy_helper

    g = proto.graph
    vals = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    alias: dict[str, str] = {}
    for n in g.node:  # Identity of a shared scale or zero point
        if n.op_type == "Identity" and (n.input[0] in vals or n.input[0] in alias):
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
    readers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    layer_of = {n.output[0]: n.input[0].removesuffix(".qweight") for n in g.node
                if n.op_type == "DequantizeLinear" and n.input[0].endswith(".qweight")}
    inits: dict[str, np.ndarray] = {}
    renamed: dict[str, str] = {}
    zero = "trt.zero_point"
    inits[zero] = np.zeros((), np.int8)
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.output[0] in alias:
            continue
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(alias.get(name, name), alias.get(name, name))
        if n.op_type not in QDQ:
            keep.append(n)
            continue
        x, s = n.input[0], n.input[1]
        scale = vals[s]
        zp = vals[n.input[2]] if len(n.input) > 2 else np.zeros((), np.uint8)
        if n.op_type == "DequantizeLinear" and x in vals:  # a constant: weight codes or an int32 bias
            w = _dequantize(vals[x], scale, zp, _axis(n))
            if vals[x].dtype == np.int32:  # bias: float, TensorRT quantizes it itself
                user = readers[n.output[0]][0]
                layer = next((layer_of[i] for i in user.input if i in layer_of), x)
                renamed[n.output[0]] = f"{layer}.bias"
                inits[f"{layer}.bias"] = w
                continue
            layer = x.removesuffix(".qweight")
            wzp = f"{layer}.w_zero_point"
            inits[f"{layer}.weight"], inits[wzp] = w, np.zeros(scale.shape, np.int8)
            axis = [helper.make_attribute("axis", _axis(n))] if scale.ndim else []
            q = helper.make_node("QuantizeLinear", [f"{layer}.weight", s, wzp], [f"{layer}.weight_q"],
                                 name=f"{layer}.weight/QuantizeLinear")
            q.attribute.extend(axis)
            keep.append(q)
            n.input[0], n.input[2] = q.output[0], wzp
            keep.append(n)
            continue
        spec = QuantSpec(bits=8, signed=zp.dtype == np.int8, symmetric=False).with_params(
            torch.from_numpy(np.array(scale, np.float32)), torch.from_numpy(zp.astype(np.int32)))
        new = f"{s}.int8"
        inits[new] = symmetric_int8(spec).scale.numpy()
        n.input[1] = new
        if len(n.input) > 2:
            n.input[2] = zero
        else:
            n.input.append(zero)
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items())


def violations(path: str | os.PathLike) -> list[str]:
    """Every place where the file breaks TensorRT's explicit-quantization rules, one line each (an
    empty list: none). ``quantized`` Conv/Gemm/MatMul are those whose weight comes from
    DequantizeLinear; float ones (a layer kept float) are left alone."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    vals = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    out = []

    def op(name: str) -> str:
        return producer[name].op_type if name in producer else ("initializer" if name in vals else "input")

    def qdq_pair(name: str) -> bool:
        return op(name) == "DequantizeLinear" and op(producer[name].input[0]) == "QuantizeLinear"

    for n in proto.graph.node:
        if n.op_type in QDQ:
            zp = vals.get(n.input[2]) if len(n.input) > 2 else None
            if zp is None or zp.dtype != np.int8 or bool(zp.any()):
                out.append(f"{n.name}: zero point must be int8 0; got "
                           f"{None if zp is None else (zp.dtype, zp.reshape(-1)[:4].tolist())}")
            if n.op_type == "DequantizeLinear" and n.input[0] in vals:
                out.append(f"{n.name}: DequantizeLinear of a constant {vals[n.input[0]].dtype} tensor; weights "
                           "must be float -> QuantizeLinear -> DequantizeLinear, biases float")
        if n.op_type in WEIGHTED and op(n.input[1]) == "DequantizeLinear":
            if not qdq_pair(n.input[0]):
                out.append(f"{n.name}: {n.op_type} input is not a QuantizeLinear/DequantizeLinear pair "
                           f"(from {op(n.input[0])})")
            if not qdq_pair(n.input[1]):
                out.append(f"{n.name}: {n.op_type} weight is not a QuantizeLinear/DequantizeLinear pair")
                continue
            dq, q = producer[n.input[1]], producer[producer[n.input[1]].input[0]]
            w, scale = vals.get(q.input[0]), vals.get(dq.input[1])
            if w is None or w.dtype != np.float32:
                out.append(f"{n.name}: weight must be a float initializer")
                continue
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            want = {"Conv": 0, "Gemm": 0 if trans_b else 1, "MatMul": 1}[n.op_type]
            if scale.ndim != 1 or _axis(dq) != want or scale.shape[0] != w.shape[want]:
                out.append(f"{n.name}: weight scales must be per-channel on axis {want} ({w.shape[want]} of them); "
                           f"got shape {scale.shape} on axis {_axis(dq)}")
        if n.op_type == "Add" and any(op(i) == "DequantizeLinear" for i in n.input) \
                and not all(op(i) == "DequantizeLinear" for i in n.input):
            out.append(f"{n.name}: residual Add must read two DequantizeLinear outputs; got "
                       f"{', '.join(op(i) for i in n.input)}")
    return out
