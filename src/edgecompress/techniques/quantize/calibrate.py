"""Calibration: observers of activation ranges, run over the task's calibration batches."""
from __future__ import annotations

import torch
from torch import nn

from ...context import Context, calibration_batches
from ...errors import RecipeError
from ...primitives import observers
from .gptq import gptq_columns
from .spec import QuantizeSpec, act_spec


def observer(spec: QuantizeSpec) -> observers.Observer:
    """A fresh observer of one activation, of the kind the spec names."""
    kw = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
    return observers.observer(spec.observer, act_spec(spec), **kw)


def require_calibration(spec: QuantizeSpec, ctx: Context) -> None:
    if ctx.task.calib_data is None:
        raise RecipeError(f"{ctx.where}.mode {spec.mode} needs calibration data (task.val_data or "
                          f"task.train_data); got none")


def run_hooked(model: nn.Module, hooks: list, ctx: Context, n: int) -> None:
    """Run ``n`` calibration batches through ``model``, then remove ``hooks`` whatever happens."""
    try:
        for x, _ in calibration_batches(ctx.task, n):
            model(x)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def observe(model: nn.Module, names: list[str], acts: dict[str, nn.Module | None], spec: QuantizeSpec,
            ctx: Context, want_inputs: set[str], want_outputs: set[str]):
    """Calibrate input/output observers of the chosen layers (outputs after the fused activation);
    also collect the inputs' Gram matrices for GPTQ."""
    obs_in = {n: observer(spec) for n in want_inputs}
    obs_out = {n: observer(spec) for n in want_outputs}
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0]
            if name in obs_in:
                obs_in[name].observe(x)
            if name in obs_out:
                a = acts.get(name)
                obs_out[name].observe(a(out) if a is not None else out)
            if spec.rounding == "gptq" and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                x2 = gptq_columns(mod, x)
                grams[name] = grams.get(name, 0) + x2.transpose(-1, -2) @ x2
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    run_hooked(model, hooks, ctx, spec.calib_batches)
    return ({n: o.result() for n, o in obs_in.items()}, {n: o.result() for n, o in obs_out.items()}, grams)
