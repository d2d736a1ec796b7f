"""Saliency scores, the masks that keep the most salient entries, and sparsity schedules.

Pure tensor math: no module edits, no global state. Every mask function prunes an exact, stated
number of entries (ties broken by position), so achieved sparsity can be asserted exactly.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

# ---- scores ----------------------------------------------------------------------------------


def magnitude(w: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """Element-wise magnitude |w|^p (the ranking is the same for p = 1 and 2; p matters for groups)."""
    return w.abs() if norm == 1 else w.pow(2)


def taylor(w: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-order Taylor estimate of the loss change from zeroing each entry, |g * w|, averaged
    over calibration batches (Molchanov et al., 2019)."""
    if not grads:
        raise ValueError("taylor needs at least one gradient")
    acc = torch.zeros_like(w, dtype=torch.float32)
    for g in grads:
        acc += (g * w).abs()
    return acc / len(grads)


def random_scores(shape: Sequence[int] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores from ``generator`` (the random baseline)."""
    return torch.rand(tuple(shape), generator=generator)


def channel_dim(x: torch.Tensor) -> int:
    """The feature dimension of a layer input: the last for Linear-style (N, ..., F) inputs of rank
    2, else 1 (N, C, ...)."""
    return x.dim() - 1 if x.dim() == 2 else 1


def activation_stats(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel along ``dim``: sum of |x|, number of zeros, and entries per channel."""
    moved = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]).float()
    return moved.abs().sum(0), (moved == 0).sum(0).float(), moved.shape[0]


def mean_activation(abs_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Mean |activation| of each channel: larger means more important."""
    return abs_sum / max(count, 1)


def apoz(zeros: torch.Tensor, count: int) -> torch.Tensor:
    """Average Percentage of Zeros of each channel (Hu et al., 2016): larger means less important."""
    return zeros / max(count, 1)


# ---- masks -----------------------------------------------------------------------------------


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


def balanced_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Every output row (dim 0: a neuron or a filter) keeps the same number of entries:
    round(sparsity * row size) of the lowest scores are pruned in each row."""
    rows = scores.reshape(scores.shape[0], -1)
    n = round(sparsity * rows.shape[1])
    mask = torch.ones_like(rows, dtype=torch.bool)
    if n > 0:
        order = torch.argsort(rows, dim=1, stable=True)
        mask.scatter_(1, order[:, :n], False)
    return mask.view_as(scores)


def _to_nm_layout(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1) if t.dim() > 2 else t


def _from_nm_layout(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(-1, 1) if t.dim() > 2 else t


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive weights along the input dimension, keep the ``n`` with
    the highest scores. The input size (``scores.shape[1]``) must be a multiple of ``m``."""
    if scores.shape[1] % m:
        raise ValueError(f"input size {scores.shape[1]} is not a multiple of {m}")
    laid = _to_nm_layout(scores).contiguous()
    groups = laid.reshape(-1, m)
    order = torch.argsort(groups, dim=1, stable=True)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(1, order[:, : m - n], False)
    return _from_nm_layout(mask.reshape(laid.shape))


def nm_holds(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the input has at most ``n`` kept."""
    groups = _to_nm_layout(mask).contiguous().reshape(-1, m)
    return bool((groups.sum(1) <= n).all())


# ---- schedules -------------------------------------------------------------------------------


def iterative_sparsities(final: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` prune steps, removing the same fraction of what remains
    each time: 1 - (1 - final)^(i / steps)."""
    return [1 - (1 - final) ** (i / steps) for i in range(1, steps + 1)]


def polynomial_sparsity(step: int, total: int, final: float, initial: float = 0.0, begin: float = 0.0,
                        end: float = 0.75) -> float:
    """Gradual pruning (Zhu & Gupta, 2017): s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t1 - t0))^3,
    with t0 = ``begin`` and t1 = ``end`` as fractions of the ``total`` optimizer steps."""
    t0, t1 = begin * total, max(end * total, begin * total + 1)
    if step <= t0:
        return initial
    if step >= t1:
        return final
    return final + (initial - final) * (1 - (step - t0) / (t1 - t0)) ** 3


# ---- allocation from a sensitivity scan ------------------------------------------------------


def _monotone(xs: Sequence[float]) -> list[float]:
    out, best = [], -math.inf
    for x in xs:
        best = max(best, x)
        out.append(best)
    return out


def allocate(drops: Mapping[str, Sequence[float]], savings: Mapping[str, Sequence[float]], ratios: Sequence[float],
             target: float, resolution: int = 20) -> dict[str, float]:
    """Per-layer ratios that remove at least ``target`` (in the units of ``savings``) with the least
    predicted metric drop, assuming drops and savings of layers add up.

    ``drops[l][j]`` and ``savings[l][j]`` were measured with layer ``l`` pruned alone at
    ``ratios[j]`` (``ratios`` ascending; ratio 0 is implied with drop 0 and saving 0). Curves are
    interpolated linearly onto ``resolution`` steps per unit ratio; the cheapest step per unit saved
    is taken greedily. The last step taken is shortened so the total lands on ``target``.
    """
    grid = [0.0] + list(ratios)
    fine = [k / resolution for k in range(0, int(round(grid[-1] * resolution)) + 1)]

    def interp(ys: Sequence[float]) -> list[float]:
        ys = [0.0] + list(ys)
        out = []
        for x in fine:
            j = max(i for i in range(len(grid)) if grid[i] <= x + 1e-12)
            if j == len(grid) - 1:
                out.append(ys[-1])
            else:
                f = (x - grid[j]) / (grid[j + 1] - grid[j])
                out.append(ys[j] + f * (ys[j + 1] - ys[j]))
        return out

    d = {n: _monotone(interp([max(v, 0.0) for v in drops[n]])) for n in drops}
    s = {n: _monotone(interp(savings[n])) for n in drops}
    pos = {n: 0 for n in drops}
    saved = 0.0
    result = {n: 0.0 for n in drops}
    while saved < target:
        best, best_cost = None, math.inf
        for n in drops:
            i = pos[n]
            if i + 1 >= len(fine):
                continue
            gain = s[n][i + 1] - s[n][i]
            if gain <= 0:
                continue
            cost = (d[n][i + 1] - d[n][i]) / gain
            if cost < best_cost - 1e-15:
                best, best_cost = n, cost
        if best is None:
            break
        i = pos[best]
        gain = s[best][i + 1] - s[best][i]
        if saved + gain >= target:
            frac = (target - saved) / gain
            result[best] = fine[i] + frac * (fine[i + 1] - fine[i])
            saved = target
            break
        pos[best] = i + 1
        result[best] = fine[i + 1]
        saved += gain
    return result
