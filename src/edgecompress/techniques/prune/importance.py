"""How important each weight is: one callable per criterion, asked by every pruning path.

An importance is called as ``importance(model, params, step) -> {name: scores}`` (higher = keep) for
named parameters of ``model``, the way Torch-Pruning calls ``Importance.__call__(group)`` for a
group of coupled layers. What a score is attached to is the importance's ``reads``:

- ``"weights"``: one score per entry, the parameter's shape (magnitude, taylor, random);
- ``"inputs"``: one score per input channel of the layer holding the weight (activation statistics).

The unstructured masks, the sensitivity scans and the channel groups all ask the same callable, so
a new criterion is one class here and one line in ``from_spec``. ``step`` counts the prune rounds
of a stage: random scores draw from a generator seeded by it; the other criteria ignore it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from ...context import Context, calibration_batches
from ...layers import parent
from ...primitives import saliency
from .spec import PruneSpec

Reads = Literal["weights", "inputs"]


class Importance(Protocol):
    """Scores of the entries (``reads == "weights"``) or input channels (``"inputs"``) of each of
    ``params``, keyed as ``params`` is; higher means keep."""

    reads: ClassVar[Reads]

    def __call__(self, model: nn.Module, params: Mapping[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        ...


def _grads(model: nn.Module, params: Mapping[str, nn.Parameter], spec: PruneSpec, ctx: Context) -> dict[str, list]:
    """Gradients of the task loss for each of ``params``, one per calibration batch (eval mode)."""
    was = model.training
    model.eval()
    grads: dict[str, list] = {n: [] for n in params}
    saved = {n: p.grad for n, p in model.named_parameters()}
    try:
        with torch.enable_grad():
            for x, y in calibration_batches(ctx.task, spec.calib_batches):
                model.zero_grad(set_to_none=True)
                ctx.task.loss(model(x), y).backward()
                for n, p in params.items():
                    grads[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    finally:
        for n, p in model.named_parameters():
            p.grad = saved[n]
        model.train(was)
    return grads


@dataclass(frozen=True)
class Magnitude:
    """|w|^p: the ranking of single entries is the same for p = 1 and 2; p matters once entries are
    summed into channels."""

    norm: int = 1
    reads: ClassVar[Reads] = "weights"

    def __call__(self, model: nn.Module, params: Mapping[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        return {n: saliency.magnitude(p.detach(), self.norm) for n, p in params.items()}


@dataclass(frozen=True)
class Taylor:
    """|gradient x weight| of the task loss, averaged over ``spec.calib_batches`` calibration batches."""

    spec: PruneSpec
    ctx: Context
    reads: ClassVar[Reads] = "weights"

    def __call__(self, model: nn.Module, params: Mapping[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        grads = _grads(model, params, self.spec, self.ctx)
        return {n: saliency.taylor(p.detach(), grads[n]) for n, p in params.items()}


@dataclass(frozen=True)
class Random:
    """Uniform scores from ``ctx.generator(step)``, drawn in the order of ``params`` (a baseline)."""

    ctx: Context
    reads: ClassVar[Reads] = "weights"

    def __call__(self, model: nn.Module, params: Mapping[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        gen = self.ctx.generator(step)
        return {n: saliency.random_scores(p.shape, gen) for n, p in params.items()}


@dataclass(frozen=True)
class Activation:
    """Per input channel of the layer holding each weight, over the calibration batches: mean
    |activation| (``spec.activation`` mean), or 1 - APoZ (apoz)."""

    spec: PruneSpec
    ctx: Context
    reads: ClassVar[Reads] = "inputs"

    def __call__(self, model: nn.Module, params: Mapping[str, nn.Parameter], step: int = 0) -> dict[str, torch.Tensor]:
        spec, ctx = self.spec, self.ctx
        layers = {n: parent(model, n)[0] for n in params}
        acc: dict[nn.Module, list] = {}

        def hook(m, inputs):
            x = inputs[0]
            s, z, c = saliency.activation_stats(x, saliency.channel_dim(x))
            if m in acc:
                acc[m][0] += s
                acc[m][1] += z
                acc[m][2] += c
            else:
                acc[m] = [s, z, c]

        hooks = [m.register_forward_pre_hook(hook) for m in layers.values()]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in calibration_batches(ctx.task, spec.calib_batches):
                    model(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        if spec.activation == "apoz":
            scores = {m: 1 - saliency.apoz(z, c) for m, (_, z, c) in acc.items()}
        else:
            scores = {m: saliency.mean_activation(s, c) for m, (s, _, c) in acc.items()}
        return {n: scores[m] for n, m in layers.items() if m in scores}


def from_spec(spec: PruneSpec, ctx: Context) -> Importance:
    """The importance a stage's ``criterion`` names (``norm`` and ``activation`` its parameters)."""
    if spec.criterion == "taylor":
        return Taylor(spec, ctx)
    if spec.criterion == "random":
        return Random(ctx)
    if spec.criterion == "activation":
        return Activation(spec, ctx)
    return Magnitude(spec.norm)
