"""The integer parameters of a lowered graph: activation grids, weight codes, bias codes, fixed-point
multipliers and activation tables.

The multipliers are derived from float32 scales exactly as TFLite derives them, so the integer
reference, the generated C and both TFLite runtimes compute the same integers.

Scales come from the per-tensor quantization spec (``primitives.quant.QuantSpec``) that the quantize
stage attached to each ``QuantLayer``: its weight codes and per-channel scales, its int32 bias codes,
its input and output activation specs (uint8 affine specs become int8 with the zero point moved by
-128: the same real grid). ``qparams`` may give (scale, zero point) for further tensors by fx node
name. Any activation still without a spec (the float output of the last layer, a model that was
never quantized) is calibrated here with a min-max observer on calibration data, and weights without
a spec are quantized per channel, symmetric (shared weights, a cluster stage's few values, with one
scale per tensor so they stay few int8 codes); the graph's ``notes`` say which.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...errors import RecipeError
from ...primitives.fixedpoint import add_params, quantize_multiplier
from .graph import Graph, Op, QParams, Tensor
from .trace import calibrate


def affine_qparams(lo: float, hi: float) -> QParams:
    """int8 affine parameters covering [lo, hi] and zero exactly."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) or 1.0
    zp = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return QParams(scale, zp)


def shared_values(w: np.ndarray) -> bool:
    """Whether a float weight takes few distinct values (weight sharing: at most 256, each used by 8
    weights on average), so that one scale for the tensor keeps them few distinct int8 codes."""
    n = len(np.unique(w))
    return n <= 256 and 8 * n <= w.size


