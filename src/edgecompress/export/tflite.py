"""TFLite export without TensorFlow: the integer graph serialised with the TFLite flatbuffer schema
that ships in the ``ai-edge-litert`` package (``ai_edge_litert.schema_py_generated``).

Writing the flatbuffer directly keeps one source of truth: every scale and zero point in the file is
the graph's (hence the quantization spec's), nothing is re-calibrated or re-rounded by a converter.
int8 files are full-integer (int8 input and output, per-channel int8 weights, int32 biases); fp32
files hold the same ops with float weights. Padding that TFLite's SAME cannot express (torch pads
both sides equally) becomes an explicit PAD op before a VALID convolution.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import args
from ..errors import ArtifactError, RecipeError
from .ir import Graph, Op

FILE_ID = b"TFL3"
#: table activations with a builtin that computes the exported table exactly in int8 (LOGISTIC: every
#: input code on every grid tested). The others look their table up (CAST, ADD, GATHER): int8
#: HARD_SWISH in TFLite Micro computes in 16-bit fixed point, one step off the table for some inputs,
#: and there is no HARD_SIGMOID or SiLU builtin
_LUT_OPS: dict[str, str] = {"Sigmoid": "LOGISTIC"}


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as fb
    except ImportError:
        raise RecipeError("export tflite needs the devices extra: pip install 'edgecompress[devices]'") from None
    return fb


@dataclass
class _Builder:
    fb: object
    int8: bool

    def __post_init__(self) -> None:
        fb = self.fb
        self.tensors: list = []
        self.buffers: list = [fb.BufferT()]
        self.ops: list = []
        self.codes: list = []
        self.code_index: dict[int, int] = {}
        self.index: dict[str, int] = {}

    def buffer(self, data: np.ndarray) -> int:
        b = self.fb.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
        self.buffers.append(b)
        return len(self.buffers) - 1

    def tensor(self, name: str, shape, ttype: int, *, data: np.ndarray | None = None, scale=None, zp=None,
               axis: int = 0) -> int:
        fb = self.fb
        t = fb.TensorT()
        t.name, t.shape, t.type = name, list(int(s) for s in shape), ttype
        t.buffer = self.buffer(data) if data is not None else 0
        if scale is not None:
            q = fb.QuantizationParametersT()
            q.scale = [float(s) for s in np.atleast_1d(scale)]
            q.zeroPoint = [int(z) for z in np.atleast_1d(zp)]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def op(self, code: int, version: int, inputs: list[int], outputs: list[int], opt_type: int = 0,
           options=None) -> None:
        fb = self.fb
        if code not in self.code_index:
            c = fb.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), version
            self.codes.append(c)
            self.code_index[code] = len(self.codes) - 1
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self.code_index[code], inputs, outputs
        o.builtinOptionsType, o.builtinOptions = opt_type, options
        self.ops.append(o)


def _act_shape(shape: tuple[int, ...]) -> list[int]:
    return [1, *shape]


def _same_matches(op: Op, ih: int, iw: int, oh: int, ow: int) -> bool:
    """Whether TFLite's SAME padding (extra padding at the end) equals torch's symmetric padding."""
    for i, o, k, s, p in ((ih, oh, op.kernel[0], op.stride[0], op.pad[0]),
                          (iw, ow, op.kernel[1], op.stride[1], op.pad[1])):
        if o != -(-i // s) or max((o - 1) * s + k - i, 0) != 2 * p:
            return False
    return True


def _pad(b: _Builder, op: Op, ti, x: int, act_type: int, int8: bool, low: bool = False) -> int:
    """Torch's symmetric padding of ``op`` as an explicit op before it: PAD (zeros, for a conv) or
    PADV2 with the lowest value (-128, or the lowest float32, for a max pool)."""
    fb = b.fb
    TT = fb.TensorType
    ih, iw, c = ti.shape
    pads = np.array([[0, 0], [op.pad[0]] * 2, [op.pad[1]] * 2, [0, 0]], dtype=np.int32)
    pname = f"{op.layer}/pad"
    quant = {"scale": ti.q.scale, "zp": ti.q.zero_point} if int8 else {}
    pt = b.tensor(pname, [1, ih + 2 * op.pad[0], iw + 2 * op.pad[1], c], act_type, **quant)
    pv = b.tensor(f"{pname}/paddings", [4, 2], TT.INT32, data=pads)
    if not low:
        b.op(fb.BuiltinOperator.PAD, 2 if int8 else 1, [x, pv], [pt], fb.BuiltinOptions.PadOptions, fb.PadOptionsT())
        return pt
    lowest = np.array([-128], dtype=np.int8) if int8 else np.array([np.finfo(np.float32).min], dtype=np.float32)
    cv = b.tensor(f"{pname}/value", [1], act_type, data=lowest, **quant)
    b.op(fb.BuiltinOperator.PADV2, 2 if int8 else 1, [x, pv, cv], [pt], fb.BuiltinOptions.PadV2Options,
         fb.PadV2OptionsT())
    return pt


def to_tflite(g: Graph, *, int8: bool = True, description: str = "edgecompress") -> bytes:
    """The .tflite bytes of graph ``g``: full-integer int8, or fp32 when ``int8`` is False."""
    import flatbuffers

    fb = _schema()
    B = fb.BuiltinOperator
    TT = fb.TensorType
    act_type = TT.INT8 if int8 else TT.FLOAT32
    relu = fb.ActivationFunctionType.RELU
    b = _Builder(fb, int8)

    def act(name: str) -> int:
        if name in b.index:
            return b.index[name]
        t = g.tensors[name]
        if int8:
            return b.tensor(name, _act_shape(t.shape), act_type, scale=t.q.scale, zp=t.q.zero_point)
        return b.tensor(name, _act_shape(t.shape), act_type)

    for op in g.ops:
        ti, to = g.tensors[op.inputs[0]], g.tensors[op.output]
        if op.kind == "rescale" and not int8:  # float values need no rescaling
            b.index[op.output] = act(op.inputs[0])
            continue
        x, y = act(op.inputs[0]), act(op.output)
        fused = (fb.ActivationFunctionType.RELU6 if op.relu6 else relu) if op.relu else fb.ActivationFunctionType.NONE
        if op.kind in ("conv", "dwconv"):
            ih, iw, _ = ti.shape
            oh, ow, _ = to.shape
            padding = fb.Padding.VALID
            if any(op.pad):
                if _same_matches(op, ih, iw, oh, ow):
                    padding = fb.Padding.SAME
                else:
                    x = _pad(b, op, ti, x, act_type, int8)
            w, bias, wname = _weights(b, op, g, int8)
            if op.kind == "conv":
                o = fb.Conv2DOptionsT()
                o.padding, o.strideH, o.strideW, o.fusedActivationFunction = padding, *op.stride, fused
                o.dilationHFactor = o.dilationWFactor = 1
                # a grouped conv is CONV_2D whose filter has input channels / groups channels (version 6)
                version = 6 if op.groups > 1 else (3 if int8 else 1)
                b.op(B.CONV_2D, version, [x, w, bias], [y], fb.BuiltinOptions.Conv2DOptions, o)
            else:
                o = fb.DepthwiseConv2DOptionsT()
                o.padding, o.strideH, o.strideW, o.fusedActivationFunction = padding, *op.stride, fused
                o.depthMultiplier = to.shape[2] // ti.shape[2]
                o.dilationHFactor = o.dilationWFactor = 1
                b.op(B.DEPTHWISE_CONV_2D, 3 if int8 else 1, [x, w, bias], [y],
                     fb.BuiltinOptions.DepthwiseConv2DOptions, o)
        elif op.kind == "fc":
            w, bias, _ = _weights(b, op, g, int8)
            o = fb.FullyConnectedOptionsT()
            o.fusedActivationFunction = fused
            b.op(B.FULLY_CONNECTED, 4 if int8 else 1, [x, w, bias], [y], fb.BuiltinOptions.FullyConnectedOptions, o)
        elif op.kind in ("maxpool", "avgpool"):
            o = fb.Pool2DOptionsT()
            o.padding = fb.Padding.VALID
            if any(op.pad):  # torch's symmetric padding: PADV2 with the lowest value, which never wins the max
                ih, iw, _ = ti.shape
                if _same_matches(op, ih, iw, *to.shape[:2]):
                    o.padding = fb.Padding.SAME
                else:
                    x = _pad(b, op, ti, x, act_type, int8, low=True)
            o.strideH, o.strideW = op.stride
            o.filterHeight, o.filterWidth = op.kernel
            code = B.MAX_POOL_2D if op.kind == "maxpool" else B.AVERAGE_POOL_2D
            b.op(code, 2 if int8 else 1, [x], [y], fb.BuiltinOptions.Pool2DOptions, o)
        elif op.kind == "relu":
            b.op(B.RELU, 2 if int8 else 1, [x], [y])
        elif op.kind == "reshape":
            shape = np.array(_act_shape(to.shape), dtype=np.int32)
            s = b.tensor(f"{op.layer}/shape", [len(shape)], TT.INT32, data=shape)
            o = fb.ReshapeOptionsT()
            o.newShape = shape.tolist()
            b.op(B.RESHAPE, 1, [x, s], [y], fb.BuiltinOptions.ReshapeOptions, o)
        elif op.kind == "add":
            o = fb.AddOptionsT()
            o.fusedActivationFunction = fused
            b.op(B.ADD, 2 if int8 else 1, [x, act(op.inputs[1])], [y], fb.BuiltinOptions.AddOptions, o)
        elif op.kind == "mul":  # a channel gate (1, 1, 1, C) broadcasts over the pixels
            o = fb.MulOptionsT()
            o.fusedActivationFunction = fused
            b.op(B.MUL, 2 if int8 else 1, [x, act(op.inputs[1])], [y], fb.BuiltinOptions.MulOptions, o)
        elif op.kind == "concat":  # every input on the output's grid, as int8 CONCATENATION requires
            o = fb.ConcatenationOptionsT()
            o.axis, o.fusedActivationFunction = len(to.shape), fb.ActivationFunctionType.NONE
            b.op(B.CONCATENATION, 2 if int8 else 1, [act(i) for i in op.inputs], [y],
                 fb.BuiltinOptions.ConcatenationOptions, o)
        elif op.kind == "gather":  # channels picked (a chunk, a channel shuffle): GATHER on the last axis
            idx = b.tensor(f"{op.layer}/index", [op.index.size], TT.INT32, data=op.index.astype(np.int32))
            o = fb.GatherOptionsT()
            o.axis, o.batchDims = len(to.shape), 0
            b.op(B.GATHER, 1, [x, idx], [y], fb.BuiltinOptions.GatherOptions, o)
        elif op.kind == "rescale":  # a concatenation's input onto its grid: int8 -> int8 QUANTIZE
            b.op(B.QUANTIZE, 2, [x], [y])
        elif op.kind == "lut":
            if op.fn in _LUT_OPS:
                b.op(getattr(B, _LUT_OPS[op.fn]), 2 if int8 else 1, [x], [y])
            elif int8:
                _lookup(b, op, ti, x, y)
            else:
                _float_activation(b, op, ti, x, y)
        else:
            raise RecipeError(f"export tflite: layer {op.layer!r} ({op.kind}) is not supported")
    sub = fb.SubGraphT()
    sub.tensors, sub.operators, sub.name = b.tensors, b.ops, "main"
    sub.inputs, sub.outputs = [b.index[g.input]], [b.index[g.output]]
    model = fb.ModelT()
    model.version, model.description = 3, description
    model.operatorCodes, model.subgraphs, model.buffers = b.codes, [sub], b.buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_ID)
    return bytes(builder.Output())


def _lookup(b: _Builder, op: Op, ti, x: int, y: int) -> None:
    """An int8 table activation as TFLite ops: the codes to int32 (CAST), + 128 (ADD), the table's entries at
    those indices (GATHER). Exact in every runtime; TFLite Micro's arena holds two int32 copies of the input
    while it runs."""
    fb, TT, B = b.fb, b.fb.TensorType, b.fb.BuiltinOperator
    shape = _act_shape(ti.shape)
    codes = b.tensor(f"{op.layer}/codes", shape, TT.INT32)
    index = b.tensor(f"{op.layer}/index", shape, TT.INT32)
    o = fb.CastOptionsT()
    o.inDataType, o.outDataType = TT.INT8, TT.INT32
    b.op(B.CAST, 1, [x], [codes], fb.BuiltinOptions.CastOptions, o)
    offset = b.tensor(f"{op.layer}/offset", [1], TT.INT32, data=np.array([128], dtype=np.int32))
    o = fb.AddOptionsT()
    o.fusedActivationFunction = fb.ActivationFunctionType.NONE
    b.op(B.ADD, 1, [codes, offset], [index], fb.BuiltinOptions.AddOptions, o)
    qo = b.tensors[y].quantization
    table = b.tensor(f"{op.layer}/table", [256], TT.INT8, data=op.table, scale=qo.scale, zp=qo.zeroPoint)
    o = fb.GatherOptionsT()
    o.axis, o.batchDims = 0, 0
    b.op(B.GATHER, 1, [table, index], [y], fb.BuiltinOptions.GatherOptions, o)


def _float_activation(b: _Builder, op: Op, ti, x: int, y: int) -> None:
    """Hardswish (HARD_SWISH), Hardsigmoid (relu6(x + 3) / 6: ADD with RELU6, MUL) and SiLU (x * LOGISTIC(x))
    in float32."""
    fb, TT, B = b.fb, b.fb.TensorType, b.fb.BuiltinOperator
    if op.fn == "Hardswish":
        b.op(B.HARD_SWISH, 1, [x], [y])
        return
    tmp = b.tensor(f"{op.layer}/tmp", _act_shape(ti.shape), TT.FLOAT32)
    o = fb.MulOptionsT()
    o.fusedActivationFunction = fb.ActivationFunctionType.NONE
    if op.fn == "SiLU":
        b.op(B.LOGISTIC, 1, [x], [tmp])
        b.op(B.MUL, 1, [x, tmp], [y], fb.BuiltinOptions.MulOptions, o)
        return
    a = fb.AddOptionsT()
    a.fusedActivationFunction = fb.ActivationFunctionType.RELU6
    three = b.tensor(f"{op.layer}/three", [1], TT.FLOAT32, data=np.array([3.0], dtype=np.float32))
    b.op(B.ADD, 1, [x, three], [tmp], fb.BuiltinOptions.AddOptions, a)
    sixth = b.tensor(f"{op.layer}/sixth", [1], TT.FLOAT32, data=np.array([1 / 6], dtype=np.float32))
    b.op(B.MUL, 1, [tmp, sixth], [y], fb.BuiltinOptions.MulOptions, o)


def _weights(b: _Builder, op: Op, g: Graph, int8: bool) -> tuple[int, int, str]:
    TT = b.fb.TensorType
    name = f"{op.layer}/weight"
    axis = 3 if op.kind == "dwconv" else 0
    if not int8:
        w = b.tensor(name, op.weight.shape, TT.FLOAT32, data=op.weight.astype(np.float32))
        bias = b.tensor(f"{op.layer}/bias", [op.bias.size], TT.FLOAT32, data=op.bias.astype(np.float32))
        return w, bias, name
    n = op.wscale.size
    w = b.tensor(name, op.qweight.shape, TT.INT8, data=op.qweight, scale=op.wscale, zp=np.zeros(n, np.int64), axis=axis)
    bias = b.tensor(f"{op.layer}/bias", [n], TT.INT32, data=op.qbias.astype(np.int32), scale=op.bias_scale,
                    zp=np.zeros(n, np.int64))
    return w, bias, name


def export_tflite(g: Graph, path: str | os.PathLike, *, int8: bool = True) -> Path:
    """Write ``g`` as a .tflite file (atomically)."""
    from ..files import write_atomic

    data = to_tflite(g, int8=int8)
    return write_atomic(path, lambda p: p.write_bytes(data))


def export_model(model, task, path: str | os.PathLike, *, int8: bool = True) -> Path:
    """Lower ``model`` (reading its quantization spec; calibrating what it lacks) and write a .tflite;
    ``task`` is a Task or a task name."""
    from .ir import lower_task

    args.model("tflite.export_model", model)
    args.path("tflite.export_model", path)
    task = args.task("tflite.export_model", task)
    return export_tflite(lower_task(model, task, "tflite", quantize=int8), path, int8=int8)


def read_model(data: bytes):
    """The flatbuffer's object tree (``ModelT``) of .tflite bytes."""
    fb = _schema()
    if len(data) < 8 or data[4:8] != FILE_ID:
        raise ArtifactError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    return fb.ModelT.InitFromPackedBuf(bytearray(data), 0)


