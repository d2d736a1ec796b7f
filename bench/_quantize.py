"""What both quantization benchmarks (``quantize``, ``quantize_rnn``) measure alike: edgecompress's
quantize stage, the score of a model's outputs, and the integer kernels ONNX Runtime ran."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from edgecompress.context import Context
from edgecompress.export.onnx_quant import INTEGER_OPS, optimized_ops
from edgecompress.techniques.quantize import QuantizeSpec, apply
from edgecompress.zoo import minilm


def ours(task, **kw):
    """(model, seconds, context) of the quantize stage with options ``kw`` on a copy of the task's model."""
    ctx = Context(task=task, seed=0, where="bench")
    t0 = time.perf_counter()
    model = apply(copy.deepcopy(task.model), QuantizeSpec(**kw), ctx)
    return model, time.perf_counter() - t0, ctx


def score(task, out: torch.Tensor) -> str:
    """Test accuracy of ``out`` (cosine and top-1 retrieval agreement for minilm-embed)."""
    targets = torch.cat([y for _, y in task.eval_data])
    if task.name == minilm.NAME:
        return f"cos {minilm.cosine(out, targets):.4f} / top1 {minilm.retrieval_agreement(out, targets):.3f}"
    return f"{float((out.argmax(1) == targets).float().mean()):.4f}"


def kernels(path: Path) -> str:
    """The integer kernels in ONNX Runtime's optimized graph of ``path`` ("float" when none)."""
    ops = optimized_ops(path)
    ints = [f"{k}x{v}" for k, v in sorted(ops.items()) if k in INTEGER_OPS and k != "DynamicQuantizeLinear"]
    return " ".join(ints) or "float"
