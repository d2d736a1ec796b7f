"""Quantization: the one ``quantize`` stage.

Modes: ``static`` (weights and activations, calibrated on ``calib_batches`` batches), ``dynamic``
(int8 weights, activations quantized at run time; Linear), ``weight_only`` (int4/int8 grouped or
float16, optional GPTQ rounding), ``qat`` (fake quant with a straight-through estimator or LSQ,
fine-tuned through ``ctx.finetune``). Options: batch norm folding, cross-layer equalization, bias
correction, and ``bits: auto`` (mixed precision within a budget, chosen from per-layer sensitivity).

Every quantized tensor gets one ``QuantSpec`` (``tensor_specs(model)``); the ONNX export, the
packed artifact and the C export read those same numbers.
"""
from __future__ import annotations

import copy
import logging
import math
import operator
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from ..context import Context
from ..errors import RecipeError
from ..layers import match, select, weighted_layers
from ..primitives import quant as Q
from ..primitives.qlayer import (ACT, ActQuant, QuantEmbedding, QuantLayer, act_quants, nbits_block_ok, quant_layers,
                                 tensor_specs)
from ..primitives.quant import QuantSpec
from ..spec import FineTune, StageSpec

log = logging.getLogger(__name__)

__all__ = ["QuantizeSpec", "QuantSpec", "apply", "tensor_specs"]

#: modules that keep the quantization grid of their input (an output spec passes through them)
PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
EXPORT_BITS = {"weight_only": (4, 8, 16), "dynamic": (8,)}


class QuantizeSpec(StageSpec):
    """``{stage: quantize, mode: static, bits: 8, granularity: channel, observer: minmax}``"""

    stage: Literal["quantize"] = "quantize"
    mode: Literal["static", "dynamic", "weight_only", "qat"] = "static"
    bits: int | Literal["auto"] = Field(default=8, description="weight bits 2..8 (16: float16 for weight_only), "
                                                                "or auto with a budget")
    act_bits: int = Field(default=8, ge=2, le=8, description="activation bits (static, qat)")
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = Field(default=None, ge=2, le=65536)
    symmetric: bool = True
    scale: Literal["float", "pow2"] = "float"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    percentile: float = Field(default=99.99, gt=50, le=100)
    calib_batches: int = Field(default=8, ge=1, le=100000)
    rounding: Literal["nearest", "gptq"] = "nearest"
    lsq: bool = False
    fold_bn: bool = True
    equalize: bool = False
    bias_correction: bool = False
    embeddings: bool = Field(default=True, description="all modes but qat: nn.Embedding tables to int8, "
                             "one scale per row")
    reduce_range: bool = Field(default=True, description="static/qat: 8-bit weights use 7 bits, so that ONNX "
                               "Runtime's u8s8 kernels on AVX2 (no VNNI) cannot saturate their 16-bit sums")
    budget_bits: float | None = Field(default=None, ge=2, le=8, description="bits: auto, average weight bits")
    budget_bytes: int | None = Field(default=None, ge=1, description="bits: auto, packed weight bytes")
    candidate_bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], min_length=1)
    layers: list[str] | None = Field(default=None, description="names or re: patterns; default all Linear/Conv")
    exclude: list[str] | None = None

    @field_validator("bits")
    @classmethod
    def _bits_exportable(cls, v, info):
        mode = info.data.get("mode", "static")
        allowed = EXPORT_BITS.get(mode)
        if v == "auto":
            if mode == "dynamic":
                raise PydanticCustomError("bits_mode", "must be 8 for mode dynamic (MatMulInteger)")
            return v
        if allowed is not None and v not in allowed:
            raise PydanticCustomError("bits_mode", "must be one of {allowed} for mode {mode}",
                                      {"allowed": ", ".join(map(str, allowed)), "mode": mode})
        if allowed is None and not 2 <= v <= 8:
            raise PydanticCustomError("bits_mode", "must be one of 2..8 for mode {mode} (int8 QDQ)", {"mode": mode})
        return v

    @field_validator("candidate_bits")
    @classmethod
    def _cands(cls, v):
        if any(not 2 <= b <= 8 for b in v):
            raise PydanticCustomError("bits_range", "must hold bits in 2..8")
        return sorted(set(v))


# ---- helpers -----------------------------------------------------------------------------

