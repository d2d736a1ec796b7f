"""Lower a PyTorch model to the integer graph (``graph.Graph``) the C, TFLite and integer reference share.

Raises RecipeError naming the first layer the device exports cannot handle (``SUPPORTED`` lists the
ones they can).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ...context import calibration_batches
from ...errors import RecipeError
from .graph import Graph, Op, QParams, Tensor
from .qparams import UNIT_GRIDS, act_qparams, concat_grids, quantize_graph
from .trace import (ALIAS_MODULES, BN_MODULES, LUT_MODULES, act_quant_cls, is_add, is_cat, is_flatten, is_gate,
                    is_global_average, is_mul, is_relu, is_relu6, layer_name, lut_fn, op_name, quant_layer_cls,
                    shape_only, trace)


SUPPORTED = ("Conv1d, Conv2d (any groups: dense, grouped, depthwise), Linear, ReLU, MaxPool1d/2d, AvgPool1d/2d, "
             "AdaptiveAvgPool to 1, Flatten, residual add, channel concatenation, chunk/split along the channels, "
             "channel shuffle, BatchNorm (after a conv: folded; "
             "elsewhere: a per-channel affine), Sigmoid, Hardsigmoid, Hardswish, SiLU, multiply by a same-shape "
             "tensor or a channel gate (squeeze-excitation), Dropout, Identity")


def unsupported(fmt: str, layer: str, what: str, why: str = "") -> RecipeError:
    reason = f" ({why})" if why else ""
    return RecipeError(f"export {fmt}: layer {layer!r} ({what}) is not supported{reason}; "
                       f"supported: {SUPPORTED}")


def lower_task(model: nn.Module, task, fmt: str, quantize: bool = True) -> Graph:
    """``lower`` with the task's example input and calibration data."""
    calib = [x for x, _ in calibration_batches(task, 8)] if quantize else None
    return lower(model, task.example_input, calib=calib, fmt=fmt, quantize=quantize)


