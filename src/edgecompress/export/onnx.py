"""ONNX export and ONNX Runtime sessions.

Files are written atomically (``files.write_atomic``), so a failure never leaves a partial file behind.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import args
from ..errors import ArtifactError
from ..files import write_atomic

OPSET = 17


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                opset: int = OPSET) -> Path:
    """Export ``model`` (fp32, dynamic batch) to ``path`` and check it with onnx.checker.
    A model with quantized layers is written as a quantized ONNX model (see ``onnx_quant``)."""
    import onnx

    from ..primitives.qlayer import is_quantized
    args.exporter("export_onnx", model, example_input, path)
    if is_quantized(model):
        from .onnx_quant import export_quantized
        return export_quantized(model, example_input, path, opset)
    model = model.eval()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        onnx.checker.check_model(str(tmp))

    return write_atomic(path, write)


def session(path: str | os.PathLike | bytes, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed number of intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
        name = "model bytes" if isinstance(path, bytes) else str(path)
        raise ArtifactError(f"{name} is not a model ONNX Runtime can load: {str(e).splitlines()[0][:200]}") from None


def run(sess, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Outputs of an ORT session over ``x`` in batches."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    import numpy as np
    return torch.from_numpy(np.concatenate(outs))