def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    head, _, tail = name.rpartition(".")
    return model.get_submodule(head), tail


def _next_siblings(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Modules that run after ``name`` in its nn.Sequential parent (empty when not in a Sequential)."""
    parent, attr = _parent(model, name)
    if not isinstance(parent, nn.Sequential):
        return []
    keys = list(parent._modules)
    prefix = name[: -len(attr)]
    return [(prefix + k, parent._modules[k]) for k in keys[keys.index(attr) + 1:]]


def _weight_spec(spec: QuantizeSpec, bits: int, layer: nn.Module) -> QuantSpec:
    if bits == 16:
        return QuantSpec(bits=16)
    if bits == 8 and spec.reduce_range and spec.mode in ("static", "qat"):
        bits = 7
    gran = spec.granularity
    if gran == "group" and not isinstance(layer, nn.Linear):
        gran = "channel"
    return QuantSpec(bits=bits, signed=True, symmetric=spec.symmetric, granularity=gran, axis=0,
                     group_size=spec.group_size if gran == "group" else None, scale_type=spec.scale)


def _act_spec(spec: QuantizeSpec) -> QuantSpec:
    return QuantSpec(bits=spec.act_bits, signed=False, symmetric=False, granularity="tensor", scale_type=spec.scale)


def _batches(ctx: Context, n: int):
    data = ctx.task.calib_data
    for i, (x, y) in enumerate(data):
        if i >= n:
            break
        yield x, y


def _run_hooked(model: nn.Module, hooks: list, ctx: Context, n: int) -> None:
    """Run ``n`` calibration batches through ``model``, then remove ``hooks`` whatever happens."""
    try:
        for x, _ in _batches(ctx, n):
            model(x)
    finally:
        for h in hooks:
            h.remove()


def _calib_required(spec: QuantizeSpec, ctx: Context) -> None:
    if ctx.task.calib_data is None:
        raise RecipeError(f"{ctx.where}.mode {spec.mode} needs calibration data (task.val_data or "
                          f"task.train_data); got none")


@torch.no_grad()
def _loss(model: nn.Module, ctx: Context, n: int) -> float:
    total, count = 0.0, 0
    for x, y in _batches(ctx, n):
        total += float(ctx.task.loss(model(x), y)) * len(x)
        count += len(x)
    return total / max(count, 1)


# ---- model edits ---------------------------------------------------------------------------

def _fold_bn(model: nn.Module, names: list[str], ctx: Context) -> None:
    for name in names:
        sib = _next_siblings(model, name)
        layer = model.get_submodule(name)
        if sib and isinstance(sib[0][1], (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(layer, nn.Linear):
            bn_name, bn = sib[0]
            w, b = Q.fold_batchnorm(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                    bn.running_mean, bn.running_var, bn.weight.detach() if bn.affine else None,
                                    bn.bias.detach() if bn.affine else None, bn.eps)
            layer.weight.data.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.data.copy_(b)
            p, attr = _parent(model, bn_name)
            setattr(p, attr, nn.Identity())
            ctx.log.notes.append(f"{bn_name} folded into {name}")


def _equalize(model: nn.Module, names: list[str], ctx: Context) -> None:
    """Cross-layer equalization over consecutive layers joined only by ReLU / pooling / Flatten."""
    chosen = set(names)
    for name in names:
        layer = model.get_submodule(name)
        between = []
        for sib_name, sib in _next_siblings(model, name):
            if sib_name in chosen:
                nxt = sib
                if not all(isinstance(m, (nn.ReLU, *PASS_THROUGH)) for m in between):
                    break
                c = layer.weight.shape[0]
                k = nxt.weight.shape[1]
                if k % c:
                    break
                with torch.no_grad():
                    s = Q.equalize_scales(layer.weight, nxt.weight, repeat=k // c)
                    shape = [-1] + [1] * (layer.weight.dim() - 1)
                    layer.weight.div_(s.reshape(shape))
                    if layer.bias is not None:
                        layer.bias.div_(s)
                    s_in = s.repeat_interleave(k // c)
                    shape2 = [1, -1] + [1] * (nxt.weight.dim() - 2)
                    nxt.weight.mul_(s_in.reshape(shape2))
                ctx.log.notes.append(f"cross-layer equalization {name} -> {sib_name} "
                                     f"(scales {float(s.min()):.3g}..{float(s.max()):.3g})")
                break
            between.append(sib)


@torch.no_grad()
def _observe(model: nn.Module, names: list[str], acts: dict[str, nn.Module | None], spec: QuantizeSpec,
             ctx: Context, want_inputs: set[str], want_outputs: set[str]):
    """Calibrate input/output observers of the chosen layers (outputs after the fused activation);
    also collect the inputs' Gram matrices for GPTQ."""
    act = _act_spec(spec)
    kw = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
    obs_in = {n: Q.observer(spec.observer, act, **kw) for n in want_inputs}
    obs_out = {n: Q.observer(spec.observer, act, **kw) for n in want_outputs}
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
            if spec.rounding == "gptq" and isinstance(mod, nn.Linear):
                x2 = x.reshape(-1, x.shape[-1]).double()
                grams[name] = grams.get(name, 0) + x2.t() @ x2
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    _run_hooked(model, hooks, ctx, spec.calib_batches)
    return ({n: o.result() for n, o in obs_in.items()}, {n: o.result() for n, o in obs_out.items()}, grams)


@torch.no_grad()
def _bias_correction(model: nn.Module, ctx: Context, spec: QuantizeSpec, float_weights: dict[str, torch.Tensor]):
    """Add E[(W - Wq) x] over calibration inputs to each quantized layer's bias (Nagel et al. 2019)."""
    layers = quant_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name, ql):
        def fn(mod, inp, out):
            x = inp[0]
            dw = float_weights[name] - ql.layer.weight
            y = ql._compute(x, dw, None)
            dims = [d for d in range(y.dim()) if d != (y.dim() - 1 if ql.kind == "linear" else 1)]
            sums[name] = sums.get(name, 0) + y.sum(dim=dims)
            counts[name] = counts.get(name, 0) + y.numel() // y.shape[-1 if ql.kind == "linear" else 1]
        return fn

    for name, ql in layers.items():
        if name in float_weights:
            hooks.append(ql.register_forward_hook(hook(name, ql)))
    _run_hooked(model, hooks, ctx, spec.calib_batches)
    for name, ql in layers.items():
        if name not in sums:
            continue
        delta = sums[name] / counts[name]
        if ql.layer.bias is None:
            ql.layer.bias = nn.Parameter(torch.zeros(ql.layer.weight.shape[0]))
        ql.layer.bias.add_(delta)
        ctx.log.notes.append(f"bias correction {name}: mean |shift| {float(delta.abs().mean()):.3g}")


