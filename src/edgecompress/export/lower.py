"""Lower a PyTorch model to a small integer graph that every device export shares.

The graph is what the C export writes, what the TFLite export serialises and what the integer
reference (``run_int``) executes: one list of ops in execution order over named tensors, NHWC layout
(a 1-D signal of length L is a 1 x L image), int8 activations with a per-tensor affine scale and zero
point, int8 weights with per-output-channel symmetric scales, int32 biases at ``s_in * s_w`` and one
fixed-point (multiplier, shift) per output channel. Every scale is a float32 value, as stored in the
files, and the multipliers are derived from those float32 values exactly as TFLite derives them, so
the integer reference, the generated C and both TFLite runtimes compute the same integers.

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

import contextlib
import copy
import io
import logging
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import RecipeError
from ..primitives.fixedpoint import add_int8, add_params, avg_round, quantize_multiplier, requantize

log = logging.getLogger(__name__)

SUPPORTED = ("Conv1d, Conv2d (any groups: dense, grouped, depthwise), Linear, ReLU, MaxPool1d/2d, AvgPool1d/2d, "
             "AdaptiveAvgPool to 1, Flatten, residual add, channel concatenation, chunk/split along the channels, "
             "channel shuffle, BatchNorm (after a conv: folded; "
             "elsewhere: a per-channel affine), Sigmoid, Hardsigmoid, Hardswish, SiLU, multiply by a same-shape "
             "tensor or a channel gate (squeeze-excitation), Dropout, Identity")
ALIGN = 4


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


def _nhwc_shape(shape: Iterable[int]) -> tuple[int, ...]:
    s = tuple(int(d) for d in shape)[1:]
    if len(s) == 3:
        return (s[1], s[2], s[0])
    if len(s) == 2:
        return (1, s[1], s[0])
    return s


def _pair(v, one_d: bool, fill: int = 1) -> tuple[int, int]:
    """A torch size argument as (h, w); a 1-D layer is 1 x L, with ``fill`` as its height."""
    if isinstance(v, (tuple, list)):
        v = tuple(int(i) for i in v)
        return (fill, v[0]) if one_d else (v[0], v[1] if len(v) > 1 else v[0])
    return (fill, int(v)) if one_d else (int(v), int(v))


def unsupported(fmt: str, layer: str, what: str, why: str = "") -> RecipeError:
    reason = f" ({why})" if why else ""
    return RecipeError(f"export {fmt}: layer {layer!r} ({what}) is not supported{reason}; "
                       f"supported: {SUPPORTED}")


def calib_batches(task, batches: int = 8) -> list[torch.Tensor]:
    """Inputs of the task's calibration data (validation split when it has one), never test data."""
    import itertools

    return [x for x, _ in itertools.islice(task.calib_data, batches)]


def lower_task(model: nn.Module, task, fmt: str, quantize: bool = True) -> Graph:
    """``lower`` with the task's example input and calibration data."""
    return lower(model, task.example_input, calib=calib_batches(task) if quantize else None, fmt=fmt,
                 quantize=quantize)


# ---- quantization parameters -----------------------------------------------------------------

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


# ---- tracing -----------------------------------------------------------------------------------

_RELU_FNS = {F.relu, torch.relu}
_ADD_FNS = {operator.add, torch.add}
_MUL_FNS = {operator.mul, torch.mul}
_CAT_FNS = {torch.cat, torch.concat}
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: activations that run as a 256-entry int8 table: torch module or function -> its name
_LUT_MODULES = {nn.Sigmoid: "Sigmoid", nn.Hardsigmoid: "Hardsigmoid", nn.Hardswish: "Hardswish", nn.SiLU: "SiLU"}
_LUT_FNS = {torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", F.hardsigmoid: "Hardsigmoid", F.hardswish: "Hardswish",
            F.silu: "SiLU"}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