def lower(model: nn.Module, example: torch.Tensor, *, calib: Iterable[torch.Tensor] | None = None,
          qparams: Mapping[str, tuple[float, int]] | None = None, fmt: str = "c",
          quantize: bool = True) -> Graph:
    """The integer graph of ``model``.

    ``qparams`` gives (scale, zero point) per activation tensor by fx node name; the others are
    calibrated (min-max) on ``calib`` batches. With ``quantize=False`` only the float graph is built
    (for fp32 exports). Raises RecipeError naming the first layer the exports cannot handle.
    """
    gm = trace(model, example, fmt)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise RecipeError(f"export {fmt}: the model must take one input tensor; got {len(placeholders)}")
    users = {n: list(n.users) for n in nodes}
    tensors: dict[str, Tensor] = {}
    ops: list[Op] = []
    name_of: dict = {}  # fx node -> graph tensor name
    src_of: dict[str, str] = {}  # graph tensor -> fx node whose output range it has
    same_q: dict[str, str] = {}  # graph tensor -> tensor whose quantization it must share

    def shape(n) -> tuple[int, ...]:
        return tuple(n.meta["tensor_meta"].shape)

    def new_tensor(n, chw=None) -> str:
        t = Tensor(n.name, _nhwc_shape(shape(n)), chw=chw)
        tensors[t.name] = t
        name_of[n] = t.name
        src_of[t.name] = n.name
        return t.name

    def fused_relu(n):
        """The relu (or relu6) that follows ``n`` as its only user, if any."""
        us = users[n]
        if len(us) == 1 and (is_relu(gm, us[0]) or is_relu6(gm, us[0])):
            return us[0]
        return None

    def fuse_act(n, op: Op) -> None:
        relu = fused_relu(n)
        if relu is not None:
            op.relu, op.relu6 = True, is_relu6(gm, relu)
            skip.add(relu)
            op.output = new_tensor(relu)
            name_of[n] = op.output
        else:
            op.output = new_tensor(n)

    QL = quant_layer_cls()
    preset: dict[str, QParams] = {}  # activation parameters from the quantization spec
    fixed: dict[str, QParams] = {}  # grids an op requires (a sigmoid's output: [0, 1] in steps of 1/256)
    grouped: dict = {}  # fx node -> (tensor, groups, transposed): a channel shuffle's 5-D view
    chunks: dict = {}  # fx node -> (tensor, channels of each part): a chunk or split along the channels
    notes: list[str] = []

    x = placeholders[0]
    rank = len(shape(x))
    input_layout = {4: "nchw", 3: "ncl", 2: "nf"}.get(rank)
    if input_layout is None:
        raise RecipeError(f"export {fmt}: the input must have 2, 3 or 4 dimensions; got shape {list(shape(x))}")
    new_tensor(x)
    _refuse_kernelless(gm, nodes, fmt)
    skip: set = set()
    for n in nodes:
        if n.op in ("placeholder", "get_attr") or n in skip:
            continue
        if n.op == "output":
            out_node = n.args[0]
            if not isinstance(out_node, torch.fx.Node) or out_node not in name_of:
                raise RecipeError(f"export {fmt}: the model must return one tensor")
            continue
        layer, what = layer_name(n), op_name(gm, n)
        args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if shape_only(n):
            continue  # size arithmetic for a view (x.size(), its items, channels // groups)
        if _channel_shuffle_step(gm, n, shape, name_of, grouped):
            continue
        if n.op == "call_method" and n.target in ("view", "reshape") and args and args[0] in grouped:
            src, groups, swapped = grouped[args[0]]
            c = tensors[src].shape[-1]
            if swapped and len(shape(n)) == 4 and shape(n)[1] == c:  # (N, C / g, g, H, W) -> (N, C, H, W)
                idx = np.arange(c).reshape(groups, c // groups).T.reshape(-1)
                ops.append(Op("gather", layer, [src], new_tensor(n), index=idx))
                same_q[ops[-1].output] = src
                continue
        if any(a in grouped for a in args):
            raise unsupported(fmt, layer, what, "of a 5-D view: only a channel shuffle (view to (N, groups, "
                                                "C / groups, H, W), transpose(1, 2), view back)")
        if (n.op == "call_method" and n.target in ("chunk", "split")) or \
                (n.op == "call_function" and n.target in (torch.chunk, torch.split)):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            if dim % len(shape(args[0])) != 1 or tensors[name_of[args[0]]].chw is not None:
                raise unsupported(fmt, layer, what, f"dim={dim}: only along the channels (dim 1) of an unflattened "
                                                    "tensor")
            chunks[n] = (name_of[args[0]], [int(m.shape[1]) for m in n.meta["tensor_meta"]])
            continue
        if n.op == "call_function" and n.target is operator.getitem and args and args[0] in chunks:
            src, sizes = chunks[args[0]]
            if not isinstance(n.args[1], int):
                raise unsupported(fmt, layer, what, "only one part of a chunk or split at a time")
            k = n.args[1]
            start = sum(sizes[:k])
            ops.append(Op("gather", layer, [src], new_tensor(n), index=np.arange(start, start + sizes[k])))
            same_q[ops[-1].output] = src
            continue
        if mod is not None and isinstance(mod, ALIAS_MODULES):
            name_of[n] = name_of[args[0]]
            continue
        if mod is not None and QL is not None and isinstance(mod, act_quant_cls()):
            # the quantize stage's activation quantizer: its spec is the tensor's after an add, a multiply
            # or a concatenation (an average pool's output shares its input's, as the integer kernels here
            # do; a sigmoid's is [0, 1] in steps of 1/256)
            name_of[n] = name_of[args[0]]
            if quantize and mod.spec is not None and (mod.kind == "add" or is_mul(gm, args[0])
                                                      or is_cat(gm, args[0])):
                preset[name_of[n]] = act_qparams(mod.spec)
            continue
        if mod is not None and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            ops.append(_weighted(mod, layer, what, tensors[name_of[args[0]]], fmt))
            fuse_act(n, ops[-1])
            _count_macs(ops[-1], tensors)
            continue
        if mod is not None and QL is not None and isinstance(mod, QL):
            t_in = tensors[name_of[args[0]]]
            op = _from_quant_layer(mod, layer, t_in, fmt, preset, notes, quantize)
            ops.append(op)
            if mod.act is not None:
                op.relu, op.relu6 = True, isinstance(mod.act, nn.ReLU6)
            fuse_act(n, op)
            if quantize and mod.out_spec is not None:
                preset[op.output] = act_qparams(mod.out_spec)
            _count_macs(op, tensors)
            continue
        if mod is not None and isinstance(mod, BN_MODULES):
            if len(shape(args[0])) < 3:
                raise unsupported(fmt, layer, what, "only on an image or a signal: (N, C, H, W) or (N, C, L)")
            ops.append(_affine(mod, layer, what, tensors[name_of[args[0]]], fmt))
            fuse_act(n, ops[-1])
            _count_macs(ops[-1], tensors)
            continue
        if lut_fn(gm, n) is not None:
            ops.append(Op("lut", layer, [name_of[args[0]]], new_tensor(n), fn=lut_fn(gm, n)))
            if ops[-1].fn in UNIT_GRIDS:
                fixed[ops[-1].output] = QParams(*UNIT_GRIDS[ops[-1].fn])
            continue
        if is_mul(gm, n) and len(args) == 2:
            a, b = args
            if is_gate(shape(a), shape(b)):
                a, b = b, a
            if shape(a) != shape(b) and not is_gate(shape(b), shape(a)):
                raise unsupported(fmt, layer, what, f"shapes {list(shape(a))} and {list(shape(b))}: only a tensor of "
                                                    "the same shape or a channel gate (N, C, 1, 1)")
            ops.append(Op("mul", layer, [name_of[a], name_of[b]], ""))
            fuse_act(n, ops[-1])
            continue
        if is_cat(gm, n):
            parts = n.args[0] if n.args else n.kwargs.get("tensors")
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            rank = len(shape(n))
            if not isinstance(parts, (list, tuple)) or not all(isinstance(p, torch.fx.Node) and p in name_of
                                                               for p in parts):
                raise unsupported(fmt, layer, what, "only of a list of tensors")
            if dim % rank != 1:
                raise unsupported(fmt, layer, what, f"dim={dim}: only along the channels (dim 1)")
            ins = [name_of[p] for p in parts]
            if any(tensors[i].chw is not None for i in ins):
                raise unsupported(fmt, layer, what, "of a flattened image")
            ops.append(Op("concat", layer, ins, new_tensor(n)))
            continue
        if mod is not None and isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
            one_d = isinstance(mod, (nn.MaxPool1d, nn.AvgPool1d))
            kind = "maxpool" if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) else "avgpool"
            pad = _pair(mod.padding, one_d, 0)
            if (any(pad) and kind == "avgpool") or getattr(mod, "ceil_mode", False) or \
                    _pair(getattr(mod, "dilation", 1), one_d) != (1, 1):
                raise unsupported(fmt, layer, what, "ceil_mode and dilation must be their defaults, and an average "
                                                    "pool unpadded")
            ks = _pair(mod.kernel_size, one_d)
            st = _pair(mod.stride if mod.stride is not None else mod.kernel_size, one_d)
            ops.append(Op(kind, layer, [name_of[args[0]]], new_tensor(n), kernel=ks, stride=st, pad=pad))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if is_global_average(gm, n, shape) is not None:
            t_in = tensors[name_of[args[0]]]
            if not is_global_average(gm, n, shape):
                raise unsupported(fmt, layer, what, "only output size 1 (global average pooling)")
            ks = (t_in.shape[0], t_in.shape[1])
            if len(shape(n)) == 2:  # x.mean((2, 3)) without keepdim: the pool to 1 x 1, then (N, C)
                pooled = Tensor(f"{n.name}/pool", (1, 1, t_in.shape[-1]))
                tensors[pooled.name], src_of[pooled.name], same_q[pooled.name] = pooled, n.name, t_in.name
                ops.append(Op("avgpool", layer, [t_in.name], pooled.name, kernel=ks, stride=ks))
                ops.append(Op("reshape", layer, [pooled.name], new_tensor(n)))
            else:
                ops.append(Op("avgpool", layer, [t_in.name], new_tensor(n), kernel=ks, stride=ks))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if is_relu(gm, n):
            ops.append(Op("relu", layer, [name_of[args[0]]], new_tensor(n)))
            same_q[ops[-1].output] = ops[-1].inputs[0]
            continue
        if is_flatten(gm, n, shape):
            t_in = tensors[name_of[args[0]]]
            chw = tuple(shape(args[0])[1:])
            ops.append(Op("reshape", layer, [t_in.name], new_tensor(n, chw=chw if len(chw) > 1 else None)))
            same_q[ops[-1].output] = t_in.name
            continue
        if is_add(gm, n) and len(args) == 2 and shape(args[0]) == shape(args[1]):
            ops.append(Op("add", layer, [name_of[a] for a in args], ""))
            fuse_act(n, ops[-1])
            continue
        if mod is not None and isinstance(mod, nn.Flatten):
            raise unsupported(fmt, layer, what, f"start_dim={mod.start_dim}, end_dim={mod.end_dim}: only a flatten "
                                                "from dim 1 to the last")
        raise unsupported(fmt, layer, what)
    out_name = name_of[out_node]
    _check_layouts(ops, tensors, out_name, fmt)
    if quantize:
        ops = concat_grids(ops, tensors, out_name, src_of, same_q, preset, fixed)
    graph = Graph(tensors, ops, name_of[x], out_name, input_layout, notes)
    if quantize:
        quantize_graph(graph, gm, calib, qparams or {}, src_of, same_q, preset, fmt, fixed)
    return graph