# ---- where activations are quantized --------------------------------------------------------

#: functions and methods that keep the quantization grid of their input
SHAPE_FNS = (torch.flatten, torch.reshape)
SHAPE_METHODS = ("flatten", "view", "reshape", "contiguous")
JOIN_FNS = (operator.add, torch.add)
POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)


@dataclass
class _Plan:
    """Where a static model's activations are quantized.

    ``acts``: layer -> name of the ReLU module fused into it; ``want_out``: layers whose output is
    quantized; ``reads``: consumer (layer or ActQuant) -> producer whose quantizer it shares, in graph
    order; ``gm``: the traced model with ActQuant modules after residual adds and average pools
    (None when none was needed: the model keeps its class)."""

    acts: dict[str, str] = field(default_factory=dict)
    want_out: set[str] = field(default_factory=set)
    reads: dict[str, str] = field(default_factory=dict)
    gm: nn.Module | None = None


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (QuantLayer, ActQuant)) or super().is_leaf_module(m, qualname)


def _graph_plan(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> _Plan:
    """Follow the traced graph: every tensor that reaches a quantized layer, a residual add or an average
    pool is quantized once, where it is produced, and every reader shares that quantizer. Models fx
    cannot trace fall back to nn.Sequential order (layers only; adds and pools stay float)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds of errors for untraceable code
        ctx.log.notes.append(f"the model cannot be traced by torch.fx ({str(e).splitlines()[0][:120]}); activation "
                             "quantizers follow nn.Sequential order, residual adds and pools stay float")
        return _sequential_plan(model, names)
    mods = dict(model.named_modules())
    chosen = set(names)
    plan = _Plan()
    key: dict = {}  # fx node -> the quantizer (layer or ActQuant name) whose grid its value lies on
    inserts: list[tuple] = []  # (fx node to follow, ActQuant name, kind)
    taken = set(mods)

    def module(n):
        return mods.get(n.target) if n.op == "call_module" else None

    def passes(n) -> bool:
        m = module(n)
        if m is not None:  # a ReLU not fused into a layer keeps the grid too (zero is on it)
            return isinstance(m, (*PASS_THROUGH, *ACT))
        return (n.op == "call_function" and n.target in SHAPE_FNS) or (n.op == "call_method" and n.target in SHAPE_METHODS)

    def sole_act(n):
        """The ReLU that is the only reader of ``n``, past Identity modules (folded batch norm)."""
        while True:
            us = list(n.users)
            if len(us) != 1:
                return None
            if isinstance(module(us[0]), ACT):
                return us[0]
            if not isinstance(module(us[0]), (nn.Identity, nn.Dropout)):
                return None
            n = us[0]

    def fresh(base: str) -> str:
        name, i = base, 2
        while name in taken:
            name, i = f"{base}{i}", i + 1
        taken.add(name)
        return name

    def read(consumer: str, src) -> None:
        k = key.get(src)
        if k is None:
            return
        plan.reads[consumer] = k
        if k in chosen:
            plan.want_out.add(k)

    skip: set = set()
    for n in graph.nodes:
        if n in skip or n.op in ("placeholder", "get_attr", "output"):
            continue
        args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        if n.op == "call_module" and n.target in chosen:
            if args:
                read(n.target, args[0])
            act = sole_act(n)
            if act is not None:
                plan.acts[n.target] = act.target
                skip.add(act)
                key[act] = n.target
            key[n] = n.target
        elif passes(n) and args:
            if args[0] in key:
                key[n] = key[args[0]]
        elif n.op == "call_function" and n.target in JOIN_FNS and len(args) == 2 and all(a in key for a in args):
            scope = list(n.meta.get("nn_module_stack", {}) or [""])[-1]
            name = fresh(f"{scope}.add_q" if scope else "add_q")
            for a in args:
                read(name, a)
            plan.reads.pop(name, None)  # an add gets its own (calibrated) quantizer
            act = sole_act(n)
            if act is not None:
                skip.add(act)
            inserts.append((act or n, name, "add"))
            key[act or n] = name
        elif isinstance(module(n), POOLS) and args and args[0] in key:
            name = fresh(f"{n.target}_q")
            read(name, args[0])
            inserts.append((n, name, "pool"))
            key[n] = name
    if not inserts:
        return plan
    kw = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
    for node, name, kind in inserts:
        obs = Q.observer(spec.observer, _act_spec(spec), **kw) if kind == "add" else None
        _add_module(model, name, ActQuant(_act_spec(spec), obs, kind))
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    plan.gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    return plan


def _add_module(model: nn.Module, name: str, module: nn.Module) -> None:
    head, _, tail = name.rpartition(".")
    (model.get_submodule(head) if head else model).add_module(tail, module)


def _sequential_plan(model: nn.Module, names: list[str]) -> _Plan:
    """Fused activations and shared quantizers from nn.Sequential order alone."""
    plan = _Plan()
    for n in names:
        sibs = [(sn, sm) for sn, sm in _next_siblings(model, n) if not isinstance(sm, nn.Identity)]
        if sibs and isinstance(sibs[0][1], ACT):
            plan.acts[n] = sibs[0][0]
            sibs = sibs[1:]
        for sn, sm in sibs:
            if sn in names:
                plan.reads[sn] = n
                plan.want_out.add(n)
                break
            if not isinstance(sm, PASS_THROUGH):
                break
    return plan


# ---- mixed precision -----------------------------------------------------------------------

@torch.no_grad()
def _sensitivity(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> dict[str, dict[int, float]]:
    """Mean squared change of the model's outputs (on calibration batches) when only one layer's
    weights are quantized to each candidate bit width."""
    xs = [x for x, _ in _batches(ctx, spec.calib_batches)]
    ref = [model(x) for x in xs]
    out: dict[str, dict[int, float]] = {}
    for name in names:
        layer = model.get_submodule(name)
        w0 = layer.weight.detach().clone()
        out[name] = {}
        for b in spec.candidate_bits:
            layer.weight.copy_(Q.fake_quant(w0, Q.calibrate(w0, _weight_spec(spec, b, layer))))
            out[name][b] = sum(float(((model(x) - r) ** 2).mean()) for x, r in zip(xs, ref)) / len(xs)
        layer.weight.copy_(w0)
    return out


def _allocate(sizes: dict[str, int], sens: dict[str, dict[int, float]], cands: list[int],
              budget_bits: float | None, budget_bytes: int | None) -> dict[str, int]:
    """Greedy: start every layer at the most bits; lower the layer whose next step down costs the least
    loss per bit saved until the budget holds."""
    bits = {n: cands[-1] for n in sizes}
    total = sum(sizes.values())

    def fits() -> bool:
        if budget_bits is not None and sum(sizes[n] * bits[n] for n in sizes) > budget_bits * total + 1e-9:
            return False
        if budget_bytes is not None and sum(math.ceil(sizes[n] * bits[n] / 8) for n in sizes) > budget_bytes:
            return False
        return True

    while not fits():
        best, best_cost = None, float("inf")
        for n in sizes:
            i = cands.index(bits[n])
            if i == 0:
                continue
            lower = cands[i - 1]
            cost = (sens[n][lower] - sens[n][bits[n]]) / (sizes[n] * (bits[n] - lower))
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        bits[best] = cands[cands.index(bits[best]) - 1]
    # then spend what is left of the budget where one step up helps the most per bit
    while True:
        best, best_gain = None, -float("inf")
        for n in sizes:
            i = cands.index(bits[n])
            if i == len(cands) - 1:
                continue
            old = bits[n]
            bits[n] = cands[i + 1]
            ok = fits()
            bits[n] = old
            gain = (sens[n][old] - sens[n][cands[i + 1]]) / (sizes[n] * (cands[i + 1] - old))
            if ok and gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return bits
        bits[best] = cands[cands.index(bits[best]) + 1]


# ---- the stage -----------------------------------------------------------------------------

def apply(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> nn.Module:
    if spec.granularity == "group" and spec.group_size is None:
        raise RecipeError(f"{ctx.where}.group_size is required with granularity: group; got none")
    if spec.bits == "auto" and spec.budget_bits is None and spec.budget_bytes is None:
        raise RecipeError(f"{ctx.where}.budget_bits (or budget_bytes) is required with bits: auto; got none")
    mode = spec.mode
    if mode in ("static", "qat") or spec.rounding == "gptq" or spec.bits == "auto" or spec.bias_correction:
        _calib_required(spec, ctx)

    for n, m in model.named_modules():
        if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
            ctx.log.skipped[n] = f"{type(m).__name__} quantization is not implemented; kept float"
    layers = weighted_layers(model)
    names = select(list(layers), spec.layers, spec.exclude, where=ctx.where)
    for n in layers:
        if n not in names:
            ctx.log.skipped[n] = "excluded by the recipe"
    if mode == "dynamic":
        explicit = spec.layers is not None
        keep = []
        for n in names:
            if isinstance(layers[n], nn.Linear) or explicit:
                keep.append(n)
            else:
                ctx.log.skipped[n] = ("dynamic mode quantizes Linear layers; ONNX Runtime's ConvInteger runs "
                                      "slower than a float conv (name the layer in layers: to force it)")
        names = keep
    bits_of: dict[str, int] = {}
    for n in list(names):
        layer = layers[n]
        k = layer.weight[0].numel()
        if spec.granularity == "group" and isinstance(layer, nn.Linear) and k % spec.group_size:
            ctx.log.skipped[n] = f"group_size {spec.group_size} does not divide its {k} input features; kept float"
            names.remove(n)
        elif mode == "weight_only" and spec.bits == 4 and isinstance(layer, nn.Linear) \
                and not nbits_block_ok(k, spec.group_size if spec.granularity == "group" else None):
            ctx.log.skipped[n] = (f"MatMulNBits needs a power-of-two block >= 16 dividing its {k} input features "
                                  f"(group_size {spec.group_size}); kept float")
            names.remove(n)
    if spec.reduce_range and mode in ("static", "qat") and 8 in (spec.candidate_bits if spec.bits == "auto" else [spec.bits]):
        ctx.log.notes.append("8-bit weights use 7 bits (reduce_range: true) so that ONNX Runtime's u8s8 integer "
                             "kernels cannot saturate on AVX2 CPUs without VNNI; set reduce_range: false for VNNI or ARM")
    if not names:
        ctx.log.notes.append("no layer was quantized")
        return model

    if spec.fold_bn and mode in ("static", "qat"):
        _fold_bn(model, names, ctx)
    if spec.equalize:
        _equalize(model, names, ctx)

    # mixed precision: bits per layer from sensitivity
    if spec.bits == "auto":
        sens = _sensitivity(model, names, spec, ctx)
        sizes = {n: layers[n].weight.numel() for n in names}
        bits_of = _allocate(sizes, sens, spec.candidate_bits, spec.budget_bits, spec.budget_bytes)
        avg = sum(sizes[n] * bits_of[n] for n in names) / sum(sizes.values())
        packed = sum(math.ceil(sizes[n] * bits_of[n] / 8) for n in names)
        ctx.log.notes.append("bits: auto chose " + ", ".join(f"{n}={bits_of[n]}" for n in names)
                             + f"; average {avg:.3f} weight bits, {packed:,} packed weight bytes (estimate; the "
                               "ONNX file stores codes in int8)")
    else:
        bits_of = {n: int(spec.bits) for n in names}

    # activations fused into the layers; which layer outputs, residual adds and pools get quantizers;
    # which inputs share their producer's quantizer (from the traced graph, or nn.Sequential order)
    static = mode in ("static", "qat")
    plan = _Plan()
    if static:
        plan = _graph_plan(model, names, spec, ctx)
        model = plan.gm if plan.gm is not None else model
    acts = {n: model.get_submodule(a) for n, a in plan.acts.items()}
    want_in = {n for n in names if n not in plan.reads} if static else set()
    need_obs = static or spec.rounding == "gptq"
    obs_in, obs_out, grams = (_observe(model, names, acts, spec, ctx, want_in, plan.want_out) if need_obs
                              else ({}, {}, {}))
    aqs = act_quants(model)
    for a in aqs.values():
        a.finish()

    float_weights = {}
    for n in names:
        layer = layers[n]
        w_spec = _weight_spec(spec, bits_of[n], layer)
        ql = QuantLayer(layer, "qat" if mode == "qat" else ("static" if mode == "static" else mode),
                        w_spec, None, None, act=acts.get(n))
        if n in obs_in:
            ql.set_spec("in", obs_in[n])
        if n in obs_out:
            ql.set_spec("out", obs_out[n])
        float_weights[n] = layer.weight.detach().clone()
        codes = None
        if spec.rounding == "gptq" and isinstance(layer, nn.Linear) and not w_spec.is_float and n in grams:
            codes, w_cal = Q.gptq(layer.weight, grams[n], w_spec)
            ql.set_spec("w", w_cal)
        ql.freeze(codes)
        if mode == "qat":  # training starts from the float weights
            layer.weight.data.copy_(float_weights[n])
        parent, attr = _parent(model, n)
        setattr(parent, attr, ql)
        if n in plan.acts:
            p2, a2 = _parent(model, plan.acts[n])
            setattr(p2, a2, nn.Identity())
    # shared quantizers, in graph order: a consumer's input spec is its producer's output spec
    qls = quant_layers(model)
    for dst, src in plan.reads.items():
        shared = qls[src].out_spec if src in qls else aqs[src].spec
        if dst in qls:
            qls[dst].set_spec("in", shared)
        else:
            aqs[dst].set_spec(shared)
    for a_name, a in aqs.items():
        ctx.log.touched[a_name] = f"{a.kind} output {a.spec.describe()}" + (
            f" (shares {plan.reads[a_name]}'s)" if a_name in plan.reads else "")

    if spec.bias_correction and mode != "dynamic":
        _bias_correction(model, ctx, spec, float_weights)

    if mode == "qat" or (spec.finetune is not None and static):
        _train(model, spec, ctx)

    for n in names:
        ql = qls[n]
        what = f"{mode}: weight {ql.w_spec.describe()}"
        if ql.in_spec is not None:
            what += f", input {ql.in_spec.describe()}"
        if ql.out_spec is not None:
            what += f", output {ql.out_spec.describe()}"
        if ql.act is not None:
            what += f", {type(ql.act).__name__} fused"
        if spec.rounding == "gptq" and ql.kind == "linear":
            what += ", GPTQ rounding"
        ctx.log.touched[n] = what
    if spec.embeddings and mode != "qat":
        _quantize_embeddings(model, spec, ctx)
    _kernel_notes(model, spec, ctx)
    return model


def _quantize_embeddings(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    embs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    if not embs or spec.layers is not None:
        chosen: list[str] = []
    else:  # exclude: names weighted layers too, so only its patterns that hit an embedding apply here
        chosen = [n for n in embs if not any(n in match(list(embs), p) for p in spec.exclude or [])]
    for n, emb in embs.items():
        if n not in chosen:
            ctx.log.skipped[n] = "embedding not named in layers"
            continue
        if emb.weight.numel() < 1 << 16:
            ctx.log.skipped[n] = f"embedding of {emb.weight.numel():,} values is small; kept float"
            continue
        qe = QuantEmbedding(emb)
        parent, attr = _parent(model, n)
        setattr(parent, attr, qe)
        ctx.log.touched[n] = f"embedding {qe.w_spec.describe()} (Gather, then dequantize the rows)"


def _train(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    """Quantization-aware fine-tune; weights (and LSQ step sizes) train, codes are frozen after."""
    qls = quant_layers(model)
    shared: dict[int, nn.Parameter] = {}
    for ql in qls.values():
        ql.mode = "qat"
        if spec.lsq:
            ql.lsq = True
            ql.w_lsq = nn.Parameter(ql.w_spec.scale.clone())
            for key in ("in", "out"):
                s = ql._spec(key)
                if s is not None:
                    buf = getattr(ql, f"{key}_scale")
                    if id(buf) not in shared:
                        shared[id(buf)] = nn.Parameter(buf.clone())
                    setattr(ql, f"{key}_lsq", shared[id(buf)])
    # consumers share the producer's output parameter (same buffer object after set_spec clone: tie by value)
    qlist = list(qls.values())
    if spec.lsq:
        for a in qlist:
            for b in qlist:
                if a is not b and a.out_spec is not None and b._in is not None and hasattr(b, "in_lsq") \
                        and hasattr(a, "out_lsq") and torch.equal(a.out_scale, b.in_scale):
                    b.in_lsq = a.out_lsq
    ft = spec.finetune or FineTune(epochs=5, lr=5e-4)
    ctx.finetune(model, ft, masks={}, label=f"{ctx.where} quantization-aware training")
    with torch.no_grad():
        for ql in qlist:
            if spec.lsq:
                ql.w_scale.copy_(ql.w_lsq.detach().abs() + Q.EPS)
                for key in ("in", "out"):
                    if hasattr(ql, f"{key}_lsq"):
                        getattr(ql, f"{key}_scale").copy_(getattr(ql, f"{key}_lsq").detach().abs() + Q.EPS)
            ql.freeze(recalibrate=not spec.lsq)
            ql.mode = "static"
            ql.lsq = False
            for key in ("w_lsq", "in_lsq", "out_lsq"):
                if hasattr(ql, key):
                    delattr(ql, key)


def _kernel_notes(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    """Which integer kernels ONNX Runtime runs for this model; for dynamic mode, its latency against float."""
    from ..export.onnx import export_onnx
    from ..export.onnx_quant import kernel_note
    from ..measure import compare_latency

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "q.onnx"
            export_onnx(model, ctx.task.example_input, path)
            ctx.log.notes.append(kernel_note(path))
            if spec.mode == "dynamic":
                ref = Path(tmp) / "float.onnx"
                export_onnx(ctx.task.model, ctx.task.example_input, ref)
                batch = 64 if ctx.task.example_input.dim() != 2 or ctx.task.example_input.dtype.is_floating_point else 8
                lat = compare_latency([ref, path], ctx.task.example_input, (batch,), repeats=7, warmup=2, budget_s=2.0)
                ratio = lat[0][f"b{batch}"] / lat[1][f"b{batch}"]
                word = "FASTER" if ratio >= 1 else "SLOWER"
                ctx.log.notes.append(f"dynamic int8 runs {max(ratio, 1 / ratio):.2f}x {word} than float in ONNX "
                                     f"Runtime at batch {batch} ({lat[1][f'b{batch}']:.3f} ms vs "
                                     f"{lat[0][f'b{batch}']:.3f} ms)")
    except Exception as e:  # the measurement after the stage reports export failures with their message
        log.warning("kernel inspection failed: %s", e)
