"""GPTQ rounding of a layer's weights from the Gram matrix of its calibration inputs (Frantar et al. 2022)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...primitives import quant as Q
from ...primitives.quant import QuantSpec


def gptq_columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
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


def gptq_layer(layer: nn.Module, gram: torch.Tensor, spec: QuantSpec, mse: bool) -> tuple[torch.Tensor, QuantSpec]:
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
