"""``QuantEmbedding``: an nn.Embedding whose table is int8, looked up and dequantized after the Gather."""
from __future__ import annotations

import torch
from torch import nn

from . import quant as Q
from .onnxops import GatherColumns
from .quant import QuantSpec


class QuantEmbedding(nn.Module):
    """An nn.Embedding whose table is int8, symmetric, one scale per column (embedding dimension):
    the looked-up rows are dequantized after the Gather, so the table is never expanded to float, and
    the file holds ``dim`` scales, not one per vocabulary entry."""

    def __init__(self, emb: nn.Embedding, bits: int = 8) -> None:
        super().__init__()
        self.emb = emb
        spec = Q.calibrate(emb.weight.detach(), QuantSpec(bits=bits, signed=True, symmetric=True,
                                                          granularity="channel", axis=1))
        self._w = spec
        self.register_buffer("w_scale", spec.scale.clone())
        self.register_buffer("w_zp", spec.zero_point.to(torch.int8).clone())
        self.register_buffer("qweight", Q.quantize(emb.weight.detach(), spec).to(torch.int8))
        with torch.no_grad():
            emb.weight.copy_(Q.dequantize(self.qweight, spec))

    @property
    def w_spec(self) -> QuantSpec:
        return self._w.with_params(self.w_scale, self.w_zp.to(torch.int32))

    def specs(self) -> dict[str, QuantSpec]:
        return {"weight": self.w_spec}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return GatherColumns.apply(ids, self.qweight, self.w_scale, self.w_zp)
        return self.emb(ids)

    def extra_repr(self) -> str:
        return f"weight={self.w_spec.describe()}"
