"""Recipes: YAML validated by pydantic, refused before any work with one line naming the field."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .devices import NAMES as DEVICES
from .export.cformats import CHOICES as C_FORMATS
from .errors import RecipeError
from .robustness import RobustnessSpec
from .spec import Strict, describe as describe_error
from .techniques import TECHNIQUES

STAGE_SPECS = {name: spec_cls for name, (spec_cls, _) in TECHNIQUES.items()}
Stage = Annotated[Union[tuple(spec for spec, _ in TECHNIQUES.values())], Field(discriminator="stage")]  # type: ignore[valid-type]


class Constraints(Strict):
    """Checked against the final stage; a miss gives exit code 1 with the report still written."""

    max_metric_drop: float | None = Field(default=None, ge=0, description="in metric units (0.01 = 1 point)")
    max_flash: int | None = Field(default=None, ge=1, description="bytes of the artifact on the device (needs device)")
    max_ram: int | None = Field(default=None, ge=1, description="bytes of peak activation RAM (needs device)")
    max_latency_ms: float | None = Field(default=None, gt=0, description="estimated latency on the device (needs device)")
    max_bytes: int | None = Field(default=None, ge=1, description="bytes of the stored artifact (the report's bytes)")


class MeasureSpec(Strict):
    latency: bool = True
    threads: int = Field(default=1, ge=1, le=256)
    batches: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1, 64], min_length=1)
    repeats: int = Field(default=30, ge=1, le=10000)
    instructions: bool = Field(default=True, description="count the C library's executed instructions per "
                               "inference under QEMU (devices with the C runtime)")
    robustness: RobustnessSpec | None = Field(default=None, description="the metric under input corruptions, "
                                              "for every row (see robustness.py)")


class CSpec(Strict):
    """The C export: each layer's weight format, ``auto`` (the fewest flash bytes) or forced, for every
    layer or by layer name (others auto). A format a layer cannot hold falls back, said in the report."""

    format: str | dict[str, str] = "auto"

    @field_validator("format", mode="before")
    @classmethod
    def _known(cls, value):
        values = value.values() if isinstance(value, dict) else [value]
        bad = next((v for v in values if v not in C_FORMATS), None)
        if bad is not None or not isinstance(value, (str, dict)):
            rule = "must map layer names to one of" if isinstance(value, dict) else "must be one of"
            raise PydanticCustomError("c_format", f"{rule} {', '.join(C_FORMATS)}")
        return value


class Recipe(Strict):
    """An ordered list of stages, the task they apply to, constraints and exports."""

    version: Literal[1] = 1
    task: str | None = Field(default=None, description="built-in task name or package.module:factory")
    seed: int = Field(default=0, ge=0)
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]
    constraints: Constraints = Field(default_factory=Constraints)
    export: list[Literal["onnx", "ecz", "tflite", "c", "onnx-tensorrt", "tvm", "pte"]] = Field(default_factory=lambda: ["onnx"])
    device: Literal[DEVICES] | None = Field(default=None, description="device profile: flash, RAM, latency and "  # type: ignore[valid-type]
                                           "energy per stage in the report")
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    c: CSpec = Field(default_factory=CSpec, description="the C export and device rows: weight format per layer")

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of keys to values; got {type(data).__name__}")
        if "search" in data:
            raise RecipeError(f"{source}: search: this recipe is a search space; run it with "
                              f"`edgecompress search {source}`")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{source}: {describe(e.errors()[0])}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        return cls.from_dict(read_yaml(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def read_yaml(path: str | os.PathLike) -> Any:
    """The data of a recipe file; a missing file, malformed YAML, a key given twice or bytes that are
    not UTF-8 give one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        text = path.read_text()
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), str(path))
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: a recipe must be UTF-8 text; byte {e.start} is not") from None


def _refuse_duplicate_keys(node: yaml.Node | None, source: str, where: str = "") -> None:
    """PyYAML keeps the last of two equal keys; a recipe refuses them (the first value would be lost)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            field = f"{where}.{name}" if where else name
            if name in seen:
                raise RecipeError(f"{source}: {field} is given twice (lines {seen[name]} and "
                                  f"{key.start_mark.line + 1}); keep one")
            seen[name] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, source, field)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{where}[{i}]")


def describe(err: dict[str, Any]) -> str:
    """One line from a pydantic error in a recipe: the field, the rule, the value."""
    return describe_error(err, STAGE_SPECS)


def schema() -> dict[str, Any]:
    """The JSON Schema of a recipe (written to recipe.schema.json in the repository)."""
    return Recipe.model_json_schema()


def write_schema(path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(schema(), indent=2, sort_keys=True) + "\n")
