"""Device profiles (YAML, one file per target) and what a model costs on one.

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
  and per-byte figures the profile cites.

``check`` compares them with ``constraints: {max_flash, max_ram, max_latency_ms}`` and with the
device's own flash and RAM, naming the layer or tensor that is over and by how much.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError
from torch import nn

from ..errors import ArtifactError, RecipeError
from ..spec import Strict

log = logging.getLogger(__name__)


class Energy(Strict):
    source: str = Field(description="where the figures come from")
    pj_per_mac_int8: float = Field(gt=0)
    pj_per_mac_fp32: float = Field(gt=0)
    pj_per_byte_weights: float = Field(gt=0)
    pj_per_byte_activations: float = Field(gt=0)


class Device(Strict):
    """A deployment target: memory, clock, the runtime that executes the model, the cost model."""

    name: str
    description: str = ""
    datasheet: str = Field(default="", description="the datasheet the memory and clock figures come from")
    core: str
    runtime: Literal["c", "tflite-micro", "onnxruntime"]
    qemu_machine: str | None = Field(default=None, description="QEMU machine the C library's instructions are "
                                                               "counted on (C runtime only)")
    cycles_per_instruction: float | None = Field(default=None, gt=0, description="estimate for this core and memory")
    flash_bytes: int = Field(gt=0)
    ram_bytes: int = Field(gt=0)
    clock_hz: float = Field(gt=0)
    cycles_per_mac: float = Field(gt=0, description="estimate of the runtime's kernels on this core")
    cycles_per_byte: float = Field(ge=0)
    energy: Energy


def names() -> list[str]:
    """The shipped device profiles."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


NAMES = tuple(names())


def load_device(name: str) -> Device:
    """A shipped profile by name, or a profile YAML file by path."""
    res = resources.files(__package__).joinpath(f"{name}.yaml")
    if res.is_file():
        text, where = res.read_text(), f"{name}.yaml"
    elif Path(name).suffix in (".yaml", ".yml") and Path(name).is_file():
        text, where = Path(name).read_text(), str(name)
    else:
        raise RecipeError(f"device must be one of {', '.join(NAMES)} or a profile .yaml file; got {name!r}")
    try:
        return Device.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as e:
        raise RecipeError(f"{where}: not a valid device profile: {str(e).splitlines()[0]}") from None


@dataclass
class DeviceMetrics:
    device: str
    runtime: str
    artifact: str  # what the flash bytes are of
    precision: str  # int8 or fp32
    flash_bytes: int
    ram_bytes: int
    ram_source: str
    macs: int
    bytes_moved: int
    latency_ms_est: float
    energy_uj_est: float
    estimate_model: str
    weights_by_layer: dict[str, int] = field(default_factory=dict)
    macs_by_layer: dict[str, int] = field(default_factory=dict)
    peak_at: str = ""
    notes: list[str] = field(default_factory=list)
    instructions: int | None = None  # per inference, measured under QEMU -icount
    instructions_source: str = ""
    cycles_est: float | None = None  # instructions x the profile's cycles per instruction
    instr_latency_ms_est: float | None = None
    weight_formats: dict[str, str] = field(default_factory=dict)  # layer -> format, bytes and why (C runtime)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_quantized(model: nn.Module) -> bool:
    try:
        from ..primitives.qlayer import is_quantized
    except ImportError:
        return False
    return is_quantized(model)


