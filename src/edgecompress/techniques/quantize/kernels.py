"""What ONNX Runtime makes of a quantized model: which integer kernels run, and for mode dynamic its
latency against the float model."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from ...context import Context
from .spec import QuantizeSpec

log = logging.getLogger(__name__)


def kernel_notes(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    """Which integer kernels ONNX Runtime runs for this model; for dynamic mode, its latency against float."""
    from ...export.onnx import export_onnx
    from ...export.onnx_quant import kernel_note
    from ...measure import compare_latency

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "q.onnx"
            export_onnx(model, ctx.task.example_input, path)
            ctx.log.notes.append(kernel_note(path))
            if spec.mode == "dynamic":
                ref = Path(tmp) / "float.onnx"
                export_onnx(ctx.task.model, ctx.task.example_input, ref)
                batch = 64 if ctx.task.example_input.dim() != 2 or ctx.task.example_input.dtype.is_floating_point else 8
                lat = compare_latency([ref, path], ctx.task.example_input, (batch,), repeats=7, warmup=2, budget_s=2.0)
                ratio = lat[0][f"b{batch}"] / lat[1][f"b{batch}"]
                word = "FASTER" if ratio >= 1 else "SLOWER"
                ctx.log.notes.append(f"dynamic int8 runs {max(ratio, 1 / ratio):.2f}x {word} than float in ONNX "
                                     f"Runtime at batch {batch} ({lat[1][f'b{batch}']:.3f} ms vs "
                                     f"{lat[0][f'b{batch}']:.3f} ms)")
    except Exception as e:  # the measurement after the stage reports export failures with their message
        log.warning("kernel inspection failed: %s", e)
