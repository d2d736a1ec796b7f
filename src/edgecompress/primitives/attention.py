"""``Attention``: ``nn.MultiheadAttention`` computed by four plain ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps its query/key/value projection as one packed parameter
(``in_proj_weight``) and hands it, and ``out_proj.weight``, straight to
``F.multi_head_attention_forward``: ``out_proj`` is never called as a module, so forward hooks on it
never fire and replacing it by another module (a factored Sequential, a quantized layer) is silently
ignored or breaks the attention's forward. ``Attention`` computes the same function with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` called as modules, so every technique that works
on a Linear (quantize static / dynamic / weight-only, low rank, clustering, pruning) works on the
projections, and the ONNX export is MatMul / Softmax / MatMul that ONNX Runtime runs as-is (with
integer kernels for the quantized projections).

``explicit_attention(model)`` swaps every ``nn.MultiheadAttention`` for an equal ``Attention``
(checked to 1e-5 on random inputs by the tests) and returns the names it swapped.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import RecipeError
from ..layers import replace


class Attention(nn.Module):
    """Multi-head attention with the signature and results of ``nn.MultiheadAttention``.

    ``in_proj_weight`` / ``in_proj_bias`` are None and ``_qkv_same_embed_dim`` False, so the fused
    fast paths of ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (which read the packed
    weight) are never taken and the layer calls this module's forward.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)  # fixed: pruning heads keeps each head's scale
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> Attention:
        if mha.bias_k is not None or mha.add_zero_attn:
            what = "add_bias_kv" if mha.bias_k is not None else "add_zero_attn"
            raise RecipeError(f"layer {name!r} (MultiheadAttention) uses {what}: its projections cannot be split "
                              "into Linear layers for quantization, low rank or pruning")
        e = mha.embed_dim
        new = cls(e, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv)):
                lin.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        q = q.reshape(q.size(0), q.size(1), self.num_heads, -1).transpose(1, 2)
        k = k.reshape(k.size(0), k.size(1), self.num_heads, -1).transpose(1, 2)
        v = v.reshape(v.size(0), v.size(1), self.num_heads, -1).transpose(1, 2)
        scores = torch.matmul(q * self.scaling, k.transpose(-2, -1))  # (B, H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(scores.size(-2), scores.size(-1), dtype=torch.bool,
                                   device=scores.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (B * H, L, S)
                attn_mask = attn_mask.reshape(scores.size(0), self.num_heads, attn_mask.size(-2), attn_mask.size(-1))
            scores = _masked(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _masked(scores, key_padding_mask[:, None, None, :])
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.size(0), out.size(1), -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


def _masked(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: not allowed) becomes -inf; a float mask is added."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def explicit_attention(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by an equal ``Attention``; a
    ``nn.TransformerEncoder`` holding one stops using nested tensors (its fast path reads the packed
    weight). Returns the names replaced."""
    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            replace(model, name, Attention.from_mha(m, name))
            done.append(name)
    if done:
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder):
                m.use_nested_tensor = False
    return done


def split_attention(model: nn.Module, ctx) -> list[str]:
    """``explicit_attention`` for a stage: the swap is noted in ``ctx.log``."""
    done = explicit_attention(model)
    if done:
        ctx.log.notes.append(f"nn.MultiheadAttention {', '.join(done)}: computed by explicit q_proj, k_proj, "
                             "v_proj and out_proj Linear layers (same outputs) so that the stage reaches them")
    return done
