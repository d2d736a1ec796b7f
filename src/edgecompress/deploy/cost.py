"""What a model costs on a device.

``device: cortex-m4`` in a recipe makes every report row carry, for that target:

- flash bytes, real: of the artifact the target runs (the C library as ``arm-none-eabi-size`` reports
  it for the profile's core, the .tflite file for TFLite Micro, the ONNX file for ONNX Runtime);
- peak activation RAM, real: the arena planned from tensor lifetimes (C, ONNX Runtime), or the arena
  TFLite Micro itself reports for the model;
- instructions per inference, measured: the C library run under ``qemu-system-arm -icount shift=0``
  on the QEMU machine the profile names (``export.c.count_instructions``), and from them cycles and
  milliseconds with the profile's cycles per instruction and clock (estimates, labelled);
- latency and energy, estimates, labelled as such: ``MACs x cycles_per_mac + bytes moved x
  cycles_per_byte`` over the clock, and ``MACs x pJ/MAC + bytes moved x pJ/byte`` with the per-operation
  and per-byte figures the profile cites;
- for a profile whose runtime is ONNX Runtime, ExecuTorch, Apache TVM or TensorRT (``runtime:`` may list
  several; the first decides the flash bytes), one entry per runtime (``runtimes``): the bytes of the
  file that runtime loads (the ONNX file, the ``.pte`` lowered to XNNPACK, the TVM library compiled for
  the profile's ``tvm_target``, the TensorRT-ready ONNX) and its latency on this host, timed round-robin
  with ONNX Runtime in one loop (``deploy.runtimes.time_runtimes``, through ``measure.compare_latency``); a file that
  cannot run here (an aarch64 library on an x86-64 host, TensorRT without an NVIDIA GPU) says so.

``deploy.budgets.check`` compares them with ``constraints: {max_flash, max_ram, max_latency_ms}`` and with the
device's own flash and RAM, naming the layer or tensor that is over and by how much.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..devices import HOST_RUNTIMES, Device, DeviceMetrics
from ..errors import ArtifactError, RecipeError
from ..primitives.qlayer import is_quantized
from .runtimes import runtime_files


def evaluate_model(model: nn.Module, task, device: Device, workdir: Path, onnx_path: Path | None = None,
                   weight_format: str | dict[str, str] = "auto", count: bool = True) -> DeviceMetrics:
    """Flash and RAM (measured), instructions per inference (measured under QEMU, C runtime, with
    ``count``) and latency and energy (estimated) of ``model`` on ``device``. ``weight_format`` is the
    C export's (see ``export.cformats``)."""
    from ..export.ir import lower_task, plan_arena

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quantized = is_quantized(model)
    notes: list[str] = []
    primary = device.runtime[0]
    if primary in HOST_RUNTIMES and not quantized:
        g = lower_task(model, task, device.name, quantize=False)
        precision, elem = "fp32", 4
    else:
        g = lower_task(model, task, device.name)
        precision, elem = "int8", 1
        if not quantized:
            notes.append(f"{device.name}: int8 from min-max calibration of the float model on calibration data "
                         "(add a quantize stage to choose the quantization)")
        notes += [f"{device.name}: {n}" for n in g.notes]
    plan = plan_arena(g)
    zeros = sum(int((op.qweight == 0).sum()) for op in g.ops if op.qweight is not None)
    total_w = sum(op.qweight.size for op in g.ops if op.qweight is not None)
    if precision == "int8" and zeros > total_w // 10 and primary != "c":
        notes.append(f"{device.name}: {zeros:,} of {total_w:,} int8 weights are zero and are stored densely "
                     "(no sparse kernels on this runtime: they save no flash and no time here)")
    counted: dict[str, Any] = {}
    if primary == "c":
        from ..export.c import TARGETS, arm_size, count_instructions, export_c, have_toolchain

        if device.core not in TARGETS:
            raise RecipeError(f"device {device.name}: core must be one of {', '.join(TARGETS)} for the C runtime; "
                              f"got {device.core!r}")
        exp = export_c(g, workdir, name="model", weight_format=weight_format)
        size = arm_size(exp, device.core)
        flash, artifact = size.flash, f"C library for {device.core} (arm-none-eabi-size text+data)"
        ram, ram_source = max(plan.peak, size.ram), "static arena planned from tensor lifetimes"
        counted["weight_formats"] = dict(zip(exp.formats, exp.format_lines()))
        c = None
        if count and have_toolchain():
            import torch

            x = torch.cat([xb for xb, _ in task.eval_data])[:2]
            try:
                c = count_instructions(exp, g.quantize_input(x), device.core)
            except ArtifactError as e:  # e.g. the library is larger than the QEMU machine's memory
                notes.append(f"{device.name}: instructions not counted under QEMU ({e})")
        if c is not None:
            counted.update(counted_instructions(c, device))
    elif primary == "tflite-micro":
        from ..export.tflite import tflm_arena_bytes, to_tflite

        data = to_tflite(g, int8=True)
        (workdir / "model.tflite").write_bytes(data)
        flash, artifact = len(data), "int8 .tflite file"
        ram, ram_source = tflm_arena_bytes(data), "arena TFLite Micro reports for the model"
    else:
        if onnx_path is None:
            raise RecipeError(f"device {device.name}: the ONNX file of the stage is needed")
        counted["runtimes"] = runtime_files(model, task, device, workdir, Path(onnx_path), quantized)
        flash, artifact = counted["runtimes"][0]["bytes"], counted["runtimes"][0]["artifact"]
        ram, ram_source = plan.peak * elem, "activations planned from tensor lifetimes (ONNX Runtime's own allocator may use more)"
    weights = {op.layer: (op.weight.size * elem if precision == "fp32" else op.qweight.size + 4 * op.qbias.size)
               for op in g.ops if op.weight is not None}
    if primary == "c":  # weights as the C library stores them (see weight_formats)
        weights = {op.layer: exp.formats[op.layer].nbytes + 4 * op.qbias.size for op in g.ops if op.weight is not None}
    act_bytes = sum((sum(g.tensors[i].size for i in op.inputs) + g.tensors[op.output].size) * elem
                    for op in g.ops if op.kind != "reshape")
    w_bytes = sum(weights.values())
    macs = g.macs
    e = device.energy
    pj_mac = e.pj_per_mac_int8 if precision == "int8" else e.pj_per_mac_fp32
    moved = w_bytes + act_bytes
    latency = (macs * device.cycles_per_mac + moved * device.cycles_per_byte) / device.clock_hz * 1e3
    energy = (macs * pj_mac + w_bytes * e.pj_per_byte_weights + act_bytes * e.pj_per_byte_activations) * 1e-6
    model_text = (f"{macs:,} MACs x {device.cycles_per_mac} cycles + {moved:,} bytes moved x "
                  f"{device.cycles_per_byte} cycles at {device.clock_hz / 1e6:g} MHz; energy {pj_mac} pJ/MAC, "
                  f"{e.pj_per_byte_weights} pJ/weight byte, {e.pj_per_byte_activations} pJ/activation byte "
                  f"(arithmetic and memory access only, no static power; {e.source.split(':')[0]})")
    return DeviceMetrics(device.name, primary, artifact, precision, int(flash), int(ram), ram_source, macs,
                         moved, latency, energy, model_text, weights, {op.layer: op.macs for op in g.ops if op.macs},
                         plan.peak_at(g, elem), notes, **counted)




def counted_instructions(c, device: Device, what: str = "") -> dict[str, Any]:
    """The DeviceMetrics fields of one QEMU count (``export.c`` ``Count``): instructions per inference,
    where they come from, and the cycles and milliseconds the profile's cycles per instruction make of
    them (estimates)."""
    out: dict[str, Any] = {
        "instructions": c.per_inference,
        "instructions_source": f"executed instructions per inference{what} under qemu-system-arm -M {c.machine} "
                               f"-icount shift=0 ({c.instructions_per_tick:g} per SysTick tick)"}
    if device.cycles_per_instruction is not None:
        out["cycles_est"] = c.per_inference * device.cycles_per_instruction
        out["instr_latency_ms_est"] = out["cycles_est"] / device.clock_hz * 1e3
    return out
