"""Device profiles: one YAML file per target (memory, clock, core, the runtime(s) that execute a
model, the cost figures the datasheets give), and ``DeviceMetrics``, what a model measured on one
costs. Data only: the code that measures a model on a device is ``edgecompress.deploy``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ..errors import RecipeError
from ..spec import Strict, describe

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
