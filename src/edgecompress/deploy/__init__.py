"""A model on a device: what it costs there (flash, RAM, instructions, estimated latency and energy),
the files its runtimes load and their latency here, and the budgets it must fit.

``evaluate`` measures one model (or an ensemble) on a device profile (``edgecompress.devices``);
``check`` compares the result with the recipe's constraints and the device's own memory.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..devices import Device, DeviceMetrics
from ..primitives.ensemble import Ensemble
from .budgets import check
from .cost import evaluate_model
from .ensemble import evaluate_ensemble
from .runtimes import time_runtimes

__all__ = ["check", "evaluate", "time_runtimes"]


def evaluate(model: nn.Module, task, device: Device, workdir: Path, onnx_path: Path | None = None,
             weight_format: str | dict[str, str] = "auto", count: bool = True) -> DeviceMetrics:
    """Flash and RAM (measured), instructions per inference (measured under QEMU, C runtime, with
    ``count``) and latency and energy (estimated) of ``model`` on ``device``; an ensemble on a C device
    runs its members one after another in one arena (``evaluate_ensemble``)."""
    if isinstance(model, Ensemble) and device.runtime[0] == "c":
        return evaluate_ensemble(model, task, device, workdir, weight_format, count)
    return evaluate_model(model, task, device, workdir, onnx_path, weight_format, count)
