"""Quantization: the one ``quantize`` stage.

Modes: ``static`` (weights and activations, calibrated on ``calib_batches`` batches), ``dynamic``
(int8 weights, activations quantized at run time; Linear, and LSTM / GRU in ``quantize_rnn``),
``weight_only`` (int4/int8 grouped or
float16, optional GPTQ rounding), ``qat`` (fake quant with a straight-through estimator or LSQ,
fine-tuned through ``ctx.finetune``). Options: batch norm folding, cross-layer equalization, bias
correction, and ``bits: auto`` (mixed precision within a budget, chosen from per-layer sensitivity).

Every quantized tensor gets one ``QuantSpec`` (``tensor_specs(model)``); the ONNX export, the
packed artifact and the C export read those same numbers.
"""
from __future__ import annotations

import contextlib
import copy
import io
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
from torch.nn import functional as F

from ..context import Context
from ..errors import RecipeError
from ..layers import layer_macs, match, parent, replace, select, weighted_layers
from ..primitives import bitalloc
from ..primitives.attention import split_attention
from ..primitives import quant as Q
from ..primitives.qlayer import (ACT, ActQuant, QuantEmbedding, QuantLayer, act_quants, nbits_block_ok, quant_layers,
                                 tensor_specs)
from ..primitives.quant import QuantSpec
from ..spec import FineTune, StageSpec
from .quantize_rnn import quantize_recurrent, recurrent_layers

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
    reduce_range: bool = Field(default=True, description="static/qat/dynamic: 8-bit weights use 7 bits, so that ONNX "
                               "Runtime's u8s8 kernels on AVX2 (no VNNI) cannot saturate their 16-bit sums")
    keep_slow_float: bool = Field(default=True, description="static/qat: convs reading 1-3 channels stay float "
                                  "when ONNX Runtime's cost model (per-layer MACs, measured kernel ratios) says "
                                  "all-int8 would be 1.2x slower or worse; the next layer quantizes their output "
                                  "(false: quantize every layer, as integer-only devices need)")
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

