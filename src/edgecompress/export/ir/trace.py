"""A PyTorch model as an fx graph module (batch norm folded, shapes propagated), its activation ranges
on calibration data, and what each fx node computes."""
from __future__ import annotations

import contextlib
import copy
import io
import operator
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import RecipeError


_RELU_FNS = {F.relu, torch.relu}
_ADD_FNS = {operator.add, torch.add}
_MUL_FNS = {operator.mul, torch.mul}
_CAT_FNS = {torch.cat, torch.concat}
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
#: activations that run as a 256-entry int8 table: torch module or function -> its name
LUT_MODULES = {nn.Sigmoid: "Sigmoid", nn.Hardsigmoid: "Hardsigmoid", nn.Hardswish: "Hardswish", nn.SiLU: "SiLU"}
_LUT_FNS = {torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", F.hardsigmoid: "Hardsigmoid", F.hardswish: "Hardswish",
            F.silu: "SiLU"}
ALIAS_MODULES = (nn.Dropout, nn.Identity, nn.Dropout1d, nn.Dropout2d)
_ADAPTIVE_FNS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


def trace(model: nn.Module, example: torch.Tensor, fmt: str):
    """fx graph module with batch norm folded into the convs and shapes propagated."""
    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse
    from torch.fx.passes.shape_prop import ShapeProp

    from torch.fx import GraphModule, Tracer

    model = copy.deepcopy(model).eval()
    ql = quant_layer_cls()

    class _Tracer(Tracer):
        def is_leaf_module(self, m, qualname):
            return (ql is not None and isinstance(m, (ql, act_quant_cls()))) or super().is_leaf_module(m, qualname)

    quantized = ql is not None and any(isinstance(m, ql) for m in model.modules())
    try:
        if quantized:  # QuantLayers stay leaves (their batch norm is folded already); a conv the
            # quantize stage kept float (keep_slow_float) still has its batch norm: folded here
            gm = fuse(GraphModule(model, _Tracer().trace(model)), inplace=True, no_trace=True)
        else:
            gm = fuse(symbolic_trace(model))  # batch norm folded into the preceding conv
        x = example[:1]
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before it raises
            ShapeProp(gm).propagate(x if not x.is_floating_point() else x.float())
    except Exception as e:  # fx raises many kinds of errors for untraceable code
        raise RecipeError(f"export {fmt}: the model cannot be traced by torch.fx: "
                          f"{str(e).splitlines()[0][:200]}") from None
    return gm


def calibrate(gm, data: Iterable[torch.Tensor], names: set[str]) -> dict[str, tuple[float, float]]:
    """Min-max of the outputs of the named fx nodes over the calibration batches."""
    from torch.fx import Interpreter

    ranges: dict[str, list[float]] = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor):
                lo, hi = float(out.min()), float(out.max())
                r = ranges.setdefault(n.name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
            return out

    with torch.no_grad():
        for x in data:
            Recorder(gm).run(x.float())
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def quant_layer_cls():
    try:
        from ...primitives.qlayer import QuantLayer
    except ImportError:  # quantization is optional for the device exports
        return None
    return QuantLayer


def act_quant_cls():
    from ...primitives.qlayer import ActQuant
    return ActQuant


def layer_name(node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def op_name(gm, node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()"


def is_relu(gm, node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_relu6(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU6)
    return node.op == "call_function" and node.target is F.relu6


def lut_fn(gm, node) -> str | None:
    """The activation ``node`` computes if it is one that runs as a table (Sigmoid, Hardsigmoid, ...)."""
    if node.op == "call_module":
        return LUT_MODULES.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        return _LUT_FNS.get(node.target)
    return "Sigmoid" if node.op == "call_method" and node.target == "sigmoid" else None


def is_add(gm, n) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FNS) or (n.op == "call_method" and n.target == "add")


def is_mul(gm, n) -> bool:
    return (n.op == "call_function" and n.target in _MUL_FNS) or (n.op == "call_method" and n.target == "mul")


def is_cat(gm, n) -> bool:
    return n.op == "call_function" and n.target in _CAT_FNS


def is_gate(g: tuple[int, ...], x: tuple[int, ...]) -> bool:
    """Whether shape ``g`` is a per-channel gate of shape ``x``: (N, C, 1, 1) against (N, C, H, W)."""
    return len(g) == len(x) >= 3 and g[:2] == x[:2] and all(d == 1 for d in g[2:]) and g != x


def is_flatten(gm, n, shape) -> bool:
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Flatten):
        m = gm.get_submodule(n.target)
        return m.start_dim == 1 and m.end_dim == -1
    if n.op == "call_function" and n.target is torch.flatten:
        return (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1
    if n.op == "call_method" and n.target in ("flatten", "view", "reshape"):
        out = shape(n)
        return len(out) == 2 and (n.target != "flatten" or (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1)
    return False


def is_global_average(gm, n, shape) -> bool | None:
    """Whether ``n`` averages each channel over all positions: AdaptiveAvgPool (module or function)
    to size 1, or ``x.mean((2, 3))`` / ``torch.mean(x, -1)`` over every spatial dim; False for an
    adaptive pool to another size; None for anything else."""
    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = gm.get_submodule(n.target).output_size
    elif n.op == "call_function" and n.target in _ADAPTIVE_FNS:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
    elif (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        rank = len(shape(n.args[0]))
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims or ())}
        return True if rank > 2 and dims == set(range(2, rank)) else None
    else:
        return None
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(s == 1 for s in sizes)


def shape_only(n) -> bool:
    """Whether fx node ``n`` computes only sizes (no tensor) that only views read: ``x.size()``, its
    items, ``channels // groups``."""
    if "tensor_meta" in n.meta or n.op not in ("call_method", "call_function"):
        return False
    return all(shape_only(u) or (u.op == "call_method" and u.target in ("view", "reshape")) for u in n.users)
