"""The pieces every stage spec shares: the base class and the recovery fine-tune."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A recipe section: unknown keys are refused, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class FineTune(Strict):
    """Recovery training after a stage. Pruning masks and shared weights hold through every step."""

    epochs: int = Field(default=5, ge=0, le=1000)
    lr: float = Field(default=1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=65536)
    schedule: Literal["constant", "cosine"] = "cosine"


class StageSpec(Strict):
    """Base of every stage. ``stage`` names the technique in ``techniques.TECHNIQUES``."""

    stage: str
    name: str | None = Field(default=None, description="label of this stage in the report")
    finetune: FineTune | None = None
