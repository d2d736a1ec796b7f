"""ONNX export of quantized models (QDQ int8, MatMulNBits int4/int8, dynamic MatMulInteger/ConvInteger,
float16 weights), and what ONNX Runtime really ran.

``export_onnx`` calls ``export_quantized`` for any model holding a ``QuantLayer``, so ``ec.measure``,
the pipeline and ``Result.export_onnx`` write the quantized file without being asked.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..primitives.qlayer import quant_layers
from ..primitives.qrnn import QuantLSTM
from ..files import write_atomic

#: integer kernels we look for in ONNX Runtime's optimized graph
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearGlobalAveragePool",
               "DynamicQuantizeLinear", "DynamicQuantizeLSTM")


def export_quantized(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export a model with quantized layers; scale and zero point initializers are the layers' buffers."""
    import onnx

    model = model.eval()
    # the com.microsoft domain (MatMulNBits) only when used: torch warns about an unused custom domain
    custom = {"com.microsoft": 1} if any(m.mode == "weight_only" for m in quant_layers(model).values()) \
        or any(isinstance(m, QuantLSTM) for m in model.modules()) else None

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              custom_opsets=custom, do_constant_folding=False)
        proto = onnx.load(str(tmp))
        _constants_to_initializers(proto)
        _merge_duplicate_nodes(proto)
        drop_unused_initializers(proto)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))

    return write_atomic(path, write)


def _constants_to_initializers(proto) -> None:
    """Tensor-valued Constant nodes become initializers of the same name: the same values without a
    node (name, op type, attribute) around each one, so the file is smaller."""
    keep = []
    for n in proto.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = n.attribute[0].t
            t.name = n.output[0]
            proto.graph.initializer.append(t)
        else:
            keep.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _merge_duplicate_nodes(proto) -> None:
    """Common subexpressions: a node with the same operator, inputs and attributes as an earlier one
    (the DynamicQuantizeLinear of an input read by three projections, a mask computed per layer) is
    dropped and its readers use the earlier node's outputs. Nodes with subgraphs or randomness stay."""
    outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    first: dict[bytes, str] = {}  # equal initializers (the axes of every Unsqueeze) are one
    for t in proto.graph.initializer:
        name, t.name = t.name, ""
        rename[name] = first.setdefault(t.SerializeToString(), name)
        t.name = name
    rename = {k: v for k, v in rename.items() if k != v}
    seen: dict[tuple, list[str]] = {}
    keep = []
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        key = (n.domain, n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
        mergeable = not n.op_type.startswith("Random") and n.op_type not in ("Multinomial", "Dropout") \
            and not any(a.g.node or a.graphs for a in n.attribute) and not outputs.intersection(n.output)
        if mergeable and key in seen and len(seen[key]) == len(n.output):
            rename.update(zip(n.output, seen[key]))
            continue
        if mergeable:
            seen[key] = list(n.output)
        keep.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def drop_unused_initializers(proto) -> None:
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def optimized_ops(path: str | os.PathLike, threads: int = 1) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime actually runs (after all its optimizations)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def kernel_note(path: str | os.PathLike) -> str:
    """One line for the report: which integer kernels ONNX Runtime ran, and which float ops remain."""
    ops = optimized_ops(path)
    ints = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in ops.items() if k in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                                                    "FusedMatMul")}
    ran = ", ".join(f"{k} x{v}" for k, v in sorted(ints.items())) or "none"
    rest = ", ".join(f"{k} x{v}" for k, v in sorted(floats.items())) or "none"
    return f"ONNX Runtime integer kernels: {ran}; float matmul/conv kernels left: {rest}"


def initializer_arrays(path: str | os.PathLike) -> dict:
    """name -> numpy array of every initializer and Constant node in the file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    out = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return out


def layer_names(model: nn.Module) -> list[str]:
    return list(quant_layers(model))


def quant_params(path: str | os.PathLike) -> list[tuple[str, object, object]]:
    """(operator, scale, zero point) of every QuantizeLinear / DequantizeLinear / MatMulNBits /
    MatMulInteger / ConvInteger weight and DynamicQuantizeLSTM W and R in the file, with values read from
    initializers or Constant nodes."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    readers = collections.defaultdict(list)
    for n in proto.graph.node:  # in topological order: Identity and Cast of constants (float16 scales) resolve
        for i in n.input:
            readers[i].append(n)
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in values:
            values[n.output[0]] = values[n.input[0]]
        elif n.op_type == "Cast" and n.input[0] in values:
            to = onnx.helper.tensor_dtype_to_np_dtype(n.attribute[0].i)
            values[n.output[0]] = values[n.input[0]].astype(to)

    def matmul_scale(n):
        """Weight scale of a dynamic MatMulInteger: Cast(acc) * (x_scale * w_scale)."""
        for cast in readers[n.output[0]]:
            for mul in (m for m in readers[cast.output[0]] if m.op_type == "Mul"):
                for name in mul.input:
                    for prod in (p for p in proto.graph.node if name in p.output and p.op_type == "Mul"):
                        found = [values[i] for i in prod.input if i in values]
                        if len(found) == 1:
                            return found[0]
        return None

    out = []
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in values:
            zp = values.get(n.input[2]) if len(n.input) > 2 else None
            out.append((n.op_type, values[n.input[1]], zp))
        elif n.op_type == "MatMulNBits":
            out.append((n.op_type, values[n.input[2]], values.get(n.input[3]) if len(n.input) > 3 else None))
        elif n.op_type == "MatMulInteger":
            out.append((n.op_type, matmul_scale(n), values.get(n.input[3])))
        elif n.op_type == "ConvInteger":
            out.append((n.op_type, None, values.get(n.input[3])))
        elif n.op_type == "DynamicQuantizeLSTM":  # W and R: inputs 8, 9 and 10, 11
            out.append((n.op_type, values[n.input[8]], values[n.input[9]]))
            out.append((n.op_type, values[n.input[10]], values[n.input[11]]))
    return out