def _nhwc_shape(shape: Iterable[int]) -> tuple[int, ...]:
    s = tuple(int(d) for d in shape)[1:]
    if len(s) == 3:
        return (s[1], s[2], s[0])
    if len(s) == 2:
        return (1, s[1], s[0])
    return s


def _pair(v, one_d: bool, fill: int = 1) -> tuple[int, int]:
    """A torch size argument as (h, w); a 1-D layer is 1 x L, with ``fill`` as its height."""
    if isinstance(v, (tuple, list)):
        v = tuple(int(i) for i in v)
        return (fill, v[0]) if one_d else (v[0], v[1] if len(v) > 1 else v[0])
    return (fill, int(v)) if one_d else (int(v), int(v))


_KERNEL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.ReLU6, nn.Flatten, *BN_MODULES,
                   *LUT_MODULES, *ALIAS_MODULES)


def _refuse_kernelless(gm, nodes, fmt: str) -> None:
    """Refuse the first module of a type no device kernel implements (an LSTM, attention, GELU), so the
    line names it rather than a supported layer next to it whose arguments only make sense with it."""
    ql = quant_layer_cls()
    known = _KERNEL_MODULES + ((ql, act_quant_cls()) if ql is not None else ())
    for n in nodes:
        if n.op == "call_module" and not isinstance(gm.get_submodule(n.target), known):
            raise unsupported(fmt, layer_name(n), op_name(gm, n))


