"""The pieces every stage spec shares: the base class and the recovery fine-tune."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A recipe section: unknown keys are refused, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class TeacherRef(Strict):
    """A teacher: ``baseline`` (the task's model), ``task`` (the Task's own teachers), a built-in task
    name, a ``.safetensors`` file (weights for the task's architecture or ``arch``) or an ``.onnx``
    file (logits only), with its weight in an ensemble."""

    model: str = "baseline"
    arch: str | None = Field(default=None, description="architecture of a .safetensors teacher: a zoo "
                                                       "model or package.module:factory")
    weight: float = Field(default=1.0, gt=0)


class Distill(Strict):
    """Distillation added to a fine-tune: ``(1 - alpha) * task loss + alpha * T^2 KL(teacher || student)``
    plus ``feature_weight`` times the FitNets hint loss of the ``features`` pairs (student layer ->
    teacher layer; a list means the same name in both; a learned projection where widths differ)."""

    teacher: str | TeacherRef | list[str | TeacherRef] = "baseline"
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.9, ge=0, le=1)
    ensemble: Literal["probs", "logits"] = "probs"
    features: list[str] | dict[str, str] | None = None
    feature_weight: float = Field(default=1.0, ge=0)
    mixup: float = Field(default=0.0, ge=0, le=10, description="train on mixup batches, lambda ~ Beta(mixup, "
                         "mixup), labelled by the teachers (function matching) and the mixed labels; 0 = off")


class FineTune(Strict):
    """Recovery training after a stage. Pruning masks and shared weights hold through every step."""

    epochs: int = Field(default=5, ge=0, le=1000)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=65536)
    schedule: Literal["constant", "cosine"] = "cosine"
    distill: Distill | None = Field(default=None, description="add a distillation loss (see Distill)")


class StageSpec(Strict):
    """Base of every stage. ``stage`` names the technique in ``techniques.TECHNIQUES``."""

    stage: str
    name: str | None = Field(default=None, description="label of this stage in the report")
    finetune: FineTune | None = None


# ---- one line per validation error ------------------------------------------------------------

def _loc(loc: tuple, stages: Mapping[str, type[BaseModel]]) -> str:
    """('stages', 0, 'prune', 'sparsity') -> 'stages[0].sparsity' (the union tag is dropped)."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in stages and out.startswith("stages"):
            pass
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out or "recipe"


_RULES = {
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def describe(err: dict[str, Any], stages: Mapping[str, type[BaseModel]] | None = None) -> str:
    """One line from a pydantic error: the field, the rule, the value. ``stages``: the stage specs by
    stage name, when the validated data holds stages (a recipe, an ensemble's members)."""
    stages = stages or {}
    kind, ctx, loc = err["type"], err.get("ctx", {}), _loc(err["loc"], stages)
    value = err.get("input")
    if kind == "extra_forbidden":
        tag = next((p for p in err["loc"] if isinstance(p, str) and p in stages), None)
        known = f" (a {tag} stage takes: {', '.join(stages[tag].model_fields)})" if tag and len(err["loc"]) == 4 else ""
        return f"{loc} is not a known key{known}; got {value!r}"
    if kind == "missing":
        return f"{loc} is required"
    if kind == "spec_rule":  # a stage's own cross-field rule; ctx["line"] starts with the field name
        return f"{loc}.{ctx['line']}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        known = ", ".join(stages)
        got = ctx.get("tag", "nothing")
        return f"{loc}.stage must be one of {known}; got {got!r}" if kind == "union_tag_invalid" \
            else f"{loc}.stage is required (one of {known})"
    if kind in ("literal_error", "enum"):
        expected = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{loc} must be one of {expected}; got {value!r}"
    rule = _RULES.get(kind)
    if rule:
        return f"{loc} {rule.format(**ctx)}; got {value!r}"
    return f"{loc} {err['msg'].lower()}; got {value!r}"
