"""Measurement: every number comes from this run. Sizes are bytes of files written, latency is
ONNX Runtime (median after warm-up, fixed threads), the metric is on held-out data."""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import args
from .errors import ArtifactError
from .export.onnx import export_onnx, run, session
from .task import Task, predict

BATCHES = (1, 64)


@dataclass
class Metrics:
    """What one model measured in one run. Stable JSON keys; see the report page of the docs (report.json keys)."""

    params: int
    nonzero_params: int
    dense_bytes: int
    stored_bytes: int
    artifact: str
    macs: int
    metric: float
    metric_name: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float | None = None
    threads: int = 1
    notes: list[str] = field(default_factory=list)
    onnx_bytes: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    robustness: dict[str, float] = field(default_factory=dict)  # metric under each corruption (robustness.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- MACs, counted on the ONNX graph with the batch fixed to 1 -------------------------------

def _static_shapes(model) -> dict[str, list[int]]:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = 1
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    _contrib_rnn_shapes(m)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _contrib_rnn_shapes(m) -> None:
    """ONNX's shape inference does not know com.microsoft.DynamicQuantizeLSTM: give its outputs their
    shapes (Y [T, D, B, H], Y_h and Y_c [D, B, H]) from its input's, then infer the rest again."""
    import onnx

    known = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in m.graph.value_info}
    added = False
    for node in m.graph.node:
        if node.op_type != "DynamicQuantizeLSTM" or len(known.get(node.input[0], [])) != 3:
            continue
        x = known[node.input[0]]
        attrs = {a.name: a for a in node.attribute}
        d = 2 if "direction" in attrs and attrs["direction"].s == b"bidirectional" else 1
        h = attrs["hidden_size"].i
        for name, dims in zip(node.output, ([x[0], d, x[1], h], [d, x[1], h], [d, x[1], h])):
            if name and name not in known:
                m.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
                added = True
    if added:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        del m.graph.value_info[:]
        m.graph.value_info.extend(inferred.graph.value_info)


def onnx_macs(model) -> int:
    """Multiply-accumulates of Conv, Gemm, MatMul and LSTM / GRU / RNN (and their integer forms) at batch 1."""
    shapes = _static_shapes(model)
    total = 0
    for node in model.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = node.input[3] if op == "QLinearConv" else node.input[1]
            if w in shapes and node.output[0] in shapes:
                total += math.prod(shapes[node.output[0]]) * math.prod(shapes[w][1:])
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits"):
            a = node.input[0]
            out = shapes.get(node.output[0])
            if out is None:
                continue
            if op == "MatMulNBits":
                k = next(a.i for a in node.attribute if a.name == "K")
            elif op == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = shapes.get(a, [1])[-2] if len(shapes.get(a, [])) >= 2 else 1
            else:
                k = shapes.get(a, [1])[-1]
            total += math.prod(out) * k
        elif op in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
            x = shapes.get(node.input[0])  # [T, B, K]
            if x is None or len(x) != 3:
                continue
            attrs = {a.name: a for a in node.attribute}
            hidden = attrs["hidden_size"].i
            dirs = 2 if "direction" in attrs and attrs["direction"].s == b"bidirectional" else 1
            gates = {"GRU": 3, "RNN": 1}.get(op, 4)
            total += x[0] * x[1] * dirs * gates * hidden * (x[2] + hidden)
    return int(total)


# ---- latency ---------------------------------------------------------------------------------

def _batch(example: torch.Tensor, batch: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *example.shape[1:])
    x = torch.rand(shape, generator=gen) if example.is_floating_point() else example.expand(shape).contiguous()
    return x.numpy().astype(example.numpy().dtype)


def _ort_runner(path, threads: int):
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def compare_latency(paths: list, example: torch.Tensor, batches=BATCHES, threads: int = 1, repeats: int = 30,
                    warmup: int = 10, budget_s: float = 3.0) -> list[dict[str, float]]:
    """Median latency (ms) of each model at each batch size, measured round-robin in one loop so that
    every model sees the same machine state; ``budget_s`` caps each batch size. A model is an ONNX file
    (run by ONNX Runtime) or a function of a numpy batch (another runtime's program, e.g. ExecuTorch's
    or TVM's, see ``deploy.time_runtimes``)."""
    runs = [p if callable(p) else _ort_runner(p, threads) for p in paths]
    result: list[dict[str, float]] = [{} for _ in paths]
    for b in batches:
        x = _batch(example, b)
        for f in runs:
            for _ in range(warmup):
                f(x)
        times: list[list[float]] = [[] for _ in runs]
        start = time.perf_counter()
        while len(times[0]) < repeats and (len(times[0]) < 5 or time.perf_counter() - start < budget_s):
            for f, t in zip(runs, times):
                t0 = time.perf_counter()
                f(x)
                t.append((time.perf_counter() - t0) * 1e3)
        for r, t in zip(result, times):
            r[f"b{b}"] = round(statistics.median(t), 4)
    return result