def _channel_shuffle_step(gm, n, shape, name_of: dict, grouped: dict) -> bool:
    """Follows a channel shuffle (``x.view(N, g, C // g, H, W)``, ``transpose(1, 2)``, ``contiguous()``)
    in ``grouped``; True when ``n`` is one of those steps (the view back to 4-D emits the op)."""
    args = [a for a in n.args if isinstance(a, torch.fx.Node)]
    if not args:
        return False
    a = args[0]
    if n.op == "call_method" and n.target in ("view", "reshape") and a in name_of and len(shape(a)) == 4 \
            and len(shape(n)) == 5:
        _, c, h, w = shape(a)
        out = shape(n)
        if out[3:] == (h, w) and out[1] * out[2] == c:
            grouped[n] = (name_of[a], out[1], False)
            return True
        return False
    if a in grouped and ((n.op == "call_function" and n.target is torch.transpose) or
                         (n.op == "call_method" and n.target == "transpose")):
        dims = sorted(int(d) % 5 for d in n.args[1:3])
        if dims == [1, 2] and not grouped[a][2]:
            grouped[n] = (*grouped[a][:2], True)
            return True
        return False
    if n.op == "call_method" and n.target == "contiguous":
        if a in grouped:
            grouped[n] = grouped[a]
        else:
            name_of[n] = name_of[a]
        return True
    return False


