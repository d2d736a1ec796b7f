"""Saliency scores and the masks that keep the most salient entries."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def magnitude(w: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """Element-wise magnitude |w|^p (the ranking is the same for p = 1 and 2; p matters for groups)."""
    return w.abs() if norm == 1 else w.pow(2)


def keep_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask that zeros exactly the ``n_prune`` lowest scores (ties broken by position)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = False
    return mask.view_as(scores)


def global_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One threshold over all tensors: exactly round(sparsity * total) entries pruned overall."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.flatten().float() for s in scores])
    mask = keep_mask(flat, round(sparsity * flat.numel()))
    return [m.view_as(s) for m, s in zip(torch.split(mask, sizes), scores)]


def layer_masks(scores: Sequence[torch.Tensor], sparsity: float | Sequence[float]) -> list[torch.Tensor]:
    """Each tensor pruned to its own ratio: round(ratio * numel) entries each."""
    ratios = [sparsity] * len(scores) if isinstance(sparsity, float | int) else list(sparsity)
    return [keep_mask(s, round(r * s.numel())) for s, r in zip(scores, ratios)]
