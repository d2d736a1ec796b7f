"""The pieces every stage spec shares: the base class and the recovery fine-tune."""
from __future__ import annotations

from typing import Literal

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