def _from_quant_layer(mod, layer: str, t_in: Tensor, fmt: str, preset: dict[str, QParams], notes: list[str],
                      quantize: bool) -> Op:
    """A weighted op from a quantize stage's QuantLayer: its codes, scales and activation specs."""
    inner = mod.layer
    what = f"QuantLayer({type(inner).__name__})"
    if not isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        raise unsupported(fmt, layer, what)
    op = _weighted(inner, layer, what, t_in, fmt)
    if not quantize:
        return op
    ws = mod.w_spec
    if ws.is_float or ws.bits > 8 or not ws.symmetric or not ws.signed or ws.granularity == "group":
        raise unsupported(fmt, layer, what, f"weights {ws.describe()}: the device exports take signed symmetric "
                                            "per-tensor or per-channel weights of at most 8 bits")
    for key, spec in (("input", mod.in_spec), ("output", mod.out_spec)):
        if spec is not None and (spec.bits > 8 or spec.granularity != "tensor"):
            raise unsupported(fmt, layer, what, f"{key} {spec.describe()}: activations must be 8-bit per-tensor")
    codes = mod.qweight.detach().to(torch.int64).numpy()
    n_out = codes.shape[0]
    op.qweight = _export_layout(inner, codes, t_in).astype(np.int8)
    op.wscale = np.broadcast_to(mod.w_spec.scale.detach().float().numpy().reshape(-1), (n_out,)).astype(np.float32)
    if mod.in_spec is not None:
        q = act_qparams(mod.in_spec)
        if t_in.name in preset and preset[t_in.name] != q:
            notes.append(f"{layer}: input spec differs from its producer's output spec; the producer's is used")
        preset.setdefault(t_in.name, q)
    bs = mod.bias_spec
    if bs is not None and inner.bias is not None:
        from ...primitives import quant as Q
        op.qbias = Q.quantize(inner.bias.detach().float(), bs).to(torch.int64).numpy().astype(np.int32)
        op.bias_scale = bs.scale.detach().float().numpy().reshape(-1)
    return op


