"""The integer reference: executes a lowered graph with integer arithmetic only, as the generated C
and the TFLite runtimes do."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ...primitives.fixedpoint import add_int8, avg_round, requantize
from .graph import Graph, Op, Tensor, act_range


def run_int(graph: Graph, x: np.ndarray) -> np.ndarray:
    """Execute the graph on int8 NHWC inputs (batch first) with integer arithmetic only.

    Convolutions accumulate exactly in float64 (every partial sum of int8 products here is far below
    2**53), requantization is the fixed-point multiply and shift of ``primitives.fixedpoint``.
    """
    vals: dict[str, np.ndarray] = {graph.input: np.asarray(x, dtype=np.int8)}
    for op in graph.ops:
        vals[op.output] = _run_op(op, graph.tensors, vals)
    return vals[graph.output]


def _to_nchw(a: np.ndarray, zp: int) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64) - zp).permute(0, 3, 1, 2)


def _run_op(op: Op, tensors: dict[str, Tensor], vals: dict[str, np.ndarray]) -> np.ndarray:
    a = vals[op.inputs[0]]
    qi, qo = tensors[op.inputs[0]].q, tensors[op.output].q
    n = a.shape[0]
    out_shape = (n, *tensors[op.output].shape)
    lo, hi = act_range(op, qo)
    if op.kind in ("conv", "dwconv"):
        w = torch.from_numpy(op.qweight.astype(np.float64))
        w = w.permute(0, 3, 1, 2) if op.kind == "conv" else w.permute(3, 0, 1, 2)
        acc = F.conv2d(_to_nchw(a, qi.zero_point), w, stride=op.stride, padding=op.pad,
                       groups=op.groups if op.kind == "conv" else a.shape[-1])
        acc = acc.permute(0, 2, 3, 1).numpy().astype(np.int64) + op.qbias
        return requantize(acc, op.multiplier, op.shift, qo.zero_point, lo, hi)
    if op.kind == "fc":
        xf = a.reshape(n, -1).astype(np.float64) - qi.zero_point
        acc = (xf @ op.qweight.astype(np.float64).T).astype(np.int64) + op.qbias
        return requantize(acc, op.multiplier, op.shift, qo.zero_point, lo, hi)
    if op.kind == "maxpool":  # padding never wins the max (torch pads with -inf)
        y = F.max_pool2d(_to_nchw(a, 0), op.kernel, op.stride, padding=op.pad)
        return y.permute(0, 2, 3, 1).numpy().astype(np.int8)
    if op.kind == "avgpool":
        total = F.avg_pool2d(_to_nchw(a, 0), op.kernel, op.stride, divisor_override=1)
        avg = avg_round(total.permute(0, 2, 3, 1).numpy().astype(np.int64), op.kernel[0] * op.kernel[1])
        return np.clip(avg, -128, 127).astype(np.int8)
    if op.kind == "relu":
        return np.maximum(a, np.int8(qi.zero_point)).astype(np.int8)
    if op.kind == "reshape":
        return a.reshape(out_shape)
    if op.kind == "add":
        b = vals[op.inputs[1]]
        qb = tensors[op.inputs[1]].q
        params = tuple(zip(op.multiplier.tolist(), op.shift.tolist()))
        return add_int8(a, qi.zero_point, b, qb.zero_point, params, qo.zero_point, lo, hi)
    if op.kind == "mul":  # a channel gate (N, 1, 1, C) broadcasts over the pixels
        b = vals[op.inputs[1]].astype(np.int64) - tensors[op.inputs[1]].q.zero_point
        prod = (a.astype(np.int64) - qi.zero_point) * b
        return requantize(prod, op.multiplier[0], op.shift[0], qo.zero_point, lo, hi)
    if op.kind == "lut":
        return op.table[a.astype(np.int64) + 128]
    if op.kind == "rescale":
        return requantize(a.astype(np.int64) - qi.zero_point, op.multiplier[0], op.shift[0], qo.zero_point)
    if op.kind == "gather":
        return a[..., op.index]
    if op.kind == "concat":  # every input is on the output's grid: the codes are copied
        return np.concatenate([vals[i] for i in op.inputs], axis=-1)
    raise AssertionError(op.kind)