# ---- the one entry point ---------------------------------------------------------------------

def measure(model_or_path: nn.Module | str | os.PathLike, task: Task | str, *,
            artifact: str | os.PathLike | None = None, onnx_path: str | os.PathLike | None = None, threads: int = 1,
            batches=BATCHES, repeats: int = 30, latency: bool = True, robustness=None) -> Metrics:
    """Measure a torch model or an ONNX (or ``.ecz``) file on ``task``'s held-out data; ``task`` is a Task or
    a task name (built-in, or ``package.module:factory``).

    For a torch model, it is exported to ONNX (``onnx_path``, or a temporary file) and that file is
    measured; ``artifact`` names the file whose bytes count as stored (default: the ONNX file).
    ``robustness`` (a ``RobustnessSpec`` or its dict) adds the metric under input corruptions.
    """
    import onnx

    args.check("measure", "model_or_path", model_or_path, (nn.Module, str, os.PathLike),
               "a torch.nn.Module or the path of an .onnx or .ecz file")
    args.path("measure", artifact, "artifact", optional=True)
    args.path("measure", onnx_path, "onnx_path", optional=True)
    args.check("measure", "task", task, (Task, str), args.TASK)
    if not isinstance(model_or_path, nn.Module) and not Path(model_or_path).is_file():
        raise ArtifactError(f"{model_or_path}: no such file")
    task = args.task("measure", task)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_path, nn.Module):
            model = model_or_path.eval()
            path = Path(onnx_path) if onnx_path else Path(tmp) / "model.onnx"
            export_onnx(model, task.example_input, path)
        else:
            model = None
            path = Path(model_or_path)
            if path.suffix == ".ecz":
                from .export.ecz import unpack
                artifact = artifact or path
                path = unpack(path, Path(tmp) / "model.onnx")
        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise ArtifactError(f"{path} is not an ONNX model: {str(e).splitlines()[0][:160]}") from None
        sess = session(path, threads)
        xs = torch.cat([x for x, _ in task.eval_data])
        ort_out = run(sess, xs)
        notes: list[str] = []
        if model is not None:
            out, targets = predict(model, task.eval_data)
            diff = float((out - ort_out).abs().max())
            params = sum(p.numel() for p in model.parameters())
            nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        else:
            out, targets = ort_out, torch.cat([y for _, y in task.eval_data])
            diff = None
            from onnx import numpy_helper
            arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
            weights = [a for a in arrays if a.dtype.kind == "f" or a.ndim > 1]
            params = int(sum(a.size for a in weights))
            nonzero = int(sum(np.count_nonzero(a) for a in weights))
        lat = compare_latency([path], task.example_input, batches, threads, repeats)[0] if latency else {}
        if robustness:
            from .robustness import measure_robustness
            robustness = measure_robustness(model if model is not None else lambda x: run(sess, x), task, robustness)
        stored = Path(artifact) if artifact else path
        if stored.suffix == ".ecz":
            from .export.ecz import breakdown, pack
            if model is not None:
                pack(path, stored)
            notes.append("ecz bytes: " + ", ".join(f"{k} {v:,}" for k, v in breakdown(stored).items())
                         + f" (the ONNX file: {path.stat().st_size:,})")
        return Metrics(params=params, nonzero_params=nonzero, dense_bytes=4 * params,
                       stored_bytes=stored.stat().st_size, artifact=stored.suffix.lstrip(".") or "onnx",
                       macs=onnx_macs(proto), metric=float(task.metric_fn(out, targets)),
                       metric_name=task.metric_name, latency_ms=lat, max_abs_diff=diff, threads=threads,
                       notes=notes, onnx_bytes=path.stat().st_size,
                       breakdown=breakdown(stored) if stored.suffix == ".ecz" else {},
                       robustness=robustness or {})