def _next_siblings(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Modules that run after ``name`` in its nn.Sequential parent (empty when not in a Sequential)."""
    owner, attr = parent(model, name)
    if not isinstance(owner, nn.Sequential):
        return []
    keys = list(owner._modules)
    prefix = name[: -len(attr)]
    return [(prefix + k, owner._modules[k]) for k in keys[keys.index(attr) + 1:]]


def _weight_spec(spec: QuantizeSpec, bits: int, layer: nn.Module) -> QuantSpec:
    if bits == 16:
        return QuantSpec(bits=16)
    if bits == 8 and spec.reduce_range and spec.mode in ("static", "qat", "dynamic"):
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

def _batch_norm_after(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{conv: batch norm}`` for each named conv whose output only a batch norm reads: from the fx
    graph (``self.bn1(self.conv1(x))`` in a forward, as torchvision's ResNet writes it), else the
    next module of an nn.Sequential for a model fx cannot trace."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    modules = dict(model.named_modules())
    convs = [n for n in names if not isinstance(modules[n], nn.Linear)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # fx raises what the traced code raises: fall back to nn.Sequential order
        out = {}
        for n in convs:
            sib = _next_siblings(model, n)
            if sib and isinstance(sib[0][1], norms):
                out[n] = sib[0][0]
        return out
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in convs or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and isinstance(modules.get(user.target), norms) and \
                calls[node.target] == calls[user.target] == 1:
            out[node.target] = user.target
    return out


def _fold_bn(model: nn.Module, names: list[str], ctx: Context) -> None:
    for name, bn_name in _batch_norm_after(model, names).items():
        layer, bn = model.get_submodule(name), model.get_submodule(bn_name)
        w, b = Q.fold_batchnorm(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                bn.running_mean, bn.running_var, bn.weight.detach() if bn.affine else None,
                                bn.bias.detach() if bn.affine else None, bn.eps)
        layer.weight.data.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.data.copy_(b)
        replace(model, bn_name, nn.Identity())
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
            if spec.rounding == "gptq" and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                x2 = _gptq_columns(mod, x)
                grams[name] = grams.get(name, 0) + x2.transpose(-1, -2) @ x2
        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    _run_hooked(model, hooks, ctx, spec.calib_batches)
    return ({n: o.result() for n, o in obs_in.items()}, {n: o.result() for n, o in obs_out.items()}, grams)


def _gptq_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as the rows its weight multiplies: (N, K) for a Linear; for a convolution its
    im2col patches, one matrix (N, in/groups * kernel) per group, in the order of the weight's own
    flattening (input channel, then kernel position), so ``X^T X`` is GPTQ's Hessian of that group."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    x = x.float()
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dil, pad, stride = (1, *layer.kernel_size), (1, *layer.dilation), (0, *layer.padding), (1, *layer.stride)
    else:
        kernel, dil, pad, stride = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    cols = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)  # (N, C*kh*kw, L)
    g = layer.groups
    cols = cols.reshape(x.shape[0], g, -1, cols.shape[-1]).permute(1, 0, 3, 2)  # (g, N, L, C/g*kh*kw)
    return cols.reshape(g, -1, cols.shape[-1])


def _gptq_layer(layer: nn.Module, gram: torch.Tensor, spec: QuantSpec, mse: bool) -> tuple[torch.Tensor, QuantSpec]:
    """GPTQ codes of a Linear or a convolution (each group of a grouped one on its own Hessian), in
    the weight's shape, and the calibrated spec."""
    w = layer.weight.detach()
    if gram.dim() == 2 or gram.shape[0] == 1:
        codes, cal = Q.gptq(w, gram.reshape(gram.shape[-2:]), spec, mse=mse)
        return codes.reshape(w.shape), cal
    rows = w.shape[0] // gram.shape[0]
    parts = [Q.gptq(w[i * rows:(i + 1) * rows], gram[i], spec, mse=mse) for i in range(gram.shape[0])]
    codes = torch.cat([c for c, _ in parts]).reshape(w.shape)
    if spec.granularity != "channel":  # one scale for the whole layer, which the groups' own would not be
        cal = Q.calibrate(w, spec)
        return Q.quantize(w, cal), cal
    return codes, parts[0][1].with_params(torch.cat([s.scale for _, s in parts]),
                                          torch.cat([s.zero_point for _, s in parts]))


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


# ---- layers that run faster in float -------------------------------------------------------

#: Relative cost of ONNX Runtime's (MLAS, AVX2) int8 kernels against its float ones, measured on an
#: idle 2-core machine (bench/quantize.py): a 1-3 channel conv costs about 2.7x its float time in
#: int8 (2-D; 1.7x for Conv1d), because the int8 kernel builds an im2col buffer the float kernel
#: avoids; every other layer about 0.6x. From these and each layer's MACs the stage estimates how
#: much slower the all-int8 model is than the one with its thin convs float, and keeps them float at
#: SLOW_INT8 or worse. A rule, not a timing: the same recipe gives the same model on any machine.
THIN_INT8_COST = {nn.Conv1d: 1.7, nn.Conv2d: 2.7}
INT8_COST = 0.6
SLOW_INT8 = 1.2


def _slow_int8_convs(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> list[str]:
    """Convs reading 1-3 channels (a grayscale or RGB stem) to keep float because ONNX Runtime would
    run the whole model slower with them int8, by the cost model above (an estimate, said so)."""
    thin = [n for n in names if isinstance(model.get_submodule(n), (nn.Conv1d, nn.Conv2d))
            and model.get_submodule(n).groups == 1 and model.get_submodule(n).in_channels <= 3]
    if not thin:
        return []
    macs = layer_macs(model, names, ctx.task.example_input)
    total = max(sum(macs.values()), 1)
    thin_float = sum(macs.get(n, 0) for n in thin) / total
    thin_int8 = sum(macs.get(n, 0) * THIN_INT8_COST[type(model.get_submodule(n))] for n in thin) / total
    rest = INT8_COST * (1 - thin_float)
    slower = (thin_int8 + rest) / max(thin_float + rest, 1e-12)
    share = f"{thin_float:.1%} of the MACs"
    if slower < SLOW_INT8:
        ctx.log.notes.append(f"thin-input convs {', '.join(thin)} ({share}) stay int8: all-int8 is estimated "
                             f"{slower:.2f}x the time with them float, under {SLOW_INT8}x")
        return []
    for n in thin:
        ctx.log.skipped[n] = (f"a {model.get_submodule(n).in_channels}-channel conv ({share}) makes the all-int8 "
                              f"model an estimated {slower:.2f}x slower in ONNX Runtime: kept float, the next "
                              "layer quantizes its output (keep_slow_float: false quantizes it)")
    return thin


# ---- where activations are quantized --------------------------------------------------------

#: functions and methods that keep the quantization grid of their input
SHAPE_FNS = (torch.flatten, torch.reshape)
SHAPE_METHODS = ("flatten", "view", "reshape", "contiguous")
#: ops that combine quantized tensors into a new range: each gets its own calibrated quantizer, so ONNX Runtime
#: runs them as QLinearAdd / QLinearMul (a squeeze-excitation gate) / QLinearConcat (dense connections)
JOIN_FNS = {operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul", torch.cat: "cat",
            torch.concat: "cat"}
#: gates whose output range differs from their input's: quantized after, so they run as QLinearSigmoid
GATES = (nn.Sigmoid,)
GATE_FNS = (torch.sigmoid,)
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
        """The ReLU (a module, or ``F.relu`` / ``torch.relu`` / ``.relu()``) that is the only reader of
        ``n``, past Identity modules (folded batch norm)."""
        while True:
            us = list(n.users)
            if len(us) != 1:
                return None
            if isinstance(module(us[0]), ACT) or _functional_relu(us[0]):
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
            if act is not None:  # a functional ReLU stays in the forward: on the layer's ReLU output it is a no-op
                plan.acts[n.target] = act.target if act.op == "call_module" else ""
                skip.add(act)
                key[act] = n.target
            key[n] = n.target
        elif passes(n) and args:
            if args[0] in key:
                key[n] = key[args[0]]
        elif n.op == "call_function" and n.target in JOIN_FNS and any(a in key for a in _joined(n)) \
                and (len(args) == 2 or JOIN_FNS[n.target] == "cat"):
            word = JOIN_FNS[n.target]
            scope = list(n.meta.get("nn_module_stack", {}) or [""])[-1]
            name = fresh(f"{scope}.{word}_q" if scope else f"{word}_q")
            for a in _joined(n):
                if a in key:
                    read(name, a)
                else:  # a float input (from a layer left float) is quantized on its way into the op
                    inserts.append((a, fresh(f"{scope}.{word}_in_q" if scope else f"{word}_in_q"), word, n))
            plan.reads.pop(name, None)  # the op gets its own (calibrated) quantizer
            act = sole_act(n)
            if act is not None:
                skip.add(act)
            inserts.append((act or n, name, word, None))
            key[act or n] = name
        elif (isinstance(module(n), GATES) or (n.op == "call_function" and n.target in GATE_FNS)) \
                and args and args[0] in key:
            name = fresh(f"{n.target}_q" if n.op == "call_module" else "sigmoid_q")
            read(name, args[0])
            plan.reads.pop(name, None)
            inserts.append((n, name, "sigmoid", None))
            key[n] = name
        elif isinstance(module(n), POOLS) and args and args[0] in key:
            name = fresh(f"{n.target}_q")
            read(name, args[0])
            inserts.append((n, name, "pool", None))
            key[n] = name
    if not inserts:
        return plan
    kw = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
    for node, name, kind, only in inserts:
        obs = Q.observer(spec.observer, _act_spec(spec), **kw) if kind != "pool" else None
        _add_module(model, name, ActQuant(_act_spec(spec), obs, kind))
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        if only is not None:  # this edge alone
            only.replace_input_with(node, new)
        else:
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    plan.gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    return plan


def _functional_relu(n: torch.fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (F.relu, torch.relu) and not n.kwargs.get("inplace")) or \
        (n.op == "call_method" and n.target == "relu")


def _joined(n: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensor inputs of an add / mul (its two arguments) or a concatenation (its list)."""
    if JOIN_FNS.get(n.target) == "cat":
        return [a for a in (n.args[0] if n.args else n.kwargs.get("tensors", ())) if isinstance(a, torch.fx.Node)]
    return [a for a in n.args if isinstance(a, torch.fx.Node)]


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

#: allocations from the top of the Pareto front scored on the whole quantized model (plus uniform)
MIXED_SHORTLIST = 8
#: most allocations scored on the whole quantized model after the sensitivity scan, local search included
MIXED_EVALS = 40


def _stored_bits(spec: QuantizeSpec, bits: int, layer: nn.Module) -> int:
    """Bits a weight code really spans at nominal width ``bits`` (8 is 7 under reduce_range)."""
    return _weight_spec(spec, bits, layer).bits


class _Probe:
    """The model as the stage will run it, re-weighted per allocation without being rebuilt.

    A private copy of ``model`` where each chosen layer's weight is its min-max fake-quantized value at
    the allocation's bit width; in static and qat mode each layer's input is fake-quantized on the
    activation grid calibrated from the float model (as the stage's observers do); with
    ``bias_correction`` each layer's output is shifted by E[(W - Wq) x], as the stage does, with x the
    float model's inputs to the layer (exact through the layer's mean input, since the layer is
    linear). ``distortion(bits)`` scores an allocation on the calibration inputs: KL divergence of the
    softmax from the float model's, per sample, for classifiers (metric ``accuracy``), otherwise the
    squared error relative to the float outputs' mean square.
    """

    def __init__(self, model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> None:
        self.model = copy.deepcopy(model).eval()
        self.spec = spec
        self.layers = {n: self.model.get_submodule(n) for n in names}
        self.w0 = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        xs = [x for x, _ in _batches(ctx, spec.calib_batches)]
        try:  # one large batch runs far faster than many small ones on a busy CPU
            self.xs = [torch.cat(xs)] if len(xs) > 1 else xs
        except (RuntimeError, TypeError):
            self.xs = xs
        self.samples = sum(len(x) for x in self.xs)
        self.in_specs: dict[str, QuantSpec] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.current: dict[str, int] = {}  # the bit width each layer's weight holds now
        self._shift: dict[tuple[str, int], torch.Tensor] = {}
        static = spec.mode in ("static", "qat")
        kw = {"percentile": spec.percentile} if spec.observer == "percentile" else {}
        obs = {n: Q.observer(spec.observer, _act_spec(spec), **kw) for n in names} if static else {}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def see(name):
            def fn(mod, inp):
                x = inp[0]
                if name in obs:
                    obs[name].observe(x)
                if spec.bias_correction:
                    flat = x.reshape(-1, x.shape[-1]) if isinstance(mod, nn.Linear) else x
                    sums[name] = sums.get(name, 0) + flat.sum(dim=0, keepdim=not isinstance(mod, nn.Linear))
                    counts[name] = counts.get(name, 0) + flat.shape[0]
            return fn

        hooks = [m.register_forward_pre_hook(see(n)) for n, m in self.layers.items()]
        try:
            with torch.no_grad():
                self.refs = [self.model(x) for x in self.xs]
        finally:
            for h in hooks:
                h.remove()
        self.classify = ctx.task.metric == "accuracy" and all(r.dim() == 2 for r in self.refs)
        self.in_specs = {n: o.result() for n, o in obs.items()}
        self.mean_in = {n: s / counts[n] for n, s in sums.items()}
        for n, m in self.layers.items():
            m.register_forward_pre_hook(self._pre(n))
            m.register_forward_hook(self._post(n))

    def _pre(self, name: str):
        def fn(mod, inp):
            s = self.in_specs.get(name)
            return None if s is None else (Q.fake_quant(inp[0], s), *inp[1:])
        return fn

    def _post(self, name: str):
        def fn(mod, inp, out):
            s = self.shift.get(name)
            if s is None:
                return None
            shape = [1] * out.dim()
            shape[out.dim() - 1 if isinstance(mod, nn.Linear) else 1] = -1
            return out + s.reshape(shape)
        return fn

    def weight(self, name: str, bits: int) -> torch.Tensor:
        w0 = self.w0[name]
        return Q.fake_quant(w0, Q.calibrate(w0, _weight_spec(self.spec, bits, self.layers[name])))

    def bias_shift(self, name: str, bits: int) -> torch.Tensor:
        """E[(W - Wq) x] per output channel over the float model's inputs to the layer."""
        key = (name, bits)
        if key not in self._shift:
            layer, dw = self.layers[name], self.w0[name] - self.weight(name, bits)
            if isinstance(layer, nn.Linear):
                self._shift[key] = F.linear(self.mean_in[name], dw)
            else:
                y = layer._conv_forward(self.mean_in[name], dw, None)
                self._shift[key] = y.mean(dim=[d for d in range(y.dim()) if d != 1])
        return self._shift[key]

    @torch.no_grad()
    def distortion(self, bits: dict[str, int]) -> torch.Tensor:
        """Per calibration sample (its mean is the allocation's score)."""
        for n, m in self.layers.items():  # only layers whose width changed are quantized again
            if self.current.get(n) != bits[n]:
                m.weight.copy_(self.weight(n, bits[n]))
                self.current[n] = bits[n]
        self.shift = {n: self.bias_shift(n, bits[n]) for n in self.layers} if self.spec.bias_correction else {}
        outs = [self.model(x) for x in self.xs]
        if self.classify:
            return torch.cat([F.kl_div(F.log_softmax(o, 1), F.log_softmax(r, 1), log_target=True,
                                       reduction="none").sum(1) for o, r in zip(outs, self.refs)])
        err = torch.cat([((o - r) ** 2).reshape(len(o), -1).sum(1) for o, r in zip(outs, self.refs)])
        return err * self.samples / max(sum(float((r ** 2).sum()) for r in self.refs), 1e-30)


def _mixed_bits(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> dict[str, int]:
    """Bits per layer for ``bits: auto``.

    1. Sensitivity: the distortion of the whole quantized model (``_Probe``) when one layer drops to
       each candidate width while the others keep the widest.
    2. Allocation: the exact minimum of the summed sensitivities within the budget
       (``primitives.bitalloc``), and the next ``MIXED_SHORTLIST - 1`` points of its Pareto front.
    3. Choice: those allocations and the widest uniform one within the budget are scored on the whole
       quantized model; a local search (one layer a step up or down, or one up and another down,
       ranked by the summed sensitivities) moves to the least distortion, up to ``MIXED_EVALS`` scored
       allocations in all. The best mixed allocation replaces uniform only when its paired gain over the
       calibration samples exceeds one standard error.
    Every allocation scored first spends what is left of the budget, a step at a time, on the layer
    whose sensitivity drops the most per bit: more bits never raise a layer's expected error, and the
    small differences between close allocations on a few hundred calibration samples are noise.
    Costs count the bits a code really spans (8 is 7 under reduce_range) and packed bytes.
    """
    layers = {n: model.get_submodule(n) for n in names}
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    total = sum(sizes.values())
    cands: dict[str, list[int]] = {}
    for n, m in layers.items():  # one nominal width per distinct stored width
        by_stored: dict[int, int] = {}
        for b in spec.candidate_bits:
            by_stored.setdefault(_stored_bits(spec, b, m), b)
        cands[n] = sorted(by_stored.values())
    stored = {n: {b: _stored_bits(spec, b, layers[n]) for b in cands[n]} for n in names}
    if spec.budget_bytes is not None and spec.budget_bits is not None:
        costs = {n: {b: 8 * math.ceil(sizes[n] * s / 8) for b, s in stored[n].items()} for n in names}
        budget = min(math.floor(spec.budget_bits * total + 1e-6), 8 * spec.budget_bytes)
    elif spec.budget_bytes is not None:
        costs = {n: {b: math.ceil(sizes[n] * s / 8) for b, s in stored[n].items()} for n in names}
        budget = spec.budget_bytes
    else:
        costs = {n: {b: sizes[n] * s for b, s in stored[n].items()} for n in names}
        budget = math.floor(spec.budget_bits * total + 1e-6)

    probe = _Probe(model, names, spec, ctx)
    seen: dict[tuple[int, ...], torch.Tensor] = {}

    def per_sample(a: dict[str, int]) -> torch.Tensor:
        key = tuple(a[n] for n in names)
        if key not in seen:
            seen[key] = probe.distortion(a)
        return seen[key]

    def score(a: dict[str, int]) -> float:
        return float(per_sample(a).mean())

    top = {n: cands[n][-1] for n in names}
    sens: dict[str, dict[int, float]] = {}
    for i, n in enumerate(names):
        sens[n] = {b: score({**top, n: b}) for b in cands[n]}
        if ctx.progress is not None:
            ctx.progress(f"{ctx.where} mixed-precision sensitivity", i + 1, len(names))
    scan = len(seen)
    shortlist = bitalloc.allocate(costs, sens, budget, keep=MIXED_SHORTLIST)
    if not shortlist:
        low = {n: cands[n][0] for n in names}
        ctx.log.notes.append(f"bits: auto cannot meet the budget: the fewest bits ({min(spec.candidate_bits)} for "
                             f"every layer) cost {sum(costs[n][low[n]] for n in names):,} "
                             f"{'bytes' if spec.budget_bits is None else 'bits'} > {budget:,}; every layer gets "
                             "the fewest bits")
        return low
    common = sorted(set.intersection(*(set(c) for c in cands.values())))
    uniform = next(({n: b for n in names} for b in reversed(common)
                    if sum(costs[n][b] for n in names) <= budget), None)
    if uniform is not None and uniform not in shortlist:
        shortlist.append(uniform)

    def cost(a: dict[str, int]) -> int:
        return sum(costs[n][a[n]] for n in names)

    def predicted(a: dict[str, int]) -> float:
        return sum(sens[n][a[n]] for n in names)

    def fill(a: dict[str, int]) -> dict[str, int]:
        """What is left of the budget, a step at a time, to the layer whose sensitivity drops most per cost."""
        a = dict(a)
        while True:
            steps = []
            for n in names:
                i = cands[n].index(a[n])
                if i + 1 < len(cands[n]):
                    up = {**a, n: cands[n][i + 1]}
                    gain = sens[n][a[n]] - sens[n][up[n]]
                    if cost(up) <= budget and gain > 0:
                        steps.append((gain / (costs[n][up[n]] - costs[n][a[n]]), n, up))
            if not steps:
                return a
            a = max(steps, key=lambda s: s[0])[2]

    shortlist = [fill(a) if a is not uniform else a for a in shortlist]
    best = min(shortlist, key=lambda a: (score(a), -cost(a)))
    # local search on the whole model: one layer a step up or down, or one up and another down
    while len(seen) - scan < MIXED_EVALS:
        moves = []
        for up in [None, *names]:
            for down in [None, *names]:
                if up == down:
                    continue
                a = dict(best)
                ok = True
                for n, step in ((up, 1), (down, -1)):
                    if n is not None:
                        i = cands[n].index(a[n]) + step
                        ok = ok and 0 <= i < len(cands[n])
                        a[n] = cands[n][min(max(i, 0), len(cands[n]) - 1)]
                if ok and cost(a) <= budget:
                    a = fill(a)
                    if tuple(a[n] for n in names) not in seen and a not in moves:
                        moves.append(a)
        moves.sort(key=predicted)
        better = None
        for a in moves[:max(0, MIXED_EVALS + scan - len(seen))]:
            if score(a) < score(best) and (better is None or score(a) < score(better)):
                better = a
        if better is None:
            break
        best = better
    what = "KL divergence from the float model's softmax" if probe.classify else "relative squared error"
    msg = (f"bits: auto scored {len(seen)} allocations on the whole quantized model ({scan} in the per-layer "
           f"scan; {what} on {probe.samples} calibration samples): ")
    if uniform is not None and best != uniform:
        # leave uniform only on evidence: a paired gain larger than one standard error
        d = per_sample(best) - per_sample(uniform)
        se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        if float(d.mean()) + se >= 0:
            msg += (f"the best mixed allocation ({', '.join(f'{n}={best[n]}' for n in names)}: {score(best):.4g}) "
                    f"beats uniform by less than one standard error ({se:.2g}), so uniform; ")
            best = uniform
    msg += f"chosen {score(best):.4g}"
    if uniform is not None:
        msg += f"; uniform {uniform[names[0]]} bits {score(uniform):.4g}"
    ctx.log.notes.append(msg)
    log.debug("mixed-precision sensitivity: %s", sens)
    return best


# ---- the stage -----------------------------------------------------------------------------

def apply(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> nn.Module:
    if spec.granularity == "group" and spec.group_size is None:
        raise RecipeError(f"{ctx.where}.group_size is required with granularity: group; got none")
    if spec.bits == "auto" and spec.budget_bits is None and spec.budget_bytes is None:
        raise RecipeError(f"{ctx.where}.budget_bits (or budget_bytes) is required with bits: auto; got none")
    mode = spec.mode
    if mode in ("static", "qat") or spec.rounding == "gptq" or spec.bits == "auto" or spec.bias_correction:
        _calib_required(spec, ctx)

    split_attention(model, ctx)
    layers = weighted_layers(model)
    rnns = recurrent_layers(model)
    names = select([*layers, *rnns], spec.layers, spec.exclude, where=ctx.where)
    for n in [*layers, *rnns]:
        if n not in names:
            ctx.log.skipped[n] = "excluded by the recipe"
    rnn_done = quantize_recurrent(model, [n for n in names if n in rnns], spec, ctx)
    names = [n for n in names if n in layers]
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
    if spec.reduce_range and mode in ("static", "qat", "dynamic") and 8 in (spec.candidate_bits if spec.bits == "auto" else [spec.bits]):
        ctx.log.notes.append("8-bit weights use 7 bits (reduce_range: true) so that ONNX Runtime's u8s8 integer "
                             "kernels cannot saturate on AVX2 CPUs without VNNI; set reduce_range: false for VNNI or ARM")
    if not names:
        if rnn_done:
            _kernel_notes(model, spec, ctx)
        else:
            ctx.log.notes.append("no layer was quantized")
        return model

    if spec.fold_bn and mode in ("static", "qat"):
        _fold_bn(model, names, ctx)
    if spec.equalize:
        _equalize(model, names, ctx)
    if spec.keep_slow_float and mode in ("static", "qat"):
        for n in _slow_int8_convs(model, names, spec, ctx):
            names.remove(n)
        if not names:
            ctx.log.notes.append("no layer was quantized")
            return model

    # mixed precision: bits per layer from sensitivity
    if spec.bits == "auto":
        bits_of = _mixed_bits(model, names, spec, ctx)
        sizes = {n: layers[n].weight.numel() for n in names}
        stored = {n: _stored_bits(spec, bits_of[n], layers[n]) for n in names}
        avg = sum(sizes[n] * stored[n] for n in names) / sum(sizes.values())
        packed = sum(math.ceil(sizes[n] * stored[n] / 8) for n in names)
        reduced = " (8-bit codes span 7 bits, reduce_range)" if any(stored[n] != bits_of[n] for n in names) else ""
        ctx.log.notes.append("bits: auto chose " + ", ".join(f"{n}={bits_of[n]}" for n in names)
                             + f"; average {avg:.3f} weight bits{reduced}, {packed:,} packed weight bytes "
                               "(estimate; the ONNX file stores codes in int8)")
    else:
        bits_of = {n: int(spec.bits) for n in names}

    # activations fused into the layers; which layer outputs, residual adds and pools get quantizers;
    # which inputs share their producer's quantizer (from the traced graph, or nn.Sequential order)
    static = mode in ("static", "qat")
    plan = _Plan()
    if static:
        plan = _graph_plan(model, names, spec, ctx)
        model = plan.gm if plan.gm is not None else model
    acts = {n: model.get_submodule(a) if a else nn.ReLU() for n, a in plan.acts.items()}
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
            ql.guard_input = True
        if n in obs_out:
            ql.set_spec("out", obs_out[n])
        float_weights[n] = layer.weight.detach().clone()
        codes = None
        weight_mse = mode == "weight_only" and spec.observer == "mse" and not w_spec.is_float  # observer for weights
        if spec.rounding == "gptq" and not w_spec.is_float and n in grams:
            codes, w_cal = _gptq_layer(layer, grams[n], w_spec, weight_mse)
            if mode == "dynamic":  # the scales the export stores as float16; rounded up, the codes stay in range
                w_cal = w_cal.with_params(Q.half_up(w_cal.scale), w_cal.zero_point)
            ql.set_spec("w", w_cal)
        elif weight_mse:
            ql.set_spec("w", Q.calibrate_mse(layer.weight, w_spec))
        ql.freeze(codes)
        if mode == "qat":  # training starts from the float weights
            layer.weight.data.copy_(float_weights[n])
        replace(model, n, ql)
        if plan.acts.get(n):
            replace(model, plan.acts[n], nn.Identity())
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
    elif spec.finetune is not None:  # dynamic, weight_only: the codes must be those of the fine-tuned weights
        ctx.finetune(model, spec.finetune, label=f"{ctx.where} fine-tune")
        for ql in quant_layers(model).values():
            ql.freeze(recalibrate=True)
        ctx.log.notes.append("fine-tuned the float weights, then quantized them again (codes and scales of the "
                             "fine-tuned weights)")

    for n in names:
        ql = qls[n]
        what = f"{mode}: weight {ql.w_spec.describe()}"
        if ql.in_spec is not None:
            what += f", input {ql.in_spec.describe()}"
        if ql.out_spec is not None:
            what += f", output {ql.out_spec.describe()}"
        if ql.act is not None:
            what += f", {type(ql.act).__name__} fused"
        if spec.rounding == "gptq" and n in grams:
            what += ", GPTQ rounding"
        if mode == "weight_only" and spec.observer == "mse" and not ql.w_spec.is_float:
            what += ", MSE-searched weight scales"
        ctx.log.touched[n] = what
    if spec.embeddings and mode != "qat":
        _quantize_embeddings(model, spec, ctx)
    if ctx.inspect:
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
        replace(model, n, qe)
        ctx.log.touched[n] = f"embedding {qe.w_spec.describe()} (Gather, then dequantize the rows)"


def _train(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
    """Quantization-aware fine-tune; weights (and LSQ step sizes) train, codes are frozen after."""
    qls = quant_layers(model)
    shared: dict[int, nn.Parameter] = {}
    # a grid shared with an ActQuant (a layer reading a concatenation, a gate or a pool; a pool reading a
    # layer) stays fixed, as the ActQuant's does: a step learned on one side only would requantize between
    # the two, and ONNX Runtime then runs the layer float
    fixed = [m.scale for m in model.modules() if isinstance(m, ActQuant) and m.calibrated]
    for ql in qls.values():
        ql.mode = "qat"
        if spec.lsq:
            ql.lsq = True
            ql.w_lsq = nn.Parameter(ql.w_spec.scale.clone())
            for key in ("in", "out"):
                s = ql._spec(key)
                if s is not None and any(torch.equal(getattr(ql, f"{key}_scale"), f) for f in fixed):
                    continue
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