def weight_qparams(w: np.ndarray, per_tensor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel (or one per-tensor scale repeated per channel) symmetric int8 (range +-127):
    float32 scales and int8 values; axis 0 is the channel."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    scale = (np.abs(flat).max(axis=1) / 127.0).astype(np.float32)
    if per_tensor:
        scale[:] = scale.max()
    scale[scale == 0] = 1.0
    q = np.clip(np.round(flat / scale[:, None].astype(np.float64)), -127, 127).astype(np.int8)
    return scale, q.reshape(w.shape)


def act_qparams(spec) -> QParams:
    """An 8-bit per-tensor activation spec as int8 parameters (uint8: zero point - 128, same grid)."""
    scale = float(spec.scale.reshape(-1)[0])
    zp = int(spec.zero_point.reshape(-1)[0])
    return QParams(scale, zp - 128 if not spec.signed else zp)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


#: the float function each table holds, in float64
LUT_FLOAT = {"Sigmoid": _sigmoid, "Hardsigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
             "Hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, "SiLU": lambda x: x * _sigmoid(x)}
#: int8 grids of outputs in [0, 1]: a sigmoid's in steps of 1/256 (TFLite's for LOGISTIC; it never reaches
#: 1), a hardsigmoid's in steps of 1/255 (1 exactly: x >= 3)
UNIT_GRIDS = {"Sigmoid": (1.0 / 256.0, -128), "Hardsigmoid": (1.0 / 255.0, -128)}


def lut_table(fn: str, qi: QParams, qo: QParams) -> np.ndarray:
    """int8 (256,): the output code of activation ``fn`` for each input code -128 ... 127, computed in
    float64 from the two grids and rounded half away from zero."""
    x = (np.arange(-128, 128, dtype=np.float64) - qi.zero_point) * qi.scale
    v = LUT_FLOAT[fn](x) / qo.scale
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + qo.zero_point, -128, 127).astype(np.int8)


#: ops that write their output on any grid (they requantize)
_REQUANTIZING = ("conv", "dwconv", "fc", "add", "mul", "lut")


def concat_grids(ops: list[Op], tensors: dict[str, Tensor], out: str, src_of: dict[str, str],
                  same_q: dict[str, str], preset: dict[str, QParams], fixed: dict[str, QParams]) -> list[Op]:
    """Every input of a concatenation on the concatenation's grid (its own range, or its spec), so that
    it copies codes (TFLite's int8 CONCATENATION requires this as well): an input that a requantizing op
    writes for the concatenation alone is written on that grid directly; any other (the concatenation
    before it, a pool, a tensor other layers read) is requantized onto it by a ``rescale`` op."""
    producer = {op.output: op for op in ops}
    readers: dict[str, int] = {}
    for op in ops:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    result = []
    for op in ops:
        if op.kind == "concat":
            for k, i in enumerate(op.inputs):
                p = producer.get(i)
                if p is not None and p.kind in _REQUANTIZING and readers[i] == 1 and i != out and i not in fixed:
                    same_q[i] = op.output
                    preset.pop(i, None)
                    continue
                t = Tensor(f"{op.output}/in{k}", tensors[i].shape, chw=tensors[i].chw)
                tensors[t.name], src_of[t.name], same_q[t.name] = t, src_of[i], op.output
                result.append(Op("rescale", f"{op.layer}/in{k}", [i], t.name))
                op.inputs[k] = t.name
        result.append(op)
    return result


def quantize_graph(graph: Graph, gm, calib, qparams: Mapping[str, tuple[float, int]], src_of: dict[str, str],
              same_q: dict[str, str], preset: dict[str, QParams], fmt: str, fixed: dict[str, QParams]) -> None:
    for t in list(preset):  # a spec on a pass-through tensor belongs to the tensor it passes through
        root = t
        while root in same_q:
            root = same_q[root]
        preset.setdefault(root, preset[t])
    need = {src_of[t] for t in graph.tensors
            if t not in same_q and t not in preset and t not in fixed and src_of[t] not in qparams}
    if need and preset:
        graph.notes.append("calibrated (min-max, not in the quantization spec): " + ", ".join(sorted(need)))
    ranges: dict[str, tuple[float, float]] = {}
    if need:
        if calib is None:
            raise RecipeError(f"export {fmt}: calibration data is required for activations "
                              f"{', '.join(sorted(need))}")
        ranges = calibrate(gm, calib, need)
    for name, t in graph.tensors.items():
        if name in same_q:
            continue
        src = src_of[name]
        if name in fixed:
            t.q = fixed[name]
        elif name in preset:
            t.q = preset[name]
        elif src in qparams:
            s, z = qparams[src]
            t.q = QParams(s, z)
        else:
            t.q = affine_qparams(*ranges[src])
    for op in graph.ops:  # pools, relus and reshapes keep their input's parameters
        if op.output in same_q:
            graph.tensors[op.output].q = graph.tensors[same_q[op.output]].q
    for op in graph.ops:
        _quantize_op(op, graph.tensors)


def _quantize_op(op: Op, tensors: dict[str, Tensor]) -> None:
    qi = tensors[op.inputs[0]].q
    qo = tensors[op.output].q
    if op.kind in ("conv", "dwconv", "fc"):
        if op.qweight is None:  # shared weights (cluster stage) get one scale: few distinct codes
            axis_first = op.weight if op.kind != "dwconv" else np.moveaxis(op.weight, 3, 0)
            scale, q = weight_qparams(axis_first, per_tensor=shared_values(op.weight))
            op.wscale = scale
            op.qweight = q if op.kind != "dwconv" else np.ascontiguousarray(np.moveaxis(q, 0, 3))
        scale = op.wscale
        bias_scale = (np.float32(qi.scale) * scale.astype(np.float32)).astype(np.float32)
        if op.qbias is None or op.bias_scale is None or not np.array_equal(op.bias_scale, bias_scale):
            op.qbias = np.clip(np.round(op.bias.astype(np.float64) / bias_scale.astype(np.float64)),
                               -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        op.bias_scale = bias_scale
        ms = [quantize_multiplier(float(qi.scale) * float(s) / float(qo.scale)) for s in scale]
        op.multiplier = np.array([m for m, _ in ms], dtype=np.int64)
        op.shift = np.array([s for _, s in ms], dtype=np.int64)
    elif op.kind == "add":
        qb = tensors[op.inputs[1]].q
        ps = add_params(qi.scale, qb.scale, qo.scale)
        op.multiplier = np.array([m for m, _ in ps], dtype=np.int64)
        op.shift = np.array([s for _, s in ps], dtype=np.int64)
    elif op.kind == "mul":  # (a - za) * (b - zb) * s_a * s_b / s_out, as TFLite's int8 MUL
        m, s = quantize_multiplier(float(qi.scale) * float(tensors[op.inputs[1]].q.scale) / float(qo.scale))
        op.multiplier, op.shift = np.array([m], dtype=np.int64), np.array([s], dtype=np.int64)
    elif op.kind == "lut":
        op.table = lut_table(op.fn, qi, qo)
    elif op.kind == "rescale":  # (a - za) * s_a / s_out, as TFLite's int8 -> int8 QUANTIZE
        m, s = quantize_multiplier(float(qi.scale) / float(qo.scale))
        op.multiplier, op.shift = np.array([m], dtype=np.int64), np.array([s], dtype=np.int64)
