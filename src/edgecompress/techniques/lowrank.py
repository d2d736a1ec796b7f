"""Low-rank decomposition: replace a layer by its factors.

``svd`` turns a Linear into two (``in -> r -> out``) and a convolution into a kxk convolution to
``r`` channels and a 1x1 (the SVD of the weight unfolded as ``[out, in * k * k]``, Zhang et al.'s
channel decomposition); ``tucker2`` a convolution into 1x1, a kxk core and 1x1, ``cp`` a
convolution into 1x1, one depthwise conv per spatial dim (kx1, then 1xk) and 1x1. On a Linear,
``tucker2`` and ``cp`` are the truncated SVD: a matrix's Tucker-2 has a diagonal core and its best
rank-``r`` CP is its rank-``r`` SVD (Eckart-Young), so those layers get the two-Linear form.
The rank comes from kept energy, a ratio, a fixed value, or a parameter / MAC budget over the
targeted layers. A layer whose factors would not hold fewer parameters is kept whole and reported.

``finetune_on: manifold`` fine-tunes the full weight and, after every optimizer step, retracts it to
the chosen rank (truncated SVD, truncated HOSVD for Tucker-2), as fixed-rank Riemannian methods do;
the factors are taken from the result. ``factors`` (default) fine-tunes the factors themselves.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ..context import Context
from ..layers import leave_output_alone, replace, select, weighted_layers
from ..primitives import lowrank as lr
from ..primitives.attention import split_attention
from ..spec import StageSpec

Conv = (nn.Conv1d, nn.Conv2d)
RULES = ("energy", "ratio", "rank", "param_budget", "mac_budget")


class LowRankSpec(StageSpec):
    """``{stage: lowrank, method: svd, energy: 0.9}``; set at most one of energy, ratio, rank,
    param_budget, mac_budget (energy 0.9 when none is set)."""

    stage: Literal["lowrank"] = "lowrank"
    method: Literal["svd", "tucker2", "cp"] = "svd"
    energy: float | None = Field(default=None, gt=0, le=1, description="keep this fraction of the squared norm")
    ratio: float | None = Field(default=None, gt=0, le=1,
                                description="rank as a fraction of the full rank (svd), of each channel "
                                            "mode (tucker2), of min(out, in) channels (cp)")
    rank: int | list[int] | None = Field(default=None, description="fixed rank; tucker2 takes [r_out, r_in]")
    param_budget: float | None = Field(default=None, gt=0, lt=1,
                                       description="the targeted layers keep at most this fraction of their weights")
    mac_budget: float | None = Field(default=None, gt=0, lt=1,
                                     description="the targeted layers keep at most this fraction of their MACs")
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default every layer "
                                                               "the method applies to")
    exclude: list[str] | None = None
    keep_output: bool = Field(default=True, description="leave the model's output layer (the classifier) "
                              "whole unless layers names it")
    finetune_on: Literal["factors", "manifold"] = "factors"
    iterations: int = Field(default=100, ge=1, le=10000, description="HOOI (tucker2) / ALS (cp) iterations")

    @field_validator("rank")
    @classmethod
    def _rank(cls, rank, info: ValidationInfo):
        ranks = [rank] if isinstance(rank, int) else rank or []
        pair = isinstance(rank, list) and (info.data.get("method") != "tucker2" or len(ranks) != 2)
        if any(r < 1 for r in ranks) or pair:
            raise PydanticCustomError("lowrank_rank", "must be an integer >= 1 (tucker2 also takes [r_out, r_in])")
        return rank

    @field_validator("finetune_on")
    @classmethod
    def _manifold(cls, on, info: ValidationInfo):
        if on == "manifold" and (info.data.get("method") == "cp" or info.data.get("finetune") is None):
            raise PydanticCustomError("lowrank_manifold", "must be factors unless method is svd or tucker2 and a finetune "
                                      "section is given")
        return on

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankSpec:
        if sum(getattr(self, r) is not None for r in RULES) > 1:
            raise PydanticCustomError("lowrank_rules", "must set at most one of energy, ratio, rank, param_budget, "
                                      "mac_budget")
        return self


@dataclass
class Plan:
    """One targeted layer: its shape, spectra and the costs of its factors at a given rank."""

    name: str
    module: nn.Module
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    method: str = "svd"
    positions: int = 1
    spectra: list[torch.Tensor] = field(default_factory=list)
    rank: int | tuple[int, int] = 1
    factors: tuple = ()
    energy: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.detach()

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as ``[out, in * k...]``: what svd factors."""
        return self.weight.flatten(1)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def params(self, rank=None) -> int:
        """Weights of the layer (rank None) or of its factors at ``rank``."""
        w = self.weight
        if rank is None:
            return w.numel()
        if self.method == "svd":
            return lr.svd_params(*self.matrix.shape, rank)
        if self.method == "tucker2":
            return lr.tucker2_params(w.shape[0], w.shape[1], self.kernel, rank)
        return lr.cp_params(w.shape[0], w.shape[1], self.kernel, rank)

    def macs(self, rank=None) -> int:
        w = self.weight
        if w.dim() == 2:
            return self.positions * w.numel() if rank is None else lr.svd_macs(w.shape[0], w.shape[1], rank,
                                                                               self.positions)
        if rank is None:
            return lr.conv_macs(w.shape[0], w.shape[1], self.kernel, self.out_spatial)
        if self.method == "svd":  # the kxk conv to r channels and the 1x1, both at the output's size
            return lr.svd_macs(*self.matrix.shape, rank, math.prod(self.out_spatial))
        if self.method == "tucker2":
            return lr.tucker2_macs(w.shape[0], w.shape[1], self.kernel, rank, self.in_spatial, self.out_spatial)
        return lr.cp_macs(w.shape[0], w.shape[1], self.kernel, rank, self.in_spatial, self.out_spatial)

    def saves(self, rank) -> bool:
        return self.params(rank) < self.params()


