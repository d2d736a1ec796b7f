"""Edits of the float model before it is quantized: batch norm folding, cross-layer equalization, and
bias correction after."""
from __future__ import annotations

import contextlib
import io

import torch
import torch.fx
from torch import nn

from ...context import Context
from ...layers import next_siblings, replace
from ...primitives import quant as Q
from ...primitives.qlayer import quant_layers
from .calibrate import run_hooked
from .placement import PASS_THROUGH
from .spec import QuantizeSpec


def batch_norm_after(model: nn.Module, names: list[str]) -> dict[str, str]:
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
            sib = next_siblings(model, n)
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


def fold_bn(model: nn.Module, names: list[str], ctx: Context) -> None:
    """Fold each batch norm that only reads a chosen conv into that conv's weight and bias."""
    for name, bn_name in batch_norm_after(model, names).items():
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


def equalize(model: nn.Module, names: list[str], ctx: Context) -> None:
    """Cross-layer equalization over consecutive layers joined only by ReLU / pooling / Flatten."""
    chosen = set(names)
    for name in names:
        layer = model.get_submodule(name)
        between = []
        for sib_name, sib in next_siblings(model, name):
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
def bias_correction(model: nn.Module, ctx: Context, spec: QuantizeSpec, float_weights: dict[str, torch.Tensor]):
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
    run_hooked(model, hooks, ctx, spec.calib_batches)
    for name, ql in layers.items():
        if name not in sums:
            continue
        delta = sums[name] / counts[name]
        if ql.layer.bias is None:
            ql.layer.bias = nn.Parameter(torch.zeros(ql.layer.weight.shape[0]))
        ql.layer.bias.add_(delta)
        ctx.log.notes.append(f"bias correction {name}: mean |shift| {float(delta.abs().mean()):.3g}")
