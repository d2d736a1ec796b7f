"""Robustness: the task's metric on its test split under seeded input corruptions.

``measure: {robustness: {gaussian_noise: [0.05, 0.1], shift: [1, 2]}}`` measures every report row
under each corruption at each level; the report gives each value and its change against the
baseline's under the same corruption. The corruptions are the same for every row (one seed), so the
rows are compared on identical inputs.

- ``gaussian_noise``: additive N(0, level^2), level in input units (digits are in [0, 1], MNIST-1D
  inputs have standard deviation 1).
- ``shift``: each input translated by ``level`` pixels (images: up, down, left or right; sequences:
  left or right; the direction drawn per input), the vacated border filled with zeros.
- ``mnist1d`` (MNIST-1D tasks only): the test split generated again by the ``mnist1d`` package with
  one of its own arguments changed (``corr_noise_scale``, ``iid_noise_scale``, ``shear_scale``,
  ``scale_coeff``): the same digits, templates and random draws, only noisier or more sheared.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch.utils.data import DataLoader, TensorDataset

from .errors import RecipeError
from .spec import Strict
from .task import Task

Level = Annotated[float, Field(gt=0, le=100)]
MNIST1D_ARGS = ("corr_noise_scale", "iid_noise_scale", "shear_scale", "scale_coeff")


class RobustnessSpec(Strict):
    """Corruptions of the test split and their levels; every report row is measured under each."""

    gaussian_noise: list[Level] = Field(default_factory=list, description="standard deviations of additive "
                                        "Gaussian noise, in input units")
    shift: list[Annotated[int, Field(ge=1, le=64)]] = Field(default_factory=list, description="translations in "
                                                            "pixels (direction drawn per input)")
    mnist1d: dict[Literal[MNIST1D_ARGS], list[Annotated[float, Field(ge=0, le=100)]]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="MNIST-1D tasks: the test split regenerated with this mnist1d argument "
        "set to each value (defaults: corr_noise_scale 0.25, iid_noise_scale 0.02, shear_scale 0.75, "
        "scale_coeff 0.4)")
    seed: int = Field(default=0, ge=0, description="seed of the noise and the shift directions")

    def keys(self) -> list[str]:
        """The names of the measurements, in order: ``gaussian_noise=0.1``, ``shift=2``, ``mnist1d.shear_scale=1.5``."""
        return [f"gaussian_noise={v:g}" for v in self.gaussian_noise] + [f"shift={k}" for k in self.shift] + \
            [f"mnist1d.{a}={v:g}" for a, vs in self.mnist1d.items() for v in vs]


def _is_mnist1d(task: Task) -> bool:
    from .zoo import BUILTINS, data

    return task.name in BUILTINS and BUILTINS[task.name].data is data.mnist1d


def check(spec: RobustnessSpec, task: Task, field: str = "measure.robustness") -> None:
    """Refuse corruptions the task's inputs cannot take, before any work (one line each)."""
    x = task.example_input
    if (spec.gaussian_noise or spec.shift) and not x.is_floating_point():
        what = "gaussian_noise" if spec.gaussian_noise else "shift"
        raise RecipeError(f"{field}.{what} needs float inputs; task {task.name} has {str(x.dtype).removeprefix('torch.')} "
                          "inputs")
    if spec.shift and x.dim() not in (3, 4):
        raise RecipeError(f"{field}.shift needs image (N, C, H, W) or sequence (N, C, L) inputs; task {task.name} has "
                          f"inputs of shape {tuple(x.shape)}")
    if spec.mnist1d and not _is_mnist1d(task):
        raise RecipeError(f"{field}.mnist1d applies to MNIST-1D tasks (mnist1d-cnn); got task {task.name}")


def gaussian_noise(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    return x + level * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each input moved ``pixels`` along one spatial axis (direction drawn per input), zeros filling in."""
    axes = (2, 3) if x.dim() == 4 else (2,)
    moves = [(a, s * pixels) for a in axes for s in (1, -1)]
    pick = torch.randint(len(moves), (len(x),), generator=gen)
    out = torch.zeros_like(x)
    for i, (axis, step) in enumerate(moves):
        rows = pick == i
        if not rows.any():
            continue
        moved = torch.roll(x[rows], step, dims=axis)
        edge = [slice(None)] * x.dim()
        edge[axis] = slice(0, step) if step > 0 else slice(step, None)
        moved[tuple(edge)] = 0
        out[rows] = moved
    return out


@lru_cache(maxsize=8)
def mnist1d_test(arg: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-1D's test split made again by ``mnist1d.make_dataset`` with ``arg`` set to ``value``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    setattr(args, arg, value)
    d = make_dataset(args)
    return torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1), torch.tensor(d["y_test"], dtype=torch.long)


def corrupted(spec: RobustnessSpec, task: Task) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, inputs, targets) of every corruption of the test split, in ``spec.keys()`` order."""
    xs = torch.cat([x for x, _ in task.eval_data])
    ys = torch.cat([y for _, y in task.eval_data])
    out = []
    for i, level in enumerate(spec.gaussian_noise):
        gen = torch.Generator().manual_seed(spec.seed * 1000 + i)
        out.append((f"gaussian_noise={level:g}", gaussian_noise(xs, level, gen), ys))
    for i, pixels in enumerate(spec.shift):
        gen = torch.Generator().manual_seed(spec.seed * 1000 + 500 + i)
        out.append((f"shift={pixels}", shift(xs, pixels, gen), ys))
    for arg, values in spec.mnist1d.items():
        for v in values:
            x, y = mnist1d_test(arg, float(v))
            out.append((f"mnist1d.{arg}={v:g}", x, y))
    return out


def measure_robustness(forward: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], task: Task,
                       spec: RobustnessSpec | dict) -> dict[str, float]:
    """The task's metric under every corruption of ``spec``: ``{"gaussian_noise=0.1": 0.91, ...}``.
    ``forward`` is a torch module (run batch by batch like the clean metric) or a function of a batch."""
    from .task import predict

    spec = spec if isinstance(spec, RobustnessSpec) else RobustnessSpec.model_validate(spec)
    check(spec, task)
    result = {}
    for key, x, y in corrupted(spec, task):
        if isinstance(forward, torch.nn.Module):
            out, _ = predict(forward, DataLoader(TensorDataset(x, y), batch_size=task.batch_size))
        else:
            out = forward(x)
        result[key] = float(task.metric_fn(out, y))
    return result
