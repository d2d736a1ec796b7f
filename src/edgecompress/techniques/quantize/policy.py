"""Which quantization a runtime family runs well: the choices a ``quantize`` stage leaves to defaults.

- ONNX Runtime on x86 (also what times every row on this host, with or without a device): 8-bit
  weights span 7 bits (``reduce_range``: its u8s8 kernels on AVX2 CPUs without VNNI add pairs of
  products in 16 bits, which full-range weights can saturate), uint8 activations, and the float
  rule (``keep_slow_float``: a thin-input conv it runs slower in int8 stays float).
- Integer-only microcontroller C and TFLite Micro: full-range int8 symmetric weights (their kernels
  sum in 32 bits) and every layer int8 (there is no float kernel to fall back on). Activations stay
  uint8 in the stage; the integer lowering stores them as int8 with the zero point moved by 128, the
  same grid.

ExecuTorch (XNNPACK), Apache TVM and TensorRT have no policy of their own yet: a device that runs them
first gets ONNX Runtime's, as before. A key the recipe sets always wins over the policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...context import Context
from .spec import QuantizeSpec

if TYPE_CHECKING:
    from ...devices import Device


@dataclass(frozen=True)
class Policy:
    """What one runtime family needs; each field is the default of the ``QuantizeSpec`` key it names."""

    family: str
    summary: str
    reduce_range: bool
    keep_slow_float: bool


ONNXRUNTIME_X86 = Policy("ONNX Runtime on x86", "7-bit weights, uint8 activations, thin-input convs float where "
                         "int8 runs slower", reduce_range=True, keep_slow_float=True)
MCU_INT8 = Policy("integer-only microcontroller C and TFLite Micro", "full-range int8 symmetric weights, every "
                  "layer int8", reduce_range=False, keep_slow_float=False)

#: the policy of the runtime a device profile names first
POLICIES = {"onnxruntime": ONNXRUNTIME_X86, "executorch": ONNXRUNTIME_X86, "tvm": ONNXRUNTIME_X86,
            "tensorrt": ONNXRUNTIME_X86, "c": MCU_INT8, "tflite-micro": MCU_INT8}
KEYS = ("reduce_range", "keep_slow_float")


def policy(device: Device | None) -> Policy:
    """The policy of the runtime that runs the model on ``device`` (ONNX Runtime on x86 without one)."""
    return ONNXRUNTIME_X86 if device is None else POLICIES[device.runtime[0]]


def resolve(spec: QuantizeSpec, ctx: Context) -> QuantizeSpec:
    """``spec`` with each key the recipe left unset taken from the policy of ``ctx.device``; a policy
    other than ONNX Runtime's says in the stage's notes which keys it set."""
    p = policy(ctx.device)
    unset = {k: getattr(p, k) for k in KEYS if getattr(spec, k) is None}
    if unset and p is not ONNXRUNTIME_X86:
        keys = ", ".join(f"{k}: {str(v).lower()}" for k, v in unset.items())
        ctx.log.notes.append(f"{keys}: the quantization policy of {ctx.device.name}'s runtime ({p.family}: "
                             f"{p.summary}); set them in the recipe to choose otherwise")
    return spec.model_copy(update=unset)
