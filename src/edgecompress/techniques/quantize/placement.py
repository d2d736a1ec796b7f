"""Where a static model's activations are quantized (from its fx graph), and which thin-input convs stay
float because ONNX Runtime would run them slower in int8 (the float rule)."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from ...context import Context
from ...layers import layer_macs, next_siblings, parent
from ...primitives.qlayer import ACT, ActQuant, QuantLayer
from .calibrate import observer
from .spec import QuantizeSpec, act_spec

#: modules that keep the quantization grid of their input (an output spec passes through them)
PASS_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)

# ---- layers that run faster in float (the ONNX Runtime float rule) -------------------------------------------------------

#: Relative cost of ONNX Runtime's (MLAS, AVX2) int8 kernels against its float ones, measured on an
#: idle 2-core machine (bench/quantize.py): a 1-3 channel conv costs about 2.7x its float time in
#: int8 (2-D; 1.7x for Conv1d), because the int8 kernel builds an im2col buffer the float kernel
#: avoids; every other layer about 0.6x. From these and each layer's MACs the stage estimates how
#: much slower the all-int8 model is than the one with its thin convs float, and keeps them float at
#: SLOW_INT8 or worse. A rule, not a timing: the same recipe gives the same model on any machine.
THIN_INT8_COST = {nn.Conv1d: 1.7, nn.Conv2d: 2.7}
INT8_COST = 0.6
SLOW_INT8 = 1.2


def slow_int8_convs(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> list[str]:
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
class Plan:
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


def graph_plan(model: nn.Module, names: list[str], spec: QuantizeSpec, ctx: Context) -> Plan:
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
    plan = Plan()
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
    for node, name, kind, only in inserts:
        obs = observer(spec) if kind != "pool" else None
        _add_module(model, name, ActQuant(act_spec(spec), obs, kind))
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
    """Register a new module under the dotted ``name``."""
    owner, attr = parent(model, name)
    owner.add_module(attr, module)


def _sequential_plan(model: nn.Module, names: list[str]) -> Plan:
    """Fused activations and shared quantizers from nn.Sequential order alone."""
    plan = Plan()
    for n in names:
        sibs = [(sn, sm) for sn, sm in next_siblings(model, n) if not isinstance(sm, nn.Identity)]
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