def _weighted(mod: nn.Module, layer: str, what: str, t_in: Tensor, fmt: str) -> Op:
    w = mod.weight.detach().float().numpy()
    b = mod.bias.detach().float().numpy() if mod.bias is not None else np.zeros(w.shape[0], np.float32)
    if isinstance(mod, nn.Linear):
        return Op("fc", layer, [t_in.name], "", weight=_export_layout(mod, w, t_in), bias=b)
    one_d = isinstance(mod, nn.Conv1d)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pad = (0, 0)
        elif all(k % 2 == 1 for k in mod.kernel_size):
            pad = _pair(tuple(k // 2 for k in mod.kernel_size), one_d, 0)
        else:
            raise unsupported(fmt, layer, what, "padding 'same' needs odd kernels")
    else:
        pad = _pair(mod.padding, one_d, 0)
    if _pair(mod.dilation, one_d) != (1, 1) or mod.padding_mode != "zeros":
        raise unsupported(fmt, layer, what, "dilation must be 1 and padding_mode zeros")
    if one_d:
        w = w[:, :, None, :]  # (O, I, 1, k)
    ks, st = (w.shape[2], w.shape[3]), _pair(mod.stride, one_d)
    kind = "dwconv" if _depthwise(mod) else "conv"
    return Op(kind, layer, [t_in.name], "", kernel=ks, stride=st, pad=pad, groups=1 if kind == "dwconv" else mod.groups,
              weight=_export_layout(mod, mod.weight.detach().float().numpy(), t_in), bias=b)


def _affine(mod: nn.Module, layer: str, what: str, t_in: Tensor, fmt: str) -> Op:
    """A batch norm that no conv precedes: y = x * w + b per channel, as a 1x1 depthwise convolution."""
    if mod.running_mean is None:
        raise unsupported(fmt, layer, what, "track_running_stats=False: it normalises with batch statistics")
    inv = 1.0 / np.sqrt(mod.running_var.detach().double().numpy() + mod.eps)
    gamma = mod.weight.detach().double().numpy() if mod.weight is not None else np.ones_like(inv)
    beta = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros_like(inv)
    w = gamma * inv
    b = beta - mod.running_mean.detach().double().numpy() * w
    return Op("dwconv", layer, [t_in.name], "", weight=w.astype(np.float32).reshape(1, 1, 1, -1),
              bias=b.astype(np.float32))


def _export_layout(mod: nn.Module, w: np.ndarray, t_in: Tensor) -> np.ndarray:
    """A torch weight in the graph's layout: Linear (O, I) with NHWC-ordered columns, conv OHWI (a grouped
    conv's I is its channels per group), depthwise 1HWO, a Conv1d as a 1 x k conv."""
    if isinstance(mod, nn.Linear):
        if t_in.chw is not None:  # torch flattened (C, H, W); the graph holds (H, W, C)
            w = w.reshape(w.shape[0], *t_in.chw).transpose(0, 2, 3, 1) if len(t_in.chw) == 3 \
                else w.reshape(w.shape[0], *t_in.chw).transpose(0, 2, 1)
        return np.ascontiguousarray(w.reshape(w.shape[0], -1))
    if isinstance(mod, nn.Conv1d):
        w = w[:, :, None, :]
    if not _depthwise(mod):
        return np.ascontiguousarray(w.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(w.transpose(1, 2, 3, 0))


def _depthwise(mod: nn.Module) -> bool:
    return mod.groups > 1 and mod.groups == mod.in_channels


def _count_macs(op: Op, tensors: dict[str, Tensor]) -> None:
    out = tensors[op.output]
    if op.kind == "fc":
        op.macs = int(op.weight.size)
    elif op.kind == "conv":
        op.macs = int(out.shape[0] * out.shape[1] * op.weight.size)
    elif op.kind == "dwconv":
        op.macs = int(out.shape[0] * out.shape[1] * op.weight.size)


def _check_layouts(ops: list[Op], tensors: dict[str, Tensor], out: str, fmt: str) -> None:
    """A flattened image must feed a Linear (whose columns are reordered) or be 1 x 1 spatially."""
    consumers: dict[str, list[Op]] = {}
    for op in ops:
        for i in op.inputs:
            consumers.setdefault(i, []).append(op)
    for op in ops:
        t = tensors[op.output]
        if op.kind == "reshape" and t.chw is not None and int(np.prod(t.chw[1:])) > 1:
            bad = [c for c in consumers.get(t.name, []) if c.kind != "fc"]
            if bad or t.name == out:
                who = bad[0].layer if bad else "the model output"
                raise RecipeError(f"export {fmt}: layer {op.layer!r} (flatten) must feed a Linear layer; "
                                  f"it feeds {who}")
