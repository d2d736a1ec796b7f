"""The Task: what a user brings. A model, data, a metric and an example input."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import RecipeError

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits against integer labels: correct / total, exactly (float64)."""
    return int((outputs.argmax(dim=1) == targets).sum()) / max(len(targets), 1)


METRICS: dict[str, Metric] = {"accuracy": accuracy}
FRACTIONS = {"accuracy", "cosine"}  # accuracy, and the minilm-embed task's cosine similarity


def is_fraction(metric_name: str) -> bool:
    """True when a change of the metric reads in points (hundredths); other metrics keep their own units."""
    return metric_name in FRACTIONS


def change_text(metric_name: str, change: float) -> str:
    """``+1.23 pt`` for a fraction such as accuracy, the plain difference (``+0.0379``) for any other metric."""
    return f"{change * 100:+.2f} pt" if is_fraction(metric_name) else f"{change:+.4f}"


def _loader(data: Any, batch_size: int) -> DataLoader | None:
    if data is None or isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        data = TensorDataset(*data)
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size)
    raise RecipeError(f"task data must be a DataLoader, a Dataset or an (inputs, targets) tuple; got {type(data).__name__}")


@dataclass
class Task:
    """A model to compress and the data to judge it by.

    ``eval_data`` is held out: compression never trains or calibrates on it. ``val_data`` (optional)
    is what calibration and sensitivity scans use; when absent, the first batches of ``train_data``.
    ``metric`` is a name (``"accuracy"``) or ``f(outputs, targets) -> float``; higher is better.
    """

    model: nn.Module
    train_data: Any
    eval_data: Any
    metric: str | Metric = "accuracy"
    example_input: torch.Tensor | None = None
    val_data: Any = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    teachers: list[nn.Module] = field(default_factory=list)
    name: str = "custom"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise RecipeError(f"task.model must be a torch.nn.Module; got {type(self.model).__name__}")
        self.train_data = _loader(self.train_data, self.batch_size)
        self.eval_data = _loader(self.eval_data, self.batch_size)
        self.val_data = _loader(self.val_data, self.batch_size)
        if isinstance(self.metric, str):
            if self.metric not in METRICS:
                raise RecipeError(f"task.metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.example_input is None:
            x, _ = next(iter(self.eval_data))
            self.example_input = x[:1]
        if self.loss is None:
            self.loss = nn.functional.cross_entropy

    @property
    def metric_fn(self) -> Metric:
        return METRICS[self.metric] if isinstance(self.metric, str) else self.metric

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")

    @property
    def calib_data(self) -> DataLoader:
        """Data for calibration and sensitivity scans: validation data, else training data."""
        return self.val_data if self.val_data is not None else self.train_data

    def fresh_model(self) -> nn.Module:
        """A deep copy of the task's model; the original is never edited."""
        return copy.deepcopy(self.model).eval()


@torch.no_grad()
def predict(model: nn.Module, data: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """All outputs and targets of ``model`` over ``data``, in order."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for x, y in data:
        outs.append(model(x))
        ys.append(y)
    model.train(was_training)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, task: Task, data: DataLoader | None = None) -> float:
    outputs, targets = predict(model, data if data is not None else task.eval_data)
    return float(task.metric_fn(outputs, targets))
