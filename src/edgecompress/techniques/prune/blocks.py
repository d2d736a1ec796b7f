"""Block pruning: the least important shape-preserving blocks (residual bodies, transformer layers)
taken out of the forward pass, ranked by how much the calibration loss rises without each alone."""
from __future__ import annotations

import torch
from torch import nn

from ...context import Context, calibration_batches
from ...layers import forward_with_hooks, parent, replace, select, weighted_layers
from ...primitives import saliency
from .spec import PruneSpec


def _shape_preserving(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Outermost named modules holding a Linear/Conv whose output has their input's shape; one that
    holds a stack of such blocks (a Sequential or ModuleList of them, itself or as a child, as
    ``nn.TransformerEncoder.layers``) gives way to the blocks of the stack."""
    same = _all_shape_preserving(model, example)
    held = [n for n, m in model.named_modules() if n in same and weighted_layers(m)]
    modules = dict(model.named_modules())

    def outermost(names: list[str]) -> list[str]:
        out: list[str] = []
        for n in sorted(names, key=lambda n: n.count(".")):
            if not any(n.startswith(p + ".") for p in out):
                out.append(n)
        return out

    def stack(n: str) -> list[str]:
        inner = outermost([m for m in held if m.startswith(n + ".")])
        parents = {m.rpartition(".")[0] for m in inner}
        if len(inner) >= 2 and len(parents) == 1 and isinstance(modules[parents.pop()], (nn.Sequential, nn.ModuleList)):
            return [b for m in inner for b in stack(m)]
        return [n]

    return sorted((b for n in outermost(held) for b in stack(n)), key=list(modules).index)


def _loss(model: nn.Module, spec: PruneSpec, ctx: Context) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in calibration_batches(ctx.task, spec.calib_batches):
            total += float(ctx.task.loss(model(x), y)) * len(y)
            count += len(y)
    return total / max(count, 1)


def _drop(model: nn.Module, name: str):
    """Take block ``name`` out of the forward pass: removed from a ModuleList (whose owner loops over
    it, as nn.TransformerEncoder does), else replaced by identity. Returns the undo."""
    holder, leaf = parent(model, name)
    orig = holder.get_submodule(leaf)
    if isinstance(holder, nn.ModuleList) and len(holder) > 1:
        i = int(leaf)
        del holder[i]
        return lambda: holder.insert(i, orig)
    replace(model, name, nn.Identity())
    return lambda: replace(model, name, orig)


def remove_blocks(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    """Replace the least important shape-preserving blocks by identity. Importance is the increase
    of the calibration loss when the block alone is removed (random for criterion random)."""
    model.eval()
    modules = dict(model.named_modules())
    if spec.layers:
        names = select([n for n in modules if n], spec.layers, spec.exclude, where=ctx.where)
        shaped = _all_shape_preserving(model, ctx.task.example_input)
        for n in names:
            if n not in shaped:
                ctx.log.skipped[n] = "its output shape differs from its input: identity cannot replace it"
        cands = [n for n in names if n in shaped]
    else:
        cands = _shape_preserving(model, ctx.task.example_input)
        cands = select(cands, None, spec.exclude, where=ctx.where) if cands and spec.exclude else cands
    k = round(spec.sparsity * len(cands))
    if not cands:
        ctx.log.notes.append("no shape-preserving block or layer: nothing can be replaced by identity")
        return model
    base = _loss(model, spec, ctx)
    if spec.criterion == "random":
        imp = dict(zip(cands, saliency.random_scores((len(cands),), ctx.generator()).tolist()))
    else:
        imp = {}
        for n in cands:
            undo = _drop(model, n)
            imp[n] = _loss(model, spec, ctx) - base
            undo()
    order = sorted(cands, key=lambda n: (imp[n], cands.index(n)))
    for n in sorted(order[:k], key=lambda n: -cands.index(n)):  # the last first: list indices stay valid
        holder, _ = parent(model, n)
        in_list = isinstance(holder, nn.ModuleList)
        if in_list and len(holder) == 1:
            ctx.log.skipped[n] = "kept: the last block of its layer list"
            continue
        _drop(model, n)
        ctx.log.touched[n] = (f"{'removed from its layer list' if in_list else 'replaced by identity'} "
                              f"(calibration loss +{imp[n]:.4f} alone)")
    for n in order[k:]:
        ctx.log.skipped[n] = (f"kept: more important (calibration loss +{imp[n]:.4f} without it)" if k else
                              f"kept: sparsity {spec.sparsity:g} of {len(cands)} candidate block(s) removes none "
                              f"(calibration loss +{imp[n]:.4f} without it)")
    return model


def _all_shape_preserving(model: nn.Module, example: torch.Tensor) -> set[str]:
    same: set[str] = set()
    forward_with_hooks(model, example, [(m, lambda _m, i, o, n=n: same.add(n) if i and torch.is_tensor(i[0]) and
                                         torch.is_tensor(o) and i[0].shape == o.shape else None)
                                        for n, m in model.named_modules() if n])
    return same