#: the float function each table holds, in float64
LUT_FLOAT = {"Sigmoid": _sigmoid, "Hardsigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
             "Hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0, "SiLU": lambda x: x * _sigmoid(x)}
#: int8 grids of outputs in [0, 1]: a sigmoid's in steps of 1/256 (TFLite's for LOGISTIC; it never reaches
#: 1), a hardsigmoid's in steps of 1/255 (1 exactly: x >= 3)
UNIT_GRIDS = {"Sigmoid": (1.0 / 256.0, -128), "Hardsigmoid": (1.0 / 255.0, -128)}
_ALIAS_MODULES = (nn.Dropout, nn.Identity, nn.Dropout1d, nn.Dropout2d)


def _is_relu6(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU6)
    return node.op == "call_function" and node.target is F.relu6


def _quant_layer_cls():
    try:
        from ..primitives.qlayer import QuantLayer
    except ImportError:  # quantization is optional for the device exports
        return None
    return QuantLayer


def _act_quant_cls():
    from ..primitives.qlayer import ActQuant
    return ActQuant


def _is_relu(gm, node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _op_name(gm, node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()"


def _lut_fn(gm, node) -> str | None:
    """The activation ``node`` computes if it is one that runs as a table (Sigmoid, Hardsigmoid, ...)."""
    if node.op == "call_module":
        return _LUT_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return _LUT_FNS.get(node.target)
    return "Sigmoid" if node.op == "call_method" and node.target == "sigmoid" else None


def lut_table(fn: str, qi: QParams, qo: QParams) -> np.ndarray:
    """int8 (256,): the output code of activation ``fn`` for each input code -128 ... 127, computed in
    float64 from the two grids and rounded half away from zero."""
    x = (np.arange(-128, 128, dtype=np.float64) - qi.zero_point) * qi.scale
    v = LUT_FLOAT[fn](x) / qo.scale
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + qo.zero_point, -128, 127).astype(np.int8)


def _layer(node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def trace(model: nn.Module, example: torch.Tensor, fmt: str):
    """fx graph module with batch norm folded into the convs and shapes propagated."""
    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse
    from torch.fx.passes.shape_prop import ShapeProp

    from torch.fx import GraphModule, Tracer

    model = copy.deepcopy(model).eval()
    ql = _quant_layer_cls()

    class _Tracer(Tracer):
        def is_leaf_module(self, m, qualname):
            return (ql is not None and isinstance(m, (ql, _act_quant_cls()))) or super().is_leaf_module(m, qualname)

    quantized = ql is not None and any(isinstance(m, ql) for m in model.modules())
    try:
        if quantized:  # QuantLayers stay leaves (their batch norm is folded already); a conv the
            # quantize stage kept float (keep_slow_float) still has its batch norm: folded here
            gm = fuse(GraphModule(model, _Tracer().trace(model)), inplace=True, no_trace=True)
        else:
            gm = fuse(symbolic_trace(model))  # batch norm folded into the preceding conv
        x = example[:1]
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before it raises
            ShapeProp(gm).propagate(x if not x.is_floating_point() else x.float())
    except Exception as e:  # fx raises many kinds of errors for untraceable code
        raise RecipeError(f"export {fmt}: the model cannot be traced by torch.fx: "
                          f"{str(e).splitlines()[0][:200]}") from None
    return gm


def calibrate(gm, data: Iterable[torch.Tensor], names: set[str]) -> dict[str, tuple[float, float]]:
    """Min-max of the outputs of the named fx nodes over the calibration batches."""
    from torch.fx import Interpreter

    ranges: dict[str, list[float]] = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                lo, hi = float(out.min()), float(out.max())
                r = ranges.setdefault(n.name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            return out

    with torch.no_grad():
        for x in data:
            Recorder(gm).run(x.float())
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def lower(model: nn.Module, example: torch.Tensor, *, calib: Iterable[torch.Tensor] | None = None,
          qparams: Mapping[str, tuple[float, int]] | None = None, fmt: str = "c",
          quantize: bool = True) -> Graph:
    """The integer graph of ``model``.

    ``qparams`` gives (scale, zero point) per activation tensor by fx node name; the others are
    calibrated (min-max) on ``calib`` batches. With ``quantize=False`` only the float graph is built
    (for fp32 exports). Raises RecipeError naming the first layer the exports cannot handle.
    """
    gm = trace(model, example, fmt)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise RecipeError(f"export {fmt}: the model must take one input tensor; got {len(placeholders)}")
    users = {n: list(n.users) for n in nodes}
    tensors: dict[str, Tensor] = {}
    ops: list[Op] = []
    name_of: dict = {}  # fx node -> graph tensor name
    src_of: dict[str, str] = {}  # graph tensor -> fx node whose output range it has
    same_q: dict[str, str] = {}  # graph tensor -> tensor whose quantization it must share

    def shape(n) -> tuple[int, ...]:
        return tuple(n.meta["tensor_meta"].shape)

    def new_tensor(n, chw=None) -> str:
        t = Tensor(n.name, _nhwc_shape(shape(n)), chw=chw)
        tensors[t.name] = t
        name_of[n] = t.name
        src_of[t.name] = n.name
        return t.name

    def fused_relu(n):
        """The relu (or relu6) that follows ``n`` as its only user, if any."""
        us = users[n]
        if len(us) == 1 and (_is_relu(gm, us[0]) or _is_relu6(gm, us[0])):
            return us[0]
        return None

    def fuse_act(n, op: Op) -> None:
        relu = fused_relu(n)
        if relu is not None:
            op.relu, op.relu6 = True, _is_relu6(gm, relu)
            skip.add(relu)
            op.output = new_tensor(relu)
            name_of[n] = op.output
        else:
            op.output = new_tensor(n)

    QL = _quant_layer_cls()
    preset: dict[str, QParams] = {}  # activation parameters from the quantization spec
    fixed: dict[str, QParams] = {}  # grids an op requires (a sigmoid's output: [0, 1] in steps of 1/256)
    grouped: dict = {}  # fx node -> (tensor, groups, transposed): a channel shuffle's 5-D view
    chunks: dict = {}  # fx node -> (tensor, channels of each part): a chunk or split along the channels
    notes: list[str] = []

    x = placeholders[0]
    rank = len(shape(x))
    input_layout = {4: "nchw", 3: "ncl", 2: "nf"}.get(rank)
    if input_layout is None:
        raise RecipeError(f"export {fmt}: the input must have 2, 3 or 4 dimensions; got shape {list(shape(x))}")
    new_tensor(x)
    _refuse_kernelless(gm, nodes, fmt)
    skip: set = set()
    for n in nodes:
        if n.op in ("placeholder", "get_attr") or n in skip:
            continue
        if n.op == "output":
            out_node = n.args[0]
            if not isinstance(out_node, torch.fx.Node) or out_node not in name_of:
                raise RecipeError(f"export {fmt}: the model must return one tensor")
            continue
        layer, what = _layer(n), _op_name(gm, n)
        args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if _shape_only(n):
            continue  # size arithmetic for a view (x.size(), its items, channels // groups)
        if _channel_shuffle_step(gm, n, shape, name_of, grouped):
            continue
        if n.op == "call_method" and n.target in ("view", "reshape") and args and args[0] in grouped:
            src, groups, swapped = grouped[args[0]]
            c = tensors[src].shape[-1]
            if swapped and len(shape(n)) == 4 and shape(n)[1] == c:  # (N, C / g, g, H, W) -> (N, C, H, W)
                idx = np.arange(c).reshape(groups, c // groups).T.reshape(-1)
                ops.append(Op("gather", layer, [src], new_tensor(n), index=idx))
                same_q[ops[-1].output] = src
                continue
        if any(a in grouped for a in args):
            raise unsupported(fmt, layer, what, "of a 5-D view: only a channel shuffle (view to (N, groups, "
                                                "C / groups, H, W), transpose(1, 2), view back)")
        if (n.op == "call_method" and n.target in ("chunk", "split")) or \
                (n.op == "call_function" and n.target in (torch.chunk, torch.split)):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            if dim % len(shape(args[0])) != 1 or tensors[name_of[args[0]]].chw is not None:
                raise unsupported(fmt, layer, what, f"dim={dim}: only along the channels (dim 1) of an unflattened "
                                                    "tensor")
            chunks[n] = (name_of[args[0]], [int(m.shape[1]) for m in n.meta["tensor_meta"]])
            continue
        if n.op == "call_function" and n.target is operator.getitem and args and args[0] in chunks:
            src, sizes = chunks[args[0]]
            if not isinstance(n.args[1], int):
                raise unsupported(fmt, layer, what, "only one part of a chunk or split at a time")
            k = n.args[1]
            start = sum(sizes[:k])
            ops.append(Op("gather", layer, [src], new_tensor(n), index=np.arange(start, start + sizes[k])))
            same_q[ops[-1].output] = src
            continue
        if mod is not None and isinstance(mod, _ALIAS_MODULES):
            name_of[n] = name_of[args[0]]
            continue
        if mod is not None and QL is not None and isinstance(mod, _act_quant_cls()):
            # the quantize stage's activation quantizer: its spec is the tensor's after an add, a multiply
            # or a concatenation (an average pool's output shares its input's, as the integer kernels here
            # do; a sigmoid's is [0, 1] in steps of 1/256)
            name_of[n] = name_of[args[0]]
            if quantize and mod.spec is not None and (mod.kind == "add" or _is_mul(gm, args[0])
                                                      or _is_cat(gm, args[0])):
                preset[name_of[n]] = _act_qparams(mod.spec)
            continue
        if mod is not None and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            ops.append(_weighted(mod, layer, what, tensors[name_of[args[0]]], fmt))
            fuse_act(n, ops[-1])
            _count_macs(ops[-1], tensors)
            continue
        if mod is not None and QL is not None and isinstance(mod, QL):
            t_in = tensors[name_of[args[0]]]
            op = _from_quant_layer(mod, layer, t_in, fmt, preset, notes, quantize)
            ops.append(op)
            if mod.act is not None:
                op.relu, op.relu6 = True, isinstance(mod.act, nn.ReLU6)
            fuse_act(n, op)
            if quantize and mod.out_spec is not None:
                preset[op.output] = _act_qparams(mod.out_spec)
            _count_macs(op, tensors)
            continue
        if mod is not None and isinstance(mod, _BN_MODULES):
            if len(shape(args[0])) < 3:
                raise unsupported(fmt, layer, what, "only on an image or a signal: (N, C, H, W) or (N, C, L)")
            ops.append(_affine(mod, layer, what, tensors[name_of[args[0]]], fmt))
            fuse_act(n, ops[-1])
            _count_macs(ops[-1], tensors)
            continue
        if _lut_fn(gm, n) is not None:
            ops.append(Op("lut", layer, [name_of[args[0]]], new_tensor(n), fn=_lut_fn(gm, n)))
            if ops[-1].fn in UNIT_GRIDS:
                fixed[ops[-1].output] = QParams(*UNIT_GRIDS[ops[-1].fn])
            continue
        if _is_mul(gm, n) and len(args) == 2:
            a, b = args
            if _is_gate(shape(a), shape(b)):
                a, b = b, a
            if shape(a) != shape(b) and not _is_gate(shape(b), shape(a)):
                raise unsupported(fmt, layer, what, f"shapes {list(shape(a))} and {list(shape(b))}: only a tensor of "
                                                    "the same shape or a channel gate (N, C, 1, 1)")
            ops.append(Op("mul", layer, [name_of[a], name_of[b]], ""))
            fuse_act(n, ops[-1])
            continue
        if _is_cat(gm, n):
            parts = n.args[0] if n.args else n.kwargs.get("tensors")
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            rank = len(shape(n))
            if not isinstance(parts, (list, tuple)) or not all(isinstance(p, torch.fx.Node) and p in name_of
                                                               for p in parts):
                raise unsupported(fmt, layer, what, "only of a list of tensors")
            if dim % rank != 1:
                raise unsupported(fmt, layer, what, f"dim={dim}: only along the channels (dim 1)")
            ins = [name_of[p] for p in parts]
            if any(tensors[i].chw is not None for i in ins):
                raise unsupported(fmt, layer, what, "of a flattened image")
            ops.append(Op("concat", layer, ins, new_tensor(n)))
            continue
        if mod is not None and isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            one_d = isinstance(mod, (nn.MaxPool1d, nn.AvgPool1d))
            kind = "maxpool" if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
            pad = _pair(mod.padding, one_d, 0)
            if (any(pad) and kind == "avgpool") or getattr(mod, "ceil_mode", False) or \
                    _pair(getattr(mod, "dilation", 1), one_d) != (1, 1):
                raise unsupported(fmt, layer, what, "ceil_mode and dilation must be their defaults, and an average "
                                                    "pool unpadded")
            ks = _pair(mod.kernel_size, one_d)
            st = _pair(mod.stride if mod.stride is not None else mod.kernel_size, one_d)
            ops.append(Op(kind, layer, [name_of[args[0]]], new_tensor(n), kernel=ks, stride=st, pad=pad))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if _is_global_average(gm, n, shape) is not None:
            t_in = tensors[name_of[args[0]]]
            if not _is_global_average(gm, n, shape):
                raise unsupported(fmt, layer, what, "only output size 1 (global average pooling)")
            ks = (t_in.shape[0], t_in.shape[1])
            if len(shape(n)) == 2:  # x.mean((2, 3)) without keepdim: the pool to 1 x 1, then (N, C)
                pooled = Tensor(f"{n.name}/pool", (1, 1, t_in.shape[-1]))
                tensors[pooled.name], src_of[pooled.name], same_q[pooled.name] = pooled, n.name, t_in.name
                ops.append(Op("avgpool", layer, [t_in.name], pooled.name, kernel=ks, stride=ks))
                ops.append(Op("reshape", layer, [pooled.name], new_tensor(n)))
            else:
                ops.append(Op("avgpool", layer, [t_in.name], new_tensor(n), kernel=ks, stride=ks))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if _is_relu(gm, n):
            ops.append(Op("relu", layer, [name_of[args[0]]], new_tensor(n)))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if _is_flatten(gm, n, shape):
            t_in = tensors[name_of[args[0]]]
            chw = tuple(shape(args[0])[1:])
            ops.append(Op("reshape", layer, [t_in.name], new_tensor(n, chw=chw if len(chw) > 1 else None)))
            same_q[ops[-1].output] = t_in.name
            continue
        if _is_add(gm, n) and len(args) == 2 and shape(args[0]) == shape(args[1]):
            ops.append(Op("add", layer, [name_of[a] for a in args], ""))
            fuse_act(n, ops[-1])
            continue
        if mod is not None and isinstance(mod, nn.Flatten):
            raise unsupported(fmt, layer, what, f"start_dim={mod.start_dim}, end_dim={mod.end_dim}: only a flatten "
                                                "from dim 1 to the last")
        raise unsupported(fmt, layer, what)
    out_name = name_of[out_node]
    _check_layouts(ops, tensors, out_name, fmt)
    if quantize:
        ops = _concat_grids(ops, tensors, out_name, src_of, same_q, preset, fixed)
    graph = Graph(tensors, ops, name_of[x], out_name, input_layout, notes)
    if quantize:
        _quantize(graph, gm, calib, qparams or {}, src_of, same_q, preset, fmt, fixed)
    return graph


def _act_qparams(spec) -> QParams:
    """An 8-bit per-tensor activation spec as int8 parameters (uint8: zero point - 128, same grid)."""
    scale = float(spec.scale.reshape(-1)[0])
    zp = int(spec.zero_point.reshape(-1)[0])
    return QParams(scale, zp - 128 if not spec.signed else zp)


def _from_quant_layer(mod, layer: str, t_in: Tensor, fmt: str, preset: dict[str, QParams], notes: list[str],
                      quantize: bool) -> Op:
    """A weighted op from a quantize stage's QuantLayer: its codes, scales and activation specs."""
    inner = mod.layer
    what = f"QuantLayer({type(inner).__name__})"
    if not isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        raise unsupported(fmt, layer, what)
    op = _weighted(inner, layer, what, t_in, fmt)
    if not quantize:
        return op
    ws = mod.w_spec
    if ws.is_float or ws.bits > 8 or not ws.symmetric or not ws.signed or ws.granularity == "group":
        raise unsupported(fmt, layer, what, f"weights {ws.describe()}: the device exports take signed symmetric "
                                            "per-tensor or per-channel weights of at most 8 bits")
    for key, spec in (("input", mod.in_spec), ("output", mod.out_spec)):
        if spec is not None and (spec.bits > 8 or spec.granularity != "tensor"):
            raise unsupported(fmt, layer, what, f"{key} {spec.describe()}: activations must be 8-bit per-tensor")
    codes = mod.qweight.detach().to(torch.int64).numpy()
    n_out = codes.shape[0]
    op.qweight = _export_layout(inner, codes, t_in).astype(np.int8)
    op.wscale = np.broadcast_to(mod.w_spec.scale.detach().float().numpy().reshape(-1), (n_out,)).astype(np.float32)
    if mod.in_spec is not None:
        q = _act_qparams(mod.in_spec)
        if t_in.name in preset and preset[t_in.name] != q:
            notes.append(f"{layer}: input spec differs from its producer's output spec; the producer's is used")
        preset.setdefault(t_in.name, q)
    bs = mod.bias_spec
    if bs is not None and inner.bias is not None:
        from ..primitives import quant as Q
        op.qbias = Q.quantize(inner.bias.detach().float(), bs).to(torch.int64).numpy().astype(np.int32)
        op.bias_scale = bs.scale.detach().float().numpy().reshape(-1)
    return op


_KERNEL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.ReLU6, nn.Flatten, *_BN_MODULES,
                   *_LUT_MODULES, *_ALIAS_MODULES)


def _refuse_kernelless(gm, nodes, fmt: str) -> None:
    """Refuse the first module of a type no device kernel implements (an LSTM, attention, GELU), so the
    line names it rather than a supported layer next to it whose arguments only make sense with it."""
    ql = _quant_layer_cls()
    known = _KERNEL_MODULES + ((ql, _act_quant_cls()) if ql is not None else ())
    for n in nodes:
        if n.op == "call_module" and not isinstance(gm.get_submodule(n.target), known):
            raise unsupported(fmt, _layer(n), _op_name(gm, n))


def _is_flatten(gm, n, shape) -> bool:
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Flatten):
        m = gm.get_submodule(n.target)
        return m.start_dim == 1 and m.end_dim == -1
    if n.op == "call_function" and n.target is torch.flatten:
        return (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1
    if n.op == "call_method" and n.target in ("flatten", "view", "reshape"):
        out = shape(n)
        return len(out) == 2 and (n.target != "flatten" or (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1)
    return False


_ADAPTIVE_FNS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


def _is_global_average(gm, n, shape) -> bool | None:
    """Whether ``n`` averages each channel over all positions: AdaptiveAvgPool (module or function)
    to size 1, or ``x.mean((2, 3))`` / ``torch.mean(x, -1)`` over every spatial dim; False for an
    adaptive pool to another size; None for anything else."""
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = gm.get_submodule(n.target).output_size
    elif n.op == "call_function" and n.target in _ADAPTIVE_FNS:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
    elif (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        rank = len(shape(n.args[0]))
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims or ())}
        return True if rank > 2 and dims == set(range(2, rank)) else None
    else:
        return None
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def _is_add(gm, n) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FNS) or (n.op == "call_method" and n.target == "add")


def _shape_only(n) -> bool:
    """Whether fx node ``n`` computes only sizes (no tensor) that only views read: ``x.size()``, its
    items, ``channels // groups``."""
    if "tensor_meta" in n.meta or n.op not in ("call_method", "call_function"):
        return False
    return all(_shape_only(u) or (u.op == "call_method" and u.target in ("view", "reshape")) for u in n.users)


def _channel_shuffle_step(gm, n, shape, name_of: dict, grouped: dict) -> bool:
    """Follows a channel shuffle (``x.view(N, g, C // g, H, W)``, ``transpose(1, 2)``, ``contiguous()``)
    in ``grouped``; True when ``n`` is one of those steps (the view back to 4-D emits the op)."""
    args = [a for a in n.args if isinstance(a, torch.fx.Node)]
    if not args:
        return False
    a = args[0]
    if n.op == "call_method" and n.target in ("view", "reshape") and a in name_of and len(shape(a)) == 4 \
            and len(shape(n)) == 5:
        _, c, h, w = shape(a)
        out = shape(n)
        if out[3:] == (h, w) and out[1] * out[2] == c:
            grouped[n] = (name_of[a], out[1], False)
            return True
        return False
    if a in grouped and ((n.op == "call_function" and n.target is torch.transpose) or
                         (n.op == "call_method" and n.target == "transpose")):
        dims = sorted(int(d) % 5 for d in n.args[1:3])
        if dims == [1, 2] and not grouped[a][2]:
            grouped[n] = (*grouped[a][:2], True)
            return True
        return False
    if n.op == "call_method" and n.target == "contiguous":
        if a in grouped:
            grouped[n] = grouped[a]
        else:
            name_of[n] = name_of[a]
        return True
    return False


def _is_mul(gm, n) -> bool:
    return (n.op == "call_function" and n.target in _MUL_FNS) or (n.op == "call_method" and n.target == "mul")


def _is_cat(gm, n) -> bool:
    return n.op == "call_function" and n.target in _CAT_FNS


def _is_gate(g: tuple[int, ...], x: tuple[int, ...]) -> bool:
    """Whether shape ``g`` is a per-channel gate of shape ``x``: (N, C, 1, 1) against (N, C, H, W)."""
    return len(g) == len(x) >= 3 and g[:2] == x[:2] and all(d == 1 for d in g[2:]) and g != x


def _affine(mod: nn.Module, layer: str, what: str, t_in: Tensor, fmt: str) -> Op:
    """A batch norm that no conv precedes: y = x * w + b per channel, as a 1x1 depthwise convolution."""
    if mod.running_mean is None:
        raise unsupported(fmt, layer, what, "track_running_stats=False: it normalises with batch statistics")
    inv = 1.0 / np.sqrt(mod.running_var.detach().double().numpy() + mod.eps)
    gamma = mod.weight.detach().double().numpy() if mod.weight is not None else np.ones_like(inv)
    beta = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros_like(inv)
    w = gamma * inv
    b = beta - mod.running_mean.detach().double().numpy() * w
    return Op("dwconv", layer, [t_in.name], "", weight=w.astype(np.float32).reshape(1, 1, 1, -1),
              bias=b.astype(np.float32))


def _export_layout(mod: nn.Module, w: np.ndarray, t_in: Tensor) -> np.ndarray:
    """A torch weight in the graph's layout: Linear (O, I) with NHWC-ordered columns, conv OHWI (a grouped
    conv's I is its channels per group), depthwise 1HWO, a Conv1d as a 1 x k conv."""
    if isinstance(mod, nn.Linear):
        if t_in.chw is not None:  # torch flattened (C, H, W); the graph holds (H, W, C)
            w = w.reshape(w.shape[0], *t_in.chw).transpose(0, 2, 3, 1) if len(t_in.chw) == 3 \
                else w.reshape(w.shape[0], *t_in.chw).transpose(0, 2, 1)
        return np.ascontiguousarray(w.reshape(w.shape[0], -1))
    if isinstance(mod, nn.Conv1d):
        w = w[:, :, None, :]
    if not _depthwise(mod):
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(w.transpose(1, 2, 3, 0))


def _depthwise(mod: nn.Module) -> bool:
    return mod.groups > 1 and mod.groups == mod.in_channels


def _weighted(mod: nn.Module, layer: str, what: str, t_in: Tensor, fmt: str) -> Op:
    w = mod.weight.detach().float().numpy()
    b = mod.bias.detach().float().numpy() if mod.bias is not None else np.zeros(w.shape[0], np.float32)
    if isinstance(mod, nn.Linear):
        return Op("fc", layer, [t_in.name], "", weight=_export_layout(mod, w, t_in), bias=b)
    one_d = isinstance(mod, nn.Conv1d)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pad = (0, 0)
        elif all(k % 2 == 1 for k in mod.kernel_size):
            pad = _pair(tuple(k // 2 for k in mod.kernel_size), one_d, 0)
        else:
            raise unsupported(fmt, layer, what, "padding 'same' needs odd kernels")
    else:
        pad = _pair(mod.padding, one_d, 0)
    if _pair(mod.dilation, one_d) != (1, 1) or mod.padding_mode != "zeros":
        raise unsupported(fmt, layer, what, "dilation must be 1 and padding_mode zeros")
    if one_d:
        w = w[:, :, None, :]  # (O, I, 1, k)
    ks, st = (w.shape[2], w.shape[3]), _pair(mod.stride, one_d)
    kind = "dwconv" if _depthwise(mod) else "conv"
    return Op(kind, layer, [t_in.name], "", kernel=ks, stride=st, pad=pad, groups=1 if kind == "dwconv" else mod.groups,
              weight=_export_layout(mod, mod.weight.detach().float().numpy(), t_in), bias=b)


def _count_macs(op: Op, tensors: dict[str, Tensor]) -> None:
    out = tensors[op.output]
    if op.kind == "fc":
        op.macs = int(op.weight.size)
    elif op.kind == "conv":
        op.macs = int(out.shape[0] * out.shape[1] * op.weight.size)
    elif op.kind == "dwconv":
        op.macs = int(out.shape[0] * out.shape[1] * op.weight.size)


def _check_layouts(ops: list[Op], tensors: dict[str, Tensor], out: str, fmt: str) -> None:
    """A flattened image must feed a Linear (whose columns are reordered) or be 1 x 1 spatially."""
    consumers: dict[str, list[Op]] = {}
    for op in ops:
        for i in op.inputs:
            consumers.setdefault(i, []).append(op)
    for op in ops:
        t = tensors[op.output]
        if op.kind == "reshape" and t.chw is not None and int(np.prod(t.chw[1:])) > 1:
            bad = [c for c in consumers.get(t.name, []) if c.kind != "fc"]
            if bad or t.name == out:
                who = bad[0].layer if bad else "the model output"
                raise RecipeError(f"export {fmt}: layer {op.layer!r} (flatten) must feed a Linear layer; "
                                  f"it feeds {who}")


#: ops that write their output on any grid (they requantize)
_REQUANTIZING = ("conv", "dwconv", "fc", "add", "mul", "lut")


def _concat_grids(ops: list[Op], tensors: dict[str, Tensor], out: str, src_of: dict[str, str],
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


def _quantize(graph: Graph, gm, calib, qparams: Mapping[str, tuple[float, int]], src_of: dict[str, str],
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


# ---- integer reference ------------------------------------------------------------------------

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


def predict_int(graph: Graph, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    """int8 outputs of the integer reference for float torch inputs."""
    q = graph.quantize_input(x)
    return np.concatenate([run_int(graph, q[i:i + batch]) for i in range(0, len(q), batch)])


# ---- activation arena -------------------------------------------------------------------------

@dataclass
class ArenaPlan:
    offsets: dict[str, int]  # buffer (tensor) name -> byte offset in the arena
    buffer_of: dict[str, str]  # tensor -> the buffer it lives in (reshapes alias their input)
    sizes: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]
    peak: int  # bytes of the arena
    total: int  # sum of all activation buffers (what a no-reuse layout needs)

    def peak_at(self, graph: Graph, elem_bytes: int = 1) -> str:
        """Which tensors are live at the step where the most activation bytes are live."""
        live = [sum(self.sizes[b] for b, (s, e) in self.lifetimes.items() if s <= step <= e)
                for step in range(len(graph.ops))]
        step = int(np.argmax(live))
        parts = [f"{b} {'x'.join(map(str, graph.tensors[b].shape))} ({self.sizes[b] * elem_bytes:,} B)"
                 for b, (s, e) in self.lifetimes.items() if s <= step <= e]
        return (f"while layer {graph.ops[step].layer} runs, {live[step] * elem_bytes:,} bytes are live: "
                + " + ".join(parts))


def plan_arena(graph: Graph, align: int = ALIGN) -> ArenaPlan:
    """Offsets of every activation in one arena, reusing memory of tensors whose lifetimes do not overlap.

    Lifetimes are [producing op, last consuming op] in execution order (the input is live from the
    start, the output to the end). Buffers are placed largest first at the lowest offset free for
    their whole lifetime (the greedy-by-size scheme TFLite Micro's planner also uses).
    """
    buffer_of = {graph.input: graph.input}
    for op in graph.ops:
        buffer_of[op.output] = buffer_of[op.inputs[0]] if op.kind == "reshape" else op.output
    first: dict[str, int] = {graph.input: -1}
    last: dict[str, int] = {}
    for step, op in enumerate(graph.ops):
        for i in op.inputs:
            last[buffer_of[i]] = step
        b = buffer_of[op.output]
        first.setdefault(b, step)
        last[b] = max(last.get(b, step), step)
    last[buffer_of[graph.output]] = len(graph.ops)
    sizes = {b: graph.tensors[b].size for b in first}
    life = {b: (first[b], last.get(b, first[b])) for b in first}
    order = sorted(first, key=lambda b: (-sizes[b], first[b]))
    offsets: dict[str, int] = {}
    for b in order:
        s0, e0 = life[b]
        busy = sorted((offsets[o], offsets[o] + sizes[o]) for o in offsets
                      if not (life[o][1] < s0 or e0 < life[o][0]))
        off = 0
        for lo, hi in busy:
            if off + sizes[b] <= lo:
                break
            off = max(off, -(-hi // align) * align)
        offsets[b] = off
    peak = max((offsets[b] + sizes[b] for b in offsets), default=0)
    peak = -(-peak // align) * align
    return ArenaPlan(offsets, buffer_of, sizes, life, peak, sum(sizes.values()))
