"""The ``quantize`` stage's recipe spec, and the per-tensor ``QuantSpec`` it gives each weight and activation."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ...primitives.quant import QuantSpec
from ...spec import StageSpec

#: weight bits each mode's ONNX export can store (None: 2..8 in int8 QDQ)
EXPORT_BITS = {"weight_only": (4, 8, 16), "dynamic": (8,)}


class QuantizeSpec(StageSpec):
    """``{stage: quantize, mode: static, bits: 8, granularity: channel, observer: minmax}``"""

    stage: Literal["quantize"] = "quantize"
    mode: Literal["static", "dynamic", "weight_only", "qat"] = "static"
    bits: int | Literal["auto"] = Field(default=8, description="weight bits 2..8 (16: float16 for weight_only), "
                                                                "or auto with a budget")
    act_bits: int = Field(default=8, ge=2, le=8, description="activation bits (static, qat)")
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = Field(default=None, ge=2, le=65536)
    symmetric: bool = True
    scale: Literal["float", "pow2"] = "float"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = Field(default=99.99, gt=50, le=100)
    calib_batches: int = Field(default=8, ge=1, le=100000)
    rounding: Literal["nearest", "gptq"] = "nearest"
    lsq: bool = False
    fold_bn: bool = True
    equalize: bool = False
    bias_correction: bool = False
    embeddings: bool = Field(default=True, description="all modes but qat: nn.Embedding tables to int8, "
                             "one scale per row")
    reduce_range: bool | None = Field(default=None, description="static/qat/dynamic: 8-bit weights use 7 bits, so "
                                      "that ONNX Runtime's u8s8 kernels on AVX2 (no VNNI) cannot saturate their "
                                      "16-bit sums; unset: from the device's runtime (true for ONNX Runtime, false "
                                      "for microcontroller C and TFLite Micro)")
    keep_slow_float: bool | None = Field(default=None, description="static/qat: convs reading 1-3 channels stay "
                                         "float when ONNX Runtime's cost model (per-layer MACs, measured kernel "
                                         "ratios) says all-int8 would be 1.2x slower or worse; the next layer "
                                         "quantizes their output (false: quantize every layer, as integer-only "
                                         "devices need); unset: from the device's runtime (true for ONNX Runtime, "
                                         "false for microcontroller C and TFLite Micro)")
    budget_bits: float | None = Field(default=None, ge=2, le=8, description="bits: auto, average weight bits")
    budget_bytes: int | None = Field(default=None, ge=1, description="bits: auto, packed weight bytes")
    candidate_bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], min_length=1)
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default all Linear/Conv")
    exclude: list[str] | None = None

    @field_validator("bits")
    @classmethod
    def _bits_exportable(cls, v, info):
        mode = info.data.get("mode", "static")
        allowed = EXPORT_BITS.get(mode)
        if v == "auto":
            if mode == "dynamic":
                raise PydanticCustomError("bits_mode", "must be 8 for mode dynamic (MatMulInteger)")
            return v
        if allowed is not None and v not in allowed:
            raise PydanticCustomError("bits_mode", "must be one of {allowed} for mode {mode}",
                                      {"allowed": ", ".join(map(str, allowed)), "mode": mode})
        if allowed is None and not 2 <= v <= 8:
            raise PydanticCustomError("bits_mode", "must be one of 2..8 for mode {mode} (int8 QDQ)", {"mode": mode})
        return v

    @field_validator("candidate_bits")
    @classmethod
    def _cands(cls, v):
        if any(not 2 <= b <= 8 for b in v):
            raise PydanticCustomError("bits_range", "must hold bits in 2..8")
        return sorted(set(v))

def weight_spec(spec: QuantizeSpec, bits: int, layer: nn.Module) -> QuantSpec:
    """A layer's weight spec at nominal width ``bits`` (16: float16)."""
    if bits == 16:
        return QuantSpec(bits=16)
    if bits == 8 and spec.reduce_range and spec.mode in ("static", "qat", "dynamic"):
        bits = 7
    gran = spec.granularity
    if gran == "group" and not isinstance(layer, nn.Linear):
        gran = "channel"
    return QuantSpec(bits=bits, signed=True, symmetric=spec.symmetric, granularity=gran, axis=0,
                     group_size=spec.group_size if gran == "group" else None, scale_type=spec.scale)


def act_spec(spec: QuantizeSpec) -> QuantSpec:
    """The spec of every quantized activation: unsigned, affine, one scale per tensor."""
    return QuantSpec(bits=spec.act_bits, signed=False, symmetric=False, granularity="tensor", scale_type=spec.scale)


def stored_bits(spec: QuantizeSpec, bits: int, layer: nn.Module) -> int:
    """Bits a weight code really spans at nominal width ``bits`` (8 is 7 under reduce_range)."""
    return weight_spec(spec, bits, layer).bits
