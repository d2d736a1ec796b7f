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
  and per-byte figures the profile cites;
- for a profile whose runtime is ONNX Runtime, ExecuTorch, Apache TVM or TensorRT (``runtime:`` may list
  several; the first decides the flash bytes), one entry per runtime (``runtimes``): the bytes of the
  file that runtime loads (the ONNX file, the ``.pte`` lowered to XNNPACK, the TVM library compiled for
  the profile's ``tvm_target``, the TensorRT-ready ONNX) and its latency on this host, timed round-robin
  with ONNX Runtime in one loop (``time_runtimes``, through ``measure.compare_latency``); a file that
  cannot run here (an aarch64 library on an x86-64 host, TensorRT without an NVIDIA GPU) says so.

``check`` compares them with ``constraints: {max_flash, max_ram, max_latency_ms}`` and with the
device's own flash and RAM, naming the layer or tensor that is over and by how much.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
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


#: runtimes that run on a microcontroller: the profile's only runtime
MCU_RUNTIMES = ("c", "tflite-micro")
#: runtimes of a Linux-class CPU or GPU: each gives an entry (bytes, latency) in a device row
HOST_RUNTIMES = ("onnxruntime", "executorch", "tvm", "tensorrt")
#: the optional extra each runtime needs, and the module that shows it is installed
EXTRAS = {"executorch": ("executorch", "ExecuTorch"), "tvm": ("tvm", "Apache TVM")}
Runtime = Literal["c", "tflite-micro", "onnxruntime", "executorch", "tvm", "tensorrt"]


class Device(Strict):
    """A deployment target: memory, clock, the runtime(s) that execute the model, the cost model."""

    name: str
    description: str = ""
    datasheet: str = Field(default="", description="the datasheet the memory and clock figures come from")
    core: str
    runtime: list[Runtime] = Field(min_length=1, description="one runtime, or a list (the first decides the "
                                                             "flash bytes)")
    tvm_target: Literal["host", "aarch64"] | None = Field(
        default=None, validate_default=True,
        description="what TVM compiles for (runtime tvm): this host (llvm) or 64-bit Arm Linux")
    qemu_machine: str | None = Field(default=None, description="QEMU machine the C library's instructions are "
                                                               "counted on (C runtime only)")
    cycles_per_instruction: float | None = Field(default=None, gt=0, description="estimate for this core and memory")
    flash_bytes: int = Field(gt=0)
    ram_bytes: int = Field(gt=0)
    clock_hz: float = Field(gt=0)
    cycles_per_mac: float = Field(gt=0, description="estimate of the runtime's kernels on this core")
    cycles_per_byte: float = Field(ge=0)
    energy: Energy

    @field_validator("runtime", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("runtime")
    @classmethod
    def _runtimes(cls, v):
        if len(set(v)) < len(v):
            raise PydanticCustomError("runtime_rule", "must not name a runtime twice")
        mcu = [r for r in v if r in MCU_RUNTIMES]
        if mcu and len(v) > 1:
            raise PydanticCustomError("runtime_rule", "{mcu} runs alone (a microcontroller runs one runtime)",
                                      {"mcu": mcu[0]})
        return v

    @field_validator("tvm_target")
    @classmethod
    def _tvm_target(cls, v, info):
        runtime = info.data.get("runtime")
        if runtime is not None and "tvm" in runtime and v is None:
            raise PydanticCustomError("tvm_target", "is required when runtime lists tvm (host or aarch64)")
        if runtime is not None and "tvm" not in runtime and v is not None:
            raise PydanticCustomError("tvm_target", "is only for runtime tvm (runtime: {runtime})",
                                      {"runtime": ", ".join(runtime)})
        return v


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
    except ValidationError as e:
        from ..recipe import describe

        raise RecipeError(f"{where}: not a valid device profile: {describe(e.errors()[0])}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not a valid device profile: {str(e).splitlines()[0]}") from None


def require_runtimes(device: Device) -> None:
    """One line naming the extra to install when a runtime of ``device`` is missing from the environment."""
    for rt in device.runtime:
        if rt in EXTRAS:
            module, what = EXTRAS[rt]
            try:
                __import__(module)
            except ImportError:
                raise RecipeError(f"device {device.name}: runtime {rt} needs {what}: "
                                  f"pip install 'edgecompress[{rt}]'") from None


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
    # one per runtime of a Linux-class profile: runtime, artifact, file, bytes, latency_ms (batch 1 on
    # this host, None: not timed), onnxruntime_ms (the row's ONNX file in the same loop), note
    runtimes: list[dict[str, Any]] = field(default_factory=list)
    # an ensemble's members, each measured alone: member, flash_bytes, ram_bytes, object_flash_bytes (its
    # object in the ensemble's library), instructions
    members: list[dict[str, Any]] = field(default_factory=list)

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
    from ..export.ir import lower_task, plan_arena
    from ..techniques.ensemble import Ensemble

    if isinstance(model, Ensemble) and device.runtime[0] == "c":  # members one after another in one arena
        from ..export.c_ensemble import evaluate as evaluate_ensemble

        return evaluate_ensemble(model, task, device, workdir, weight_format, count)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    quantized = _is_quantized(model)
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
            counted["instructions"] = c.per_inference
            counted["instructions_source"] = (f"executed instructions per inference under qemu-system-arm -M {c.machine} "
                                              f"-icount shift=0 ({c.instructions_per_tick:g} per SysTick tick)")
            if device.cycles_per_instruction is not None:
                counted["cycles_est"] = c.per_inference * device.cycles_per_instruction
                counted["instr_latency_ms_est"] = counted["cycles_est"] / device.clock_hz * 1e3
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
