"""The files a Linux-class device's runtimes load (ONNX, ExecuTorch .pte, TVM library, TensorRT-ready
ONNX), and their batch-1 latency on this host beside ONNX Runtime, timed in one loop."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from torch import nn

from ..devices import Device, DeviceMetrics
from ..errors import RecipeError


def _build(rt: str, model: nn.Module, task, device: Device, workdir: Path, onnx_path: Path,
           int8: bool) -> tuple[Path, str, str]:
    """The file runtime ``rt`` loads, what it is, and why it is not timed here ("" when it is)."""
    tag = "int8" if int8 else "fp32"
    if rt == "onnxruntime":
        return onnx_path, "ONNX file", ""
    if rt == "executorch":
        from ..export.pte import export_pte

        path = export_pte(model, task.example_input, workdir / "model.pte", int8=int8)
        return path, f"ExecuTorch .pte lowered to XNNPACK ({tag})", ""
    if rt == "tvm":
        from ..export import tvm

        if device.tvm_target == "host":
            return tvm.export_library(onnx_path, workdir / "model.so"), f"TVM library for this host, llvm ({tag})", ""
        path = tvm.export_library(onnx_path, workdir / "model-aarch64.so", tvm.AARCH64)
        return (path, f"TVM library for aarch64 Linux ({tag})",
                f"not measured: cannot run here (an aarch64 library, this host is {platform.machine()})")
    no_gpu = "not measured: TensorRT needs an NVIDIA GPU and none is here; the file was not built by TensorRT"
    if not int8:
        return onnx_path, "ONNX file (TensorRT builds its fp32/fp16 engine from it)", no_gpu
    from ..export.tensorrt import export_tensorrt

    path = export_tensorrt(model, task.example_input, workdir / "model-tensorrt.onnx")
    return path, "TensorRT-ready ONNX (symmetric int8 Q/DQ)", no_gpu


def runtime_files(model: nn.Module, task, device: Device, workdir: Path, onnx_path: Path,
                  int8: bool) -> list[dict[str, Any]]:
    """One entry per runtime of ``device``: the file it loads (written into ``workdir``) and its bytes.
    A runtime after the first that cannot take the model gives its one line as the entry's note."""
    out = []
    for rt in device.runtime:
        e: dict[str, Any] = {"runtime": rt, "artifact": "", "file": "", "bytes": None, "latency_ms": None,
                             "onnxruntime_ms": None, "note": ""}
        try:
            path, e["artifact"], e["note"] = _build(rt, model, task, device, workdir, onnx_path, int8)
        except RecipeError as err:
            if rt == device.runtime[0]:
                raise RecipeError(f"device {device.name}: {err}") from None
            e["note"] = f"not built: {err}"
        else:
            e["file"], e["bytes"] = str(path), Path(path).stat().st_size
        out.append(e)
    return out


def _runner(e: dict[str, Any], threads: int):
    if e["runtime"] == "executorch":
        from ..export.pte import runner
    else:
        from ..export.tvm import runner
    return runner(e["file"], threads=threads)


def time_runtimes(devs: list[DeviceMetrics | None], onnx_paths: list, example, threads: int = 1,
                  repeats: int = 30) -> None:
    """Batch-1 latency of every runtime file of every row that runs on this host, timed round-robin in
    one loop (``measure.compare_latency``) with each row's ONNX file in ONNX Runtime; fills the entries'
    ``latency_ms`` and ``onnxruntime_ms``. Files no longer on disk are left untimed."""
    from ..measure import compare_latency

    fns: list = []
    slots: list[tuple[dict[str, Any], int, int]] = []  # (entry, its run, the row's ONNX Runtime run)
    for d, onnx_path in zip(devs, onnx_paths):
        entries = [e for e in (d.runtimes if d is not None else []) if e["file"] and not e["note"]
                   and Path(e["file"]).is_file()]
        if not entries or not Path(onnx_path).is_file():
            continue
        ort = len(fns)
        fns.append(onnx_path)
        for e in entries:
            if e["runtime"] == "onnxruntime":
                slots.append((e, ort, ort))
            else:
                slots.append((e, len(fns), ort))
                fns.append(_runner(e, threads))
    if not fns:
        return
    lat = compare_latency(fns, example, (1,), threads, repeats)
    for e, i, ort in slots:
        e["latency_ms"], e["onnxruntime_ms"] = lat[i]["b1"], lat[ort]["b1"]
