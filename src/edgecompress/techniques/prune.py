"""Pruning: zero (or remove) the least important weights."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..context import Context
from ..layers import select, weighted_layers
from ..primitives import saliency
from ..spec import StageSpec


class PruneSpec(StageSpec):
    """``{stage: prune, criterion: magnitude, norm: 1, sparsity: 0.9, scope: global}``"""

    stage: Literal["prune"] = "prune"
    criterion: Literal["magnitude"] = "magnitude"
    norm: Literal[1, 2] = 1
    sparsity: float = Field(ge=0, lt=1, description="fraction of the targeted weights set to zero")
    scope: Literal["global", "layer"] = "global"
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default all Linear/Conv")
    exclude: list[str] | None = None


def apply(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    layers = weighted_layers(model)
    names = select(list(layers), spec.layers, spec.exclude, where=ctx.where)
    weights = [layers[n].weight for n in names]
    scores = [saliency.magnitude(w.detach(), spec.norm) for w in weights]
    if spec.scope == "global":
        masks = saliency.global_masks(scores, spec.sparsity)
    else:
        masks = saliency.layer_masks(scores, spec.sparsity)
    with torch.no_grad():
        for name, w, m in zip(names, weights, masks):
            w.mul_(m)
            ctx.log.touched[name] = f"sparsity {1 - m.float().mean().item():.4f}"
    for name in layers:
        if name not in names:
            ctx.log.skipped[name] = "excluded by the recipe"
    return model
