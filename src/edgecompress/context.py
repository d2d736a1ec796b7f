"""What a technique gets besides the model and its spec."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .finetune import AfterStep, ExtraLoss, Progress, finetune, zero_masks
from .spec import FineTune
from .task import Task

if TYPE_CHECKING:
    from .devices import Device


def calibration_batches(task: Task, batches: int) -> Iterator:
    """The first ``batches`` batches of the task's calibration data (its validation split when it has
    one, never test data), as the loader yields them. The one calibration loop: quantization
    observers, pruning scores and the integer lowering all draw their batches here."""
    return itertools.islice(task.calib_data, batches)


@dataclass
class StageLog:
    """Every layer a stage touched or skipped, with what was done or why not."""

    touched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    task: Task
    seed: int
    where: str = ""
    progress: Progress | None = None
    workdir: Path | None = None
    log: StageLog = field(default_factory=StageLog)
    extra_loss: ExtraLoss | None = None
    finetuned: bool = False
    inspect: bool = True  # stages may export to say which kernels ran; off for internal probes
    #: how a stage that runs other stages (an ensemble's members) runs each: (model, spec, ctx) -> model,
    #: the pipeline's own ``run_stage`` (its technique, then its recovery fine-tune)
    run_stage: Callable[[nn.Module, object, Context], nn.Module] | None = None
    device: Device | None = None  # the recipe's device profile, loaded once per run

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def finetune(self, model: nn.Module, spec: FineTune, *, masks: dict[str, torch.Tensor] | None = None,
                 after_step: Sequence[AfterStep] = (), label: str | None = None) -> nn.Module:
        """Recovery fine-tune on the task's training data; zeros already in the weights stay zero."""
        self.finetuned = True
        return finetune(model, self.task.train_data, spec, loss=self.task.loss, seed=self.seed,
                        masks=zero_masks(model) if masks is None else masks, extra_loss=self.extra_loss,
                        after_step=after_step, progress=self.progress,
                        label=label or f"{self.where} fine-tune")
