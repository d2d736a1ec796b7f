"""Bit allocation for mixed precision: a multiple-choice knapsack solved exactly by dynamic programming.

Each layer picks one option (a bit width) with an integer cost (bits or bytes of its weights) and a
score (how much quantizing it at that width hurts the model; lower is better). ``allocate`` returns
the options that minimize the summed score with the summed cost within the budget, and the next
allocations on the score/cost Pareto front, cheaper ones the additive model ranks just behind.
"""
from __future__ import annotations

import math

import torch

__all__ = ["allocate"]

#: the dynamic program's cost axis has at most this many cells; larger budgets use a coarser unit
MAX_CELLS = 1 << 15


def allocate(costs: dict[str, dict[int, int]], scores: dict[str, dict[int, float]], budget: int,
             keep: int = 1) -> list[dict[str, int]]:
    """Up to ``keep`` allocations ``{layer: option}`` with ``sum(cost) <= budget``, best first.

    The first minimizes ``sum(scores[layer][option])``; the others are the next points of the Pareto
    front below the budget (each cheaper and scored worse than the one before). Costs are exact when
    ``budget / gcd(costs)`` fits ``MAX_CELLS`` cells; otherwise costs are rounded up to a coarser unit,
    so every allocation returned still fits the budget. Empty when even the cheapest options do not fit.
    """
    names = list(costs)
    if not names:
        return [{}]
    if budget < 0:
        return []
    g = 0
    for n in names:
        for c in costs[n].values():
            g = math.gcd(g, int(c))
    unit = max(g, 1)
    if budget // unit > MAX_CELLS:
        unit = -(-budget // MAX_CELLS)
    cells = budget // unit
    inf = float("inf")
    dp = torch.full((cells + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choices: list[torch.Tensor] = []
    opts_of: list[list[int]] = []
    for n in names:
        opts = sorted(costs[n])
        cand = torch.full((len(opts), cells + 1), inf, dtype=torch.float64)
        for i, o in enumerate(opts):
            u = -(-int(costs[n][o]) // unit)
            if u <= cells:
                cand[i, u:] = dp[: cells + 1 - u] + float(scores[n][o])
        dp, arg = cand.min(dim=0)
        choices.append(arg)
        opts_of.append(opts)
    # Pareto front over total cost: cells whose best score beats every cheaper cell's
    front: list[int] = []
    best = inf
    for c, v in enumerate(dp.tolist()):
        if v < best:
            best = v
            front.append(c)
    out = []
    for c in reversed(front[-keep:] if keep > 0 else []):
        alloc: dict[str, int] = {}
        for li in range(len(names) - 1, -1, -1):
            o = opts_of[li][int(choices[li][c])]
            alloc[names[li]] = o
            c -= -(-int(costs[names[li]][o]) // unit)
        out.append({n: alloc[n] for n in names})
    return out
