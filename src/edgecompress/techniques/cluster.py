"""Weight sharing: the nonzero weights of each layer take one of 2^bits shared values (k-means).

Pruned weights stay exactly zero (zero is not a cluster). During the recovery fine-tune each layer's
weight is ``[0, c_1, ..., c_k][index]`` through a parametrization, so the trainable parameters are
the centroids and each centroid's gradient is the sum of the gradients of the weights sharing it
(Deep Compression, Han et al. 2016); the weights stay shared through every optimizer step.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from ..context import Context
from ..layers import match, select, weighted_layers
from ..primitives import kmeans
from ..spec import StageSpec

Bits = Annotated[int, Field(ge=2, le=8)]


class ClusterSpec(StageSpec):
    """``{stage: cluster, bits: 4, layer_bits: {fc3: 6}, init: linear, backend: torch}``"""

    stage: Literal["cluster"] = "cluster"
    bits: Bits = Field(description="2^bits shared values per layer for its nonzero weights")
    layer_bits: dict[str, Bits] = Field(default_factory=dict,
                                        description="bits for some layers (name or re: pattern; first match wins)")
    init: Literal["linear", "density", "random"] = "linear"
    backend: Literal["torch", "sklearn"] = "torch"
    iters: int = Field(default=100, ge=1, le=10000, description="k-means iterations at most")
    bias_bits: Bits | None = Field(default=None, description="also share each layer's bias values (None: keep)")
    centroids: Literal["fp32", "fp16"] = Field(default="fp16", description="precision of the shared values")
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default all Linear/Conv")
    exclude: list[str] | None = None


class Shared(nn.Module):
    """Parametrization ``weight = table[index]``; the table is the trainable centroids (plus a fixed
    zero in slot 0 when the tensor has pruned weights)."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor, zero_slot: bool):
        super().__init__()
        self.register_buffer("index", index)
        self.zero_slot = zero_slot
        self._init = centroids

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([centroids.new_zeros(1), centroids]) if self.zero_slot else centroids
        return table[self.index]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self._init.clone()


def share(w: torch.Tensor, bits: int, spec: ClusterSpec, seed: int, keep_zeros: bool
          ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(centroids, index into [0?, centroids], zero slot used) for one tensor."""
    flat = w.detach().flatten()
    nz = flat != 0 if keep_zeros else torch.ones_like(flat, dtype=torch.bool)
    c, labels = kmeans.kmeans(flat[nz], 2 ** bits, init=spec.init, backend=spec.backend, iters=spec.iters, seed=seed)
    zero_slot = keep_zeros and not bool(nz.all())
    index = torch.zeros(flat.shape, dtype=torch.long)
    index[nz] = labels + int(zero_slot)
    return c, index.view_as(w), zero_slot


def bits_for(name: str, spec: ClusterSpec) -> int:
    for pattern, bits in spec.layer_bits.items():
        if match([name], pattern):
            return bits
    return spec.bits


def apply(model: nn.Module, spec: ClusterSpec, ctx: Context) -> nn.Module:
    layers = weighted_layers(model)
    names = select(list(layers), spec.layers, spec.exclude, where=ctx.where)
    for pattern in spec.layer_bits:
        select(list(layers), [pattern], None, where=f"{ctx.where}.layer_bits")
    targets: list[tuple[nn.Module, str]] = []
    for i, name in enumerate(names):
        layer, bits = layers[name], bits_for(name, spec)
        w = layer.weight
        nonzero = int((w != 0).sum())
        if nonzero == 0:
            ctx.log.skipped[name] = "every weight is zero"
            continue
        c, index, zero_slot = share(w, bits, spec, ctx.seed + i, keep_zeros=True)
        parametrize.register_parametrization(layer, "weight", Shared(c, index, zero_slot), unsafe=True)
        targets.append((layer, "weight"))
        what = f"{c.numel()} shared values ({bits} bits) for {nonzero:,} nonzero weights"
        if spec.bias_bits is not None and getattr(layer, "bias", None) is not None:
            cb, ib, _ = share(layer.bias, spec.bias_bits, spec, ctx.seed + 10_000 + i, keep_zeros=False)
            parametrize.register_parametrization(layer, "bias", Shared(cb, ib, False), unsafe=True)
            targets.append((layer, "bias"))
            what += f"; bias {cb.numel()} shared values ({spec.bias_bits} bits)"
        ctx.log.touched[name] = what
    for name in layers:
        if name not in names:
            ctx.log.skipped[name] = "excluded by the recipe"
    if spec.finetune is not None:
        ctx.finetune(model, spec.finetune, label=f"{ctx.where} cluster fine-tune")
    with torch.no_grad():
        for layer, attr in targets:
            original = layer.parametrizations[attr].original
            if spec.centroids == "fp16":
                original.copy_(kmeans.to_fp16_grid(original))
            parametrize.remove_parametrizations(layer, attr, leave_parametrized=True)
    return model