# ---- runtimes --------------------------------------------------------------------------------

def run_litert(data: bytes, x: np.ndarray, threads: int = 1, delegate: bool = True) -> np.ndarray:
    """Outputs of the LiteRT interpreter (``ai-edge-litert``) for inputs ``x`` (batch first, NHWC).

    ``delegate=True`` is LiteRT as shipped (XNNPACK delegate for CPU); False runs LiteRT's own
    builtin kernels."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=data, num_threads=threads, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    res = []
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i:i + 1].astype(inp["dtype"]).reshape(inp["shape"]))
        it.invoke()
        res.append(it.get_tensor(out["index"]).reshape(-1).copy())
    return np.stack(res)


def tflm_interpreter(data: bytes, arena_size: int | None = None):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(data, arena_size=arena_size or max(64 << 10, 10 * len(data)))


def run_tflm(data: bytes, x: np.ndarray) -> np.ndarray:
    """Outputs of TFLite Micro (the ``tflite-micro`` package's interpreter) for inputs ``x``."""
    it = tflm_interpreter(data)
    shape = it.get_input_details(0)["shape"]
    dtype = it.get_input_details(0)["dtype"]
    res = []
    for i in range(len(x)):
        it.set_input(x[i:i + 1].astype(dtype).reshape(shape), 0)
        it.invoke()
        res.append(np.array(it.get_output(0)).reshape(-1).copy())
    return np.stack(res)


def tflm_arena_bytes(data: bytes) -> int:
    """The arena TFLite Micro allocates for the model, as its RecordingMicroAllocator reports it."""
    import ctypes
    import re
    import sys
    import tempfile

    it = tflm_interpreter(data)
    with tempfile.TemporaryFile(mode="w+") as f:
        with _redirect_fd(1, f.fileno()), _redirect_fd(2, f.fileno()):
            it.print_allocations()
            sys.stdout.flush()
            ctypes.CDLL(None).fflush(None)  # the C++ runtime prints through C stdio
        f.flush()
        f.seek(0)
        text = f.read()
    m = re.search(r"Arena allocation total (\d+) bytes", text)
    if not m:
        raise ArtifactError(f"TFLite Micro did not report its arena: {text[:200]!r}")
    return int(m.group(1))


@contextlib.contextmanager
def _redirect_fd(fd: int, to: int):
    saved = os.dup(fd)
    try:
        os.dup2(to, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
