"""Argument checks of the public functions: a wrong type is one ``TypeError`` naming the function, the
parameter, what it takes and what it got, e.g. ``measure(): task must be an edgecompress.Task or a task
name such as 'digits-lenet300'; got int``."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .task import Task

TASK = "an edgecompress.Task or a task name such as 'digits-lenet300'"
TASK_OR_NONE = TASK + " or None (the recipe's task)"


def check(fn: str, name: str, value: Any, types: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, types):
        raise TypeError(f"{fn}(): {name} must be {what}; got {type(value).__name__}")


def path(fn: str, value: Any, name: str = "path", *, optional: bool = False) -> None:
    types = (str, os.PathLike, type(None)) if optional else (str, os.PathLike)
    check(fn, name, value, types, "a path (str or os.PathLike)" + (" or None" if optional else ""))


def model(fn: str, value: Any) -> None:
    check(fn, "model", value, nn.Module, "a torch.nn.Module")


def tensor(fn: str, value: Any, name: str = "example_input") -> None:
    check(fn, name, value, torch.Tensor, "a torch.Tensor")


def exporter(fn: str, m: Any, example_input: Any, where: Any, where_name: str = "path") -> None:
    """What every model exporter takes: a model, an example input and the path to write."""
    model(fn, m)
    tensor(fn, example_input)
    path(fn, where, where_name)


def task(fn: str, value: Any, progress=None) -> Task:
    """``value`` itself when a Task; a name (built-in, or ``package.module:factory``) loads that task."""
    check(fn, "task", value, (Task, str), TASK)
    if isinstance(value, Task):
        return value
    from .zoo import load_task

    return load_task(value, progress)