# ---- building the factored modules -----------------------------------------------------------

def _conv(conv: nn.Module, cin: int, cout: int, kernel, weight: torch.Tensor, *, stride=1, padding=0,
          dilation=1, groups: int = 1, bias: torch.Tensor | None = None) -> nn.Module:
    m = type(conv)(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                   bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(weight.reshape(m.weight.shape))
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _bias(layer: nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach()


def svd_module(layer: nn.Linear, down: torch.Tensor, up: torch.Tensor) -> nn.Sequential:
    """``in -> r`` (no bias) then ``r -> out`` (the layer's bias)."""
    r = down.shape[0]
    first, second = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features,
                                                                          bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(down)
        second.weight.copy_(up)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(OrderedDict(down=first, up=second))


def conv_svd_module(conv: nn.Module, down: torch.Tensor, up: torch.Tensor) -> nn.Sequential:
    """A kxk conv ``I -> r`` (the layer's stride, padding, dilation; no bias) then 1x1 ``r -> O``
    (the layer's bias), from the SVD of the weight unfolded as ``[O, I * k...]``."""
    r, one = down.shape[0], (1,) * (conv.weight.dim() - 2)
    return nn.Sequential(OrderedDict(
        down=_conv(conv, conv.in_channels, r, conv.kernel_size, down, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation),
        up=_conv(conv, r, conv.out_channels, one, up, bias=_bias(conv))))


def tucker2_module(conv: nn.Module, u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> nn.Sequential:
    """1x1 (I -> r_in), the core (r_in -> r_out, the original kernel, stride, padding) and 1x1 (r_out -> O)."""
    d = conv.weight.dim() - 2
    ro, ri = core.shape[:2]
    one = (1,) * d
    return nn.Sequential(OrderedDict(
        down=_conv(conv, conv.in_channels, ri, one, u_in.t()),
        core=_conv(conv, ri, ro, conv.kernel_size, core, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation),
        up=_conv(conv, ro, conv.out_channels, one, u_out, bias=_bias(conv))))


def cp_module(conv: nn.Module, factors: list[torch.Tensor]) -> nn.Sequential:
    """1x1 (I -> r), a depthwise conv along each spatial dim (kx1, 1xk), 1x1 (r -> O)."""
    a, b, *cs = factors
    d, r = len(cs), a.shape[1]
    one = (1,) * d
    layers: OrderedDict[str, nn.Module] = OrderedDict(down=_conv(conv, conv.in_channels, r, one, b.t()))
    for j, c in enumerate(cs):
        def along(v, default):
            return tuple(v[j] if i == j else default for i in range(d))
        layers[f"spatial{j}"] = _conv(conv, r, r, along(conv.kernel_size, 1), c.t(), stride=along(conv.stride, 1),
                                      padding=along(conv.padding, 0), dilation=along(conv.dilation, 1), groups=r)
    layers["up"] = _conv(conv, r, conv.out_channels, one, a, bias=_bias(conv))
    return nn.Sequential(layers)


def factorize(layer: nn.Module, method: str, rank, *, iterations: int = 100, seed: int = 0) -> nn.Sequential:
    """The factored replacement of ``layer`` at ``rank`` (tucker2: ``(r_out, r_in)``)."""
    w = layer.weight.detach()
    if method == "svd" or isinstance(layer, nn.Linear):
        factors = lr.svd_factors(w.flatten(1), rank)
        return svd_module(layer, *factors) if isinstance(layer, nn.Linear) else conv_svd_module(layer, *factors)
    if method == "tucker2":
        return tucker2_module(layer, *lr.tucker2_factors(w, tuple(rank), iterations, seed))
    return cp_module(layer, lr.cp_factors(w, rank, iterations, seed))


def _from_factors(plan: Plan) -> nn.Sequential:
    if plan.method == "svd":
        return (svd_module if isinstance(plan.module, nn.Linear) else conv_svd_module)(plan.module, *plan.factors)
    if plan.method == "tucker2":
        return tucker2_module(plan.module, *plan.factors)
    return cp_module(plan.module, list(plan.factors))


# ---- choosing ranks --------------------------------------------------------------------------

def _why_not(method: str, m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return None
    if not isinstance(m, Conv):
        return f"{method} factors Linear, Conv1d and Conv2d layers; this is {type(m).__name__}"
    if m.groups != 1:
        return f"grouped convolution (groups={m.groups}): {method} needs groups=1"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}: {method} needs zero padding"
    if method == "cp" and isinstance(m.padding, str):
        return f"padding {m.padding!r}: cp needs numeric padding"
    return None


def _probe(model: nn.Module, plans: dict[str, Plan], example: torch.Tensor) -> None:
    """Record each layer's input and output spatial sizes at batch 1."""
    handles = []
    for p in plans.values():
        def hook(mod, inputs, output, p=p):
            x = inputs[0]
            if isinstance(mod, nn.Linear):
                p.positions = output.numel() // output.shape[0] // mod.out_features
            else:
                p.in_spatial, p.out_spatial = tuple(x.shape[2:]), tuple(output.shape[2:])
        handles.append(p.module.register_forward_hook(hook))
    try:
        was = model.training
        with torch.no_grad():
            model.eval()(example[:1])
        model.train(was)
    finally:
        for h in handles:
            h.remove()


def _spectra(plan: Plan) -> list[torch.Tensor]:
    w = plan.weight
    if plan.method == "svd":
        return [lr.singular_values(plan.matrix)]
    return [lr.mode_singular_values(w, 0), lr.mode_singular_values(w, 1)]


def _energy_rank(plan: Plan, e: float):
    if plan.method == "svd":
        return lr.energy_rank(plan.spectra[0], e)
    return lr.energy_rank(plan.spectra[0], e), lr.energy_rank(plan.spectra[1], e)


def _fixed(plan: Plan, spec: LowRankSpec):
    w = plan.weight
    if plan.method == "svd":
        rank = spec.rank if isinstance(spec.rank, int) else min(spec.rank)
        return min(rank, min(plan.matrix.shape))
    if plan.method == "tucker2":
        ro, ri = (spec.rank, spec.rank) if isinstance(spec.rank, int) else spec.rank
        return min(ro, w.shape[0]), min(ri, w.shape[1])
    return spec.rank


def _ratio(plan: Plan, ratio: float):
    w = plan.weight
    if plan.method == "svd":
        return lr.ratio_rank(min(plan.matrix.shape), ratio)
    if plan.method == "tucker2":
        return lr.ratio_rank(w.shape[0], ratio), lr.ratio_rank(w.shape[1], ratio)
    return lr.ratio_rank(min(w.shape[:2]), ratio)


def _largest_cp_rank(plan: Plan, cost: Callable, budget: float) -> int:
    r = 1
    while cost(plan, r + 1) <= budget:
        r += 1
    return r


def choose_ranks(plans: list[Plan], spec: LowRankSpec, seed: int) -> list[str]:
    """Set ``plan.rank`` (and, for cp by energy, ``plan.factors``) for every plan; returns notes."""
    notes = []
    budget = spec.param_budget if spec.param_budget is not None else spec.mac_budget
    cost = (lambda p, r=None: p.params(r)) if spec.mac_budget is None else (lambda p, r=None: p.macs(r))
    for p in plans:
        if p.method != "cp":
            p.spectra = _spectra(p)
    cps = [p for p in plans if p.method == "cp"]
    if spec.rank is not None:
        for p in plans:
            p.rank = _fixed(p, spec)
    elif spec.ratio is not None:
        for p in plans:
            p.rank = _ratio(p, spec.ratio)
    elif budget is not None:
        for p in cps:
            p.rank = _largest_cp_rank(p, cost, budget * cost(p))
        if cps:
            notes.append(f"cp ranks: the largest rank per layer within {budget:g} of its "
                         f"{'weights' if spec.mac_budget is None else 'MACs'}")
        spectral = [p for p in plans if p.method != "cp"]

        def total(e: float) -> int:
            out = 0
            for p in spectral:
                r = _energy_rank(p, e)
                out += cost(p, r) if p.saves(r) else cost(p)
            return out
        if spectral:
            original = sum(cost(p) for p in spectral)
            e = lr.max_threshold(total, budget * original)
            for p in spectral:
                p.rank = _energy_rank(p, e)
            what = "weights" if spec.mac_budget is None else "MACs"
            notes.append(f"ranks under a {what} budget of {budget:g}: common kept energy {e:.4f}, the targeted "
                         f"layers keep {total(e) / max(original, 1):.4f} of their {what}")
            if total(e) > budget * original:
                notes.append(f"budget not reachable: even rank 1 keeps {total(e) / max(original, 1):.4f} of the {what}")
    else:
        energy = spec.energy if spec.energy is not None else 0.9
        for p in plans:
            if p.method == "cp":
                max_rank = max(1, (p.params() - 1) // p.params(1))
                p.rank, factors, p.energy = lr.cp_rank_for_energy(p.weight, energy, max_rank, spec.iterations, seed)
                p.factors = tuple(factors)
            else:
                p.rank = _energy_rank(p, energy)
    for p in plans:
        if p.energy is None and p.spectra:
            p.energy = (lr.kept_energy(p.spectra[0], p.rank) if p.method == "svd" else
                        math.sqrt(lr.kept_energy(p.spectra[0], p.rank[0]) * lr.kept_energy(p.spectra[1], p.rank[1])))
    return notes


# ---- the stage -------------------------------------------------------------------------------

def _compute_factors(p: Plan, spec: LowRankSpec, seed: int) -> None:
    if p.factors:
        return
    w = p.weight
    if p.method == "svd":
        p.factors = lr.svd_factors(p.matrix, p.rank)
    elif p.method == "tucker2":
        p.factors = lr.tucker2_factors(w, p.rank, spec.iterations, seed)
    else:
        p.factors = tuple(lr.cp_factors(w, p.rank, spec.iterations, seed))
        p.energy = lr.fit(w, lr.cp_weight(p.factors))


def _reconstruct(p: Plan) -> torch.Tensor:
    if p.method == "svd":
        down, up = p.factors
        return (up.double() @ down.double()).float().reshape(p.weight.shape)
    return lr.tucker2_weight(*p.factors)


def _retract(p: Plan, w: torch.Tensor) -> torch.Tensor:
    return lr.truncate(w.flatten(1), p.rank).reshape(w.shape) if p.method == "svd" else lr.tucker2_truncate(w, p.rank)


def _rank_text(rank) -> str:
    return f"{rank[0]}x{rank[1]}" if isinstance(rank, tuple) else str(rank)


def apply(model: nn.Module, spec: LowRankSpec, ctx: Context) -> nn.Module:
    method = spec.method
    split_attention(model, ctx)
    layers = weighted_layers(model)
    fits = [n for n, m in layers.items() if _why_not(method, m) is None]
    names = select(fits, spec.layers, spec.exclude, where=ctx.where)
    for n, m in layers.items():
        if n not in names:
            ctx.log.skipped[n] = _why_not(method, m) or "excluded by the recipe"
    names, left = leave_output_alone(model, ctx.task.example_input, names, spec.layers, spec.keep_output)
    ctx.log.skipped.update(left)
    plans = {n: Plan(n, layers[n], (), (), "svd" if isinstance(layers[n], nn.Linear) else method) for n in names}
    if method != "svd" and any(p.method == "svd" for p in plans.values()):
        ctx.log.notes.append(f"Linear layers get the truncated SVD: a matrix's {method} is its SVD")
    _probe(model, plans, ctx.task.example_input)
    ctx.log.notes.extend(choose_ranks(list(plans.values()), spec, ctx.seed))
    kept: list[Plan] = []
    for p in plans.values():
        if not p.saves(p.rank):
            ctx.log.skipped[p.name] = (f"{p.method} rank {_rank_text(p.rank)} would hold {p.params(p.rank):,} "
                                       f"weights, not fewer than the layer's {p.params():,}: kept whole")
            continue
        _compute_factors(p, spec, ctx.seed)
        kept.append(p)
    if spec.finetune_on == "manifold" and kept:
        _manifold_finetune(model, kept, spec, ctx)
    for p in kept:
        replace(model, p.name, _from_factors(p))
        ctx.log.touched[p.name] = (f"{p.method} rank {_rank_text(p.rank)} (energy {p.energy:.4f}): weights "
                                   f"{p.params():,} -> {p.params(p.rank):,}, MACs {p.macs():,} -> {p.macs(p.rank):,}")
    return model


def _manifold_finetune(model: nn.Module, plans: list[Plan], spec: LowRankSpec, ctx: Context) -> None:
    """Fine-tune the full weights, retracting each to its rank after every optimizer step; then
    take the factors of the result (exact, as it has that rank)."""
    with torch.no_grad():
        for p in plans:
            p.module.weight.copy_(_reconstruct(p))

    def retract(step: int, total: int) -> None:
        with torch.no_grad():
            for p in plans:
                p.module.weight.copy_(_retract(p, p.module.weight))

    ctx.finetune(model, spec.finetune, after_step=[retract], label=f"{ctx.where} manifold fine-tune")
    for p in plans:
        p.factors = lr.svd_factors(p.matrix, p.rank) if p.method == "svd" else lr.tucker2_from_hosvd(p.weight, p.rank)
    ctx.log.notes.append(f"fine-tuned on the fixed-rank manifold: {len(plans)} layer(s) retracted to their rank "
                         f"after each optimizer step")
