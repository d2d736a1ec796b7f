"""The integer graph every device export shares: tensors, ops and their quantization parameters.

One list of ops in execution order over named tensors, NHWC layout (a 1-D signal of length L is a
1 x L image), int8 activations with a per-tensor affine scale and zero point, int8 weights with
per-output-channel symmetric scales, int32 biases at ``s_in * s_w`` and one fixed-point (multiplier,
shift) per output channel. Every scale is a float32 value, as stored in the files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class QParams:
    scale: float  # a float32 value
    zero_point: int

    def __post_init__(self) -> None:
        self.scale = float(np.float32(self.scale))
        self.zero_point = int(self.zero_point)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # NHWC without the batch: (H, W, C), or (F,) for a vector
    q: QParams | None = None
    chw: tuple[int, ...] | None = None  # torch's (C, H, W) order of a flattened image, for the next Linear

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Op:
    kind: str  # conv (groups >= 1), dwconv, fc, maxpool, avgpool, add, mul, concat, rescale, gather, lut, relu,
    # reshape
    layer: str
    inputs: list[str]
    output: str
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    relu: bool = False
    relu6: bool = False  # with relu: clamp at 6 as well
    weight: np.ndarray | None = None  # float32; conv OHWI (I per group), dwconv 1HWO, fc OI
    bias: np.ndarray | None = None  # float32 (O,)
    qweight: np.ndarray | None = None  # int8, same layout
    wscale: np.ndarray | None = None  # float32 (O,)
    qbias: np.ndarray | None = None  # int32 (O,)
    multiplier: np.ndarray | None = None  # int32 (O,) or (3,) for add
    shift: np.ndarray | None = None  # int (O,) or (3,) for add
    macs: int = 0
    bias_scale: np.ndarray | None = None  # float32 (O,), s_in * s_w
    groups: int = 1  # conv: input channels / weight input channels (grouped convolution)
    fn: str = ""  # lut: the torch activation it tabulates (Sigmoid, Hardsigmoid, Hardswish, SiLU)
    table: np.ndarray | None = None  # lut: int8 (256,), the output for input code -128 + i
    index: np.ndarray | None = None  # gather: output channel j is input channel index[j]


@dataclass
class Graph:
    tensors: dict[str, Tensor]
    ops: list[Op]
    input: str
    output: str
    input_layout: str = "nchw"  # how the torch input is laid out: nchw, ncl or nf
    notes: list[str] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def weight_bytes(self) -> int:
        return sum(op.qweight.size + 4 * op.qbias.size for op in self.ops if op.qweight is not None)

    def quantize_input(self, x: torch.Tensor) -> np.ndarray:
        """Float torch inputs (N, C, H, W) / (N, C, L) / (N, F) -> int8 NHWC as the graph takes them."""
        q = self.tensors[self.input].q
        a = to_nhwc(x).astype(np.float64)
        return np.clip(np.round(a / q.scale) + q.zero_point, -128, 127).astype(np.int8)

    def dequantize_output(self, y: np.ndarray) -> np.ndarray:
        q = self.tensors[self.output].q
        return (y.astype(np.float32) - q.zero_point) * np.float32(q.scale)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    a = x.detach().float().numpy()
    if a.ndim == 4:
        return a.transpose(0, 2, 3, 1)
    if a.ndim == 3:
        return a.transpose(0, 2, 1)[:, None]
    return a


def act_range(op: Op, q: QParams) -> tuple[int, int]:
    """Output clamp of an op: a fused ReLU clamps at the zero point, ReLU6 also at quantize(6)
    (computed as TFLite does: float32 division, rounding half away from zero)."""
    if not op.relu:
        return -128, 127
    hi = 127
    if op.relu6:
        v = float(np.float32(6.0) / np.float32(q.scale))
        hi = min(127, q.zero_point + int(np.floor(v + 0.5)))
    return max(-128, q.zero_point), hi
