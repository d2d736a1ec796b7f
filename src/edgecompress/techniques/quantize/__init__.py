"""Quantization: the one ``quantize`` stage.

Modes: ``static`` (weights and activations, calibrated on ``calib_batches`` batches), ``dynamic``
(int8 weights, activations quantized at run time; Linear, and LSTM / GRU in ``rnn``),
``weight_only`` (int4/int8 grouped or float16, optional GPTQ rounding), ``qat`` (fake quant with a straight-through estimator or LSQ,
fine-tuned through ``ctx.finetune``). Options: batch norm folding, cross-layer equalization, bias
correction, and ``bits: auto`` (mixed precision within a budget, chosen from per-layer sensitivity).

Every quantized tensor gets one ``QuantSpec`` (``primitives.qlayer.tensor_specs(model)``); the ONNX export, the
packed artifact and the C export read those same numbers.

Modules, each one job, lowest first: ``spec`` (the recipe spec and the per-tensor specs it gives),
``policy`` (the defaults each runtime family needs), ``gptq``, ``calibrate`` (observers over the
calibration batches), ``placement`` (where activations are quantized; the ONNX Runtime float rule),
``edits`` (batch norm folding, equalization, bias correction), ``mixed`` (``bits: auto``), ``qat``,
``rnn``, ``kernels`` (what ONNX Runtime runs) and ``stage`` (``apply``, which uses them all).
"""
from __future__ import annotations

from .spec import QuantizeSpec
from .stage import apply

__all__ = ["QuantizeSpec", "apply"]
