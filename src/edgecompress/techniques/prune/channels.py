"""Channel pruning: whole channels removed through Torch-Pruning's dependency graph (``depgraph``),
so layers physically shrink and MACs drop; ranked by the stage's importance reduced over each
group of coupled layers, with ratios per group from the spec, ``per_layer`` or a sensitivity scan."""
from __future__ import annotations

import copy

from torch import nn

from ...context import Context
from ...layers import select, weighted_layers
from ...primitives import saliency
from ...primitives.attention import split_attention
from ...task import evaluate
from .depgraph import GroupScores, Pruner, ScoredTypes, count as count_params, shape as layer_shape
from .importance import Importance
from .scan import sensitivity_scan
from .spec import PruneSpec, explicit_ratios


def group_scores(model: nn.Module, importance: Importance, step: int = 0, normalize: bool = False) -> GroupScores:
    """Torch-Pruning's group importance from ``importance``: the weights of every Linear, Conv and
    BatchNorm scored entry by entry, or the inputs of every Linear and Conv channel by channel."""
    if importance.reads == "inputs":
        layers = weighted_layers(model)
        scores = importance(model, {f"{n}.weight": m.weight for n, m in layers.items()}, step)
        return GroupScores(inputs={layers[k.removesuffix(".weight")]: s for k, s in scores.items()},
                               normalize=normalize)
    params = {f"{n}.weight": m.weight for n, m in model.named_modules()
              if isinstance(m, ScoredTypes) and getattr(m, "weight", None) is not None}
    scores = importance(model, params, step)
    return GroupScores(params={id(params[n]): s for n, s in scores.items()}, normalize=normalize)


def prune_channels(model: nn.Module, spec: PruneSpec, ctx: Context, importance: Importance) -> nn.Module:
    """Remove ``spec.sparsity`` of the channels of every group (in ``spec.steps`` steps for schedule
    iterative, fine-tuned between them); every layer's new shape or reason to stay is logged."""
    split_attention(model, ctx)  # Torch-Pruning then removes whole heads of q/k/v/out_proj together
    layers = weighted_layers(model)
    names = select(list(layers), spec.layers, spec.exclude, where=ctx.where)
    explicit = explicit_ratios(names, spec, ctx)
    steps = saliency.iterative_sparsities(spec.sparsity, spec.steps) if spec.schedule == "iterative" else [spec.sparsity]
    alloc = None
    if spec.scope == "sensitivity":
        alloc = _channel_allocation(model, names, spec, ctx, importance)
    before = {n: layer_shape(m) for n, m in layers.items()}
    skipped: dict[str, str] = {}
    for i, s in enumerate(steps):
        pruner = Pruner(model, ctx.task.example_input, names, where=ctx.where)
        per_group: dict[str, float] = {}
        for root, members in pruner.groups.items():
            r = next((explicit[m] for m in members if m in explicit), None)
            if alloc is not None and r is None:
                r = alloc.get(root, 0.0)
            if r is not None:
                per_group[root] = _step_ratio(r, len(steps))
        pruner.prune(group_scores(model, importance, step=i, normalize=spec.scope == "global"),
                     ratio=0.0 if alloc is not None else _step_ratio(spec.sparsity, len(steps)),
                     per_group=per_group, global_ranking=spec.scope == "global")
        skipped.update(pruner.plan.skipped)
        ctx.log.notes.extend(pruner.plan.notes)
        if spec.schedule == "iterative":
            ctx.finetune(model, spec.finetune, label=f"{ctx.where} step {i + 1}/{len(steps)} fine-tune")
    for n, m in layers.items():
        now = layer_shape(m)
        if now != before[n]:
            ctx.log.touched[n] = f"out {before[n][0]} -> {now[0]}, in {before[n][1]} -> {now[1]}"
        elif n in skipped:
            ctx.log.skipped[n] = skipped[n]
    for n in layers:
        if n not in names:
            ctx.log.skipped.setdefault(n, "excluded by the recipe")
    if alloc is not None:
        ctx.log.notes.append("sensitivity allocation (channel ratio per group): " +
                             ", ".join(f"{n} {r:.2f}" for n, r in alloc.items()))
    return model


def _step_ratio(final: float, steps: int) -> float:
    """The fraction of the remaining channels each of ``steps`` equal steps removes."""
    return 1 - (1 - final) ** (1 / steps)


def _channel_allocation(model: nn.Module, names: list[str], spec: PruneSpec, ctx: Context,
                        importance: Importance) -> dict[str, float]:
    ex = ctx.task.example_input
    groups = list(Pruner(copy.deepcopy(model), ex, names, where=ctx.where).groups)
    base_macs, base_params = count_params(model, ex)

    def one(root: str, ratios: list[float]):
        metrics, macs, params = [], [], []
        for r in ratios:
            m2 = copy.deepcopy(model)
            p = Pruner(m2, ex, names, where=ctx.where)
            p.prune(group_scores(m2, importance, normalize=spec.scope == "global"), ratio=0.0, per_group={root: r})
            metrics.append(evaluate(m2, ctx.task, ctx.task.calib_data))
            mc, pc = count_params(m2, ex)
            macs.append(float(base_macs - mc))
            params.append(float(base_params - pc))
        return metrics, {"macs": macs, "params": params, "sparsity": [r / len(groups) for r in ratios]}

    scan = sensitivity_scan(model, groups, spec, ctx, one)
    total = scan["totals"][spec.target]
    return saliency.allocate(scan["drops"], scan["savings"][spec.target], scan["ratios"], spec.sparsity * total)
