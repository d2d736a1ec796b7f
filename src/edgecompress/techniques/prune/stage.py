"""The prune stage: the spec's criterion becomes one importance, handed to the path its granularity
names (single weights, channels, or blocks)."""
from __future__ import annotations

from torch import nn

from ...context import Context
from .blocks import remove_blocks
from .channels import prune_channels
from .importance import from_spec
from .spec import PruneSpec
from .unstructured import prune_unstructured


def apply(model: nn.Module, spec: PruneSpec, ctx: Context) -> nn.Module:
    if spec.granularity == "block":
        return remove_blocks(model, spec, ctx)
    if spec.granularity == "channel":
        return prune_channels(model, spec, ctx, from_spec(spec, ctx))
    return prune_unstructured(model, spec, ctx, from_spec(spec, ctx))
