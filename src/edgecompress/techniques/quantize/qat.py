"""Quantization-aware training: fake-quantized layers fine-tuned (straight-through estimator, or LSQ step
sizes), then frozen to integer codes."""
from __future__ import annotations

import torch
from torch import nn

from ...context import Context
from ...primitives import quant as Q
from ...primitives.qlayer import ActQuant, quant_layers
from ...spec import FineTune
from .spec import QuantizeSpec


def train_qat(model: nn.Module, spec: QuantizeSpec, ctx: Context) -> None:
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
