"""The recurrent layers of the ``quantize`` stage (mode ``dynamic``).

LSTM: int8 W and R, inputs and hidden state quantized at run time, run by ONNX Runtime's
``com.microsoft.DynamicQuantizeLSTM`` integer kernel. GRU and Elman RNN: ONNX Runtime has no integer
kernel for them, so their weights are stored as int8 and dequantized in the graph (4x smaller
weights, float compute), and the report says so for each layer.
"""
from __future__ import annotations

from torch import nn

from ...context import Context
from ...layers import replace
from ...primitives.qrnn import QUANT_RNN
from ...primitives.quant import QuantSpec
from .spec import QuantizeSpec

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def recurrent_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Named nn.LSTM / nn.GRU / nn.RNN modules, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RECURRENT)}


def weight_spec(spec: QuantizeSpec, layer: nn.Module) -> QuantSpec:
    """int8 weights, per gate row (``granularity: channel`` or ``group``) or per tensor.

    LSTM weights are symmetric (DynamicQuantizeLSTM takes zero weight zero points only) and, with
    ``reduce_range`` (ONNX Runtime's policy), use 7 bits: ONNX Runtime's uint8 x int8 kernel on AVX2 CPUs
    without VNNI adds pairs of products in 16 bits, which 8-bit weights can saturate."""
    lstm = isinstance(layer, nn.LSTM)
    bits = 7 if lstm and spec.reduce_range else 8
    gran = "tensor" if spec.granularity == "tensor" else "channel"
    return QuantSpec(bits=bits, signed=True, symmetric=True if lstm else spec.symmetric, granularity=gran, axis=0)


def quantize_recurrent(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> list[str]:
    """Replace the recurrent layers named in ``names`` by their quantized form (mode ``dynamic``);
    log every recurrent layer as touched or skipped with the reason. Returns the layers replaced."""
    done = []
    for n, layer in recurrent_layers(model).items():
        if n not in names:
            continue
        kind = type(layer).__name__
        if spec.mode != "dynamic":
            ctx.log.skipped[n] = (f"{kind} layers are quantized in mode dynamic (int8 weights; ONNX Runtime has no "
                                  f"{spec.mode} {kind} kernel); kept float")
            continue
        if getattr(layer, "proj_size", 0):
            ctx.log.skipped[n] = "LSTM with proj_size: DynamicQuantizeLSTM has no projection; kept float"
            continue
        w_spec = weight_spec(spec, layer)
        cls = next(q for t, q in QUANT_RNN.items() if isinstance(layer, t))
        replace(model, n, cls(layer, w_spec))
        if isinstance(layer, nn.LSTM):
            what = (f"dynamic: W and R {w_spec.describe()} (rows in ONNX gate order i, o, f, c), input and hidden "
                    f"state to uint8 at run time; ONNX Runtime com.microsoft.DynamicQuantizeLSTM")
            if w_spec.bits == 7:
                what += ("; 7-bit weights (reduce_range) so that ONNX Runtime's u8s8 kernel cannot saturate on AVX2 "
                         "CPUs without VNNI")
            else:
                what += ("; 8-bit weights (reduce_range: false): on AVX2 CPUs without VNNI ONNX Runtime's u8s8 kernel "
                         "can saturate, and its outputs then differ from this simulation")
        else:
            what = (f"dynamic: W and R stored {w_spec.describe()} and dequantized in the graph (DequantizeLinear -> "
                    f"float {kind}): ONNX Runtime has no integer {kind} kernel, so the weights are 4x smaller and "
                    f"the compute stays float")
        if spec.granularity == "group":
            what += "; granularity group is applied per gate row"
        ctx.log.touched[n] = what
        done.append(n)
    return done
