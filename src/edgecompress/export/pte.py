"""ExecuTorch: a ``.pte`` program lowered to the XNNPACK delegate, fp32 or int8 with OUR quantization.

int8: the quantized model is rebuilt with PyTorch's quantized_decomposed quantize / dequantize ops (the
form PT2E's ``convert_pt2e`` produces and XNNPACK's partitioner lowers), their scales and zero points
read from the quantize stage's specs; nothing is observed again. Our uint8 affine activations become
int8 with the same scale and zero point minus 128 (the same grid, shifted: no value changes); weights
stay our int8 codes with their per-channel scales; biases are our int32 biases dequantized, which XNNPACK
quantizes back with the same input x weight scales. A spec XNNPACK lacks (weights below 8 bits are kept
as int8 codes; weights with a zero point, per-group scales or activations below 8 bits are refused)
gives one line naming the layer and the spec.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import args
from ..errors import RecipeError
from ..layers import replace
from ..primitives.qlayer import ActQuant, QuantLayer, int8_refusal, is_quantized
from ..primitives.quant import QuantSpec
from ..files import write_atomic


def _executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise RecipeError("export pte needs ExecuTorch: pip install 'edgecompress[executorch]'") from None
    return XnnpackPartitioner, to_edge_transform_and_lower


def _ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
    return torch.ops.quantized_decomposed


def _act_params(spec: QuantSpec) -> tuple[float, int]:
    """Scale and int8 zero point of an 8-bit activation spec (uint8: the zero point shifted by 128)."""
    return float(spec.scale), int(spec.zero_point) - (128 if not spec.signed else 0)


class _QDQ(nn.Module):
    """Quantize to int8 and dequantize with fixed parameters: what XNNPACK fuses into its int8 kernels."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.scale, self.zp = _act_params(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _ops()
        q = ops.quantize_per_tensor(x, self.scale, self.zp, -128, 127, torch.int8)
        return ops.dequantize_per_tensor(q, self.scale, self.zp, -128, 127, torch.int8)


class _Layer(nn.Module):
    """A static int8 ``QuantLayer`` as input Q/DQ -> (dequantized int8 weight) conv / linear -> ReLU -> Q/DQ."""

    def __init__(self, ql: QuantLayer) -> None:
        super().__init__()
        layer = ql.layer
        self.layer = copy.deepcopy(layer)
        self.kind = ql.kind
        self.act = ql.act
        self.inq = _QDQ(ql.in_spec) if ql.in_spec is not None else None
        self.outq = _QDQ(ql.out_spec) if ql.out_spec is not None else None
        w = ql.w_spec
        scale = w.scale.reshape(-1).to(torch.float32)
        if scale.numel() == 1:
            scale = scale.expand(layer.weight.shape[0]).clone()
        self.register_buffer("qweight", ql.qweight.to(torch.int8).clone())
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zp", torch.zeros(scale.shape, dtype=torch.int64))
        bias = layer.bias
        bs = ql.bias_spec
        if bias is not None and bs is not None:  # our int32 bias, dequantized
            from ..primitives import quant as Q
            bias = Q.fake_quant(bias.detach(), bs)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inq is not None:
            x = self.inq(x)
        if self.outq is None:  # float output (the logits): XNNPACK's int8 kernels need a quantized output,
            w = self.layer.weight  # so it runs in fp32 on our dequantized weights (the same values)
        else:
            w = _ops().dequantize_per_channel(self.qweight, self.w_scale, self.w_zp, 0, -127, 127, torch.int8)
        if self.kind == "linear":
            y = nn.functional.linear(x, w, self.bias)
        else:
            y = self.layer._conv_forward(x, w, self.bias)
        if self.act is not None:
            y = self.act(y)
        return y if self.outq is None else self.outq(y)


def check_model(model: nn.Module) -> None:
    """One line naming the first layer whose spec XNNPACK's int8 kernels cannot take."""
    line = int8_refusal(model, "pte", "XNNPACK", "XNNPACK's int8 export takes mode static or qat",
                        "XNNPACK takes int8 weights with zero point 0, per-tensor or per-channel on axis 0")
    if line is not None:
        raise RecipeError(line)


def xnnpack_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers and activation quantizers are written with
    quantized_decomposed ops carrying our scales (``model`` itself when nothing is quantized)."""
    if not is_quantized(model):
        return model
    check_model(model)
    out = copy.deepcopy(model).eval()
    swaps = [(n, _Layer(m)) for n, m in out.named_modules() if isinstance(m, QuantLayer)]
    swaps += [(n, _QDQ(m.spec) if m.spec is not None else nn.Identity()) for n, m in out.named_modules()
              if isinstance(m, ActQuant)]
    for name, new in swaps:
        replace(out, name, new)
    return out


def export_pte(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, int8: bool = True,
               batch: int = 1) -> Path:
    """Write ``model`` as an ExecuTorch program lowered to XNNPACK, for inputs of ``batch`` samples (a fixed
    shape: with a dynamic batch, ExecuTorch 1.5.1's memory plan refused batches past 15 here). ``int8``:
    our quantization (the model must hold quantized layers); ``int8=False``: the float model (a quantized
    model's float weights)."""
    args.exporter("export_pte", model, example_input, path)
    partitioner, lower = _executorch()
    if int8 and not is_quantized(model):
        raise RecipeError("export pte (int8) needs a quantize stage with mode static or qat; the model has no "
                          "quantized layer")
    m = xnnpack_model(model) if int8 else _float_model(model)
    with torch.no_grad():
        x = example_input[:1].repeat(batch, *[1] * (example_input.dim() - 1))
        program = torch.export.export(m.eval(), (x,))
    buffer = lower(program, partitioner=[partitioner()]).to_executorch().buffer
    return write_atomic(path, lambda tmp: tmp.write_bytes(buffer))


def _float_model(model: nn.Module) -> nn.Module:
    """The float network under a quantized model: each QuantLayer's layer (+ fused ReLU), quantizers gone."""
    if not is_quantized(model):
        return model
    out = copy.deepcopy(model).eval()
    swaps = [(n, nn.Sequential(m.layer, m.act) if m.act is not None else m.layer) for n, m in out.named_modules()
             if isinstance(m, QuantLayer)]
    swaps += [(n, nn.Identity()) for n, m in out.named_modules() if isinstance(m, ActQuant)]
    for name, new in swaps:
        replace(out, name, new)
    return out


def delegated(path: str | os.PathLike) -> tuple[int, int]:
    """(XNNPACK delegate calls, other operators) in a .pte's execution plan."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(Path(path).read_bytes())
    prog = getattr(prog, "program", prog)
    plan = prog.execution_plan[0]
    calls = [c.instr_args for c in plan.chains[0].instructions]
    delegates = sum(1 for a in calls if type(a).__name__ == "DelegateCall")
    return delegates, sum(1 for a in calls if type(a).__name__ == "KernelCall")


def runner(path: str | os.PathLike, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The program's ``forward`` in ExecuTorch's Python runtime, as a function of a float32 batch.
    ``threads``: the size of XNNPACK's thread pool (one pool for the whole process)."""
    _executorch()
    from executorch.runtime import Runtime

    if threads is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(threads)

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def call(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])[0].numpy()

    return call