def evaluate(model: nn.Module, task, device: Device, workdir: Path, onnx_path: Path | None = None,
             weight_format: str | dict[str, str] = "auto", count: bool = True) -> DeviceMetrics:
    """Flash and RAM (measured), instructions per inference (measured under QEMU, C runtime, with
    ``count``) and latency and energy (estimated) of ``model`` on ``device``. ``weight_format`` is the
    C export's (see ``export.cformats``)."""
    from ..export.lower import lower_task, plan_arena

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quantized = _is_quantized(model)
    notes: list[str] = []
    if device.runtime == "onnxruntime" and not quantized:
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
    if precision == "int8" and zeros > total_w // 10 and device.runtime != "c":
        notes.append(f"{device.name}: {zeros:,} of {total_w:,} int8 weights are zero and are stored densely "
                     "(no sparse kernels on this runtime: they save no flash and no time here)")
    counted: dict[str, Any] = {}
    if device.runtime == "c":
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
            counted["instructions"] = c.per_inference
            counted["instructions_source"] = (f"executed instructions per inference under qemu-system-arm -M {c.machine} "
                                              f"-icount shift=0 ({c.instructions_per_tick:g} per SysTick tick)")
            if device.cycles_per_instruction is not None:
                counted["cycles_est"] = c.per_inference * device.cycles_per_instruction
                counted["instr_latency_ms_est"] = counted["cycles_est"] / device.clock_hz * 1e3
    elif device.runtime == "tflite-micro":
        from ..export.tflite import tflm_arena_bytes, to_tflite

        data = to_tflite(g, int8=True)
        (workdir / "model.tflite").write_bytes(data)
        flash, artifact = len(data), "int8 .tflite file"
        ram, ram_source = tflm_arena_bytes(data), "arena TFLite Micro reports for the model"
    else:
        if onnx_path is None:
            raise RecipeError(f"device {device.name}: the ONNX file of the stage is needed")
        flash, artifact = Path(onnx_path).stat().st_size, "ONNX file"
        ram, ram_source = plan.peak * elem, "activations planned from tensor lifetimes (ONNX Runtime's own allocator may use more)"
    weights = {op.layer: (op.weight.size * elem if precision == "fp32" else op.qweight.size + 4 * op.qbias.size)
               for op in g.ops if op.weight is not None}
    if device.runtime == "c":  # weights as the C library stores them (see weight_formats)
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
    return DeviceMetrics(device.name, device.runtime, artifact, precision, int(flash), int(ram), ram_source, macs,
                         moved, latency, energy, model_text, weights, {op.layer: op.macs for op in g.ops if op.macs},
                         plan.peak_at(g, elem), notes, **counted)


def check(m: DeviceMetrics, device: Device, max_flash: int | None = None, max_ram: int | None = None,
          max_latency_ms: float | None = None) -> list[str]:
    """One line per budget the model misses: the recipe's constraints and the device's own memory."""
    out = []
    for limit, what in ((max_flash, "max_flash"), (device.flash_bytes, f"{device.name} flash")):
        if limit is not None and m.flash_bytes > limit:
            top = sorted(m.weights_by_layer.items(), key=lambda kv: -kv[1])[:3]
            out.append(f"flash: {m.flash_bytes:,} bytes ({m.artifact}) exceed {what} {limit:,} by "
                       f"{m.flash_bytes - limit:,} bytes; largest weights: "
                       + ", ".join(f"{k} {v:,} B" for k, v in top))
            break
    for limit, what in ((max_ram, "max_ram"), (device.ram_bytes, f"{device.name} RAM")):
        if limit is not None and m.ram_bytes > limit:
            out.append(f"RAM: {m.ram_bytes:,} bytes of activations ({m.ram_source}) exceed {what} {limit:,} by "
                       f"{m.ram_bytes - limit:,} bytes; {m.peak_at}")
            break
    if max_latency_ms is not None and m.latency_ms_est > max_latency_ms:
        top = sorted(m.macs_by_layer.items(), key=lambda kv: -kv[1])[:2]
        out.append(f"latency: estimated {m.latency_ms_est:.3f} ms exceeds max_latency_ms {max_latency_ms:g} by "
                   f"{m.latency_ms_est - max_latency_ms:.3f} ms; most MACs: "
                   + ", ".join(f"{k} {v:,}" for k, v in top) + f" ({m.estimate_model})")
    return out
