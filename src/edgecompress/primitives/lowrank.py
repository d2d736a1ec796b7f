"""Low-rank factors of weight tensors, rank choice and the cost formulas. Pure tensor math.

Conventions. A Linear weight ``w`` is ``[out, in]``; truncated SVD gives ``up @ down`` with
``down [r, in]`` and ``up [out, r]`` (the singular values split as square roots between them). A
convolution weight is ``[O, I, *k]`` (one or two spatial dims). Tucker-2 factors its two channel
modes: ``w ~ core x0 u_out x1 u_in`` with ``u_out [O, r_out]``, ``core [r_out, r_in, *k]``,
``u_in [I, r_in]``. CP writes it as a sum of ``r`` rank-one terms: ``w[o, i, *k] = sum_r a[o, r]
b[i, r] c_1[k_1, r] ... c_d[k_d, r]``. Decompositions run in float64 and return float32.

"Energy" everywhere is the fraction of the squared Frobenius norm a factorization keeps; for a
truncated SVD it is ``sum(s[:r]**2) / sum(s**2)`` (Eckart-Young), for Tucker-2 it is taken per
channel mode from the singular values of that mode's unfolding, for CP it is the fit
``1 - |w - w_cp|^2 / |w|^2`` of the computed decomposition.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

ENERGY_TOL = 1e-9


# ---- SVD (Linear) ----------------------------------------------------------------------------

def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a matrix, descending (float64)."""
    return torch.linalg.svdvals(w.detach().double())


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose leading singular values keep at least ``energy`` of ``sum(s**2)``."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(e, 0) / total
    return min(int((kept < energy - ENERGY_TOL).sum()) + 1, len(s))


def kept_energy(s: torch.Tensor, rank: int) -> float:
    """Fraction of ``sum(s**2)`` in the leading ``rank`` values."""
    e = s.double().pow(2)
    total = float(e.sum())
    return 1.0 if total == 0.0 else float(e[:rank].sum()) / total


def ratio_rank(full: int, ratio: float) -> int:
    """``ceil(ratio * full)``, at least 1 and at most ``full``."""
    return max(1, min(full, math.ceil(ratio * full - ENERGY_TOL)))


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [rank, in], up [out, rank])`` with ``up @ down`` the best rank-``rank`` approximation."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None, :]).float()


def truncate(w: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix (the retraction onto the rank-r manifold)."""
    down, up = svd_factors(w, rank)
    return (up.double() @ down.double()).to(w.dtype)


# ---- Tucker-2 (convolution, both channel modes) ------------------------------------------------

def unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``[w.shape[mode], prod(other dims)]``."""
    return torch.movedim(w, mode, 0).reshape(w.shape[mode], -1)


def mode_singular_values(w: torch.Tensor, mode: int) -> torch.Tensor:
    return singular_values(unfold(w, mode))


def _leading(w: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(unfold(w.double(), mode), full_matrices=False)
    return u[:, :rank]


def tucker2_from_hosvd(w: torch.Tensor, ranks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD of the two channel modes: ``(u_out, core, u_in)`` (plain torch.linalg)."""
    wd = w.detach().double()
    u_out, u_in = _leading(wd, 0, ranks[0]), _leading(wd, 1, ranks[1])
    core = torch.einsum("oi...,or,is->rs...", wd, u_out, u_in)
    return u_out.float(), core.float(), u_in.float()


def tucker2_factors(w: torch.Tensor, ranks: tuple[int, int], iterations: int = 50,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of the channel modes by HOOI (tensorly ``partial_tucker``, started from the HOSVD)."""
    from tensorly.decomposition import partial_tucker

    (core, (u_out, u_in)), _ = partial_tucker(w.detach().double().numpy(), rank=list(ranks), modes=[0, 1],
                                              n_iter_max=iterations, init="svd", random_state=seed)
    return (torch.from_numpy(np.ascontiguousarray(u_out)).float(), torch.from_numpy(np.ascontiguousarray(core)).float(),
            torch.from_numpy(np.ascontiguousarray(u_in)).float())


def tucker2_weight(u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The full weight ``core x0 u_out x1 u_in``."""
    return torch.einsum("rs...,or,is->oi...", core.double(), u_out.double(), u_in.double()).float()


def tucker2_truncate(w: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """Project ``w`` onto multilinear rank ``ranks`` in its channel modes (truncated HOSVD), the
    retraction used by fixed-rank Tucker optimization."""
    return tucker2_weight(*tucker2_from_hosvd(w, ranks)).to(w.dtype)


# ---- CP (convolution) ----------------------------------------------------------------------

def cp_factors(w: torch.Tensor, rank: int, iterations: int = 200, seed: int = 0) -> list[torch.Tensor]:
    """CP by alternating least squares (tensorly ``parafac``, SVD start, seeded): factors
    ``[a [O, r], b [I, r], c_1 [k_1, r], ...]`` with the component weights folded into ``a``."""
    from tensorly.decomposition import parafac

    with warnings.catch_warnings():  # a rank above a mode's size starts those columns at random (seeded)
        warnings.simplefilter("ignore", UserWarning)
        weights, factors = parafac(w.detach().double().numpy(), rank=rank, n_iter_max=iterations, init="svd",
                                   tol=1e-10, random_state=seed)
    out = [torch.from_numpy(np.ascontiguousarray(f)).double() for f in factors]
    out[0] = out[0] * torch.from_numpy(np.asarray(weights)).double()[None, :]
    return [f.float() for f in out]


def cp_weight(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of CP factors."""
    letters = "abcdefgh"[:len(factors)]
    expr = ",".join(f"{c}z" for c in letters) + "->" + letters
    return torch.einsum(expr, *[f.double() for f in factors]).float()


def fit(w: torch.Tensor, approx: torch.Tensor) -> float:
    """``1 - |w - approx|^2 / |w|^2``: the fraction of the squared norm an approximation keeps."""
    total = float(w.double().pow(2).sum())
    return 1.0 if total == 0.0 else 1.0 - float((w.double() - approx.double()).pow(2).sum()) / total


def cp_rank_for_energy(w: torch.Tensor, energy: float, max_rank: int, iterations: int = 200,
                       seed: int = 0) -> tuple[int, list[torch.Tensor], float]:
    """The smallest CP rank in ``[1, max_rank]`` whose fit reaches ``energy`` (bisection; the fit
    grows with the rank), with its factors and fit. Returns ``max_rank`` when none reaches it."""
    cache: dict[int, tuple[list[torch.Tensor], float]] = {}

    def at(r: int) -> tuple[list[torch.Tensor], float]:
        if r not in cache:
            f = cp_factors(w, r, iterations, seed)
            cache[r] = (f, fit(w, cp_weight(f)))
        return cache[r]

    lo, hi = 1, max(1, max_rank)
    if at(hi)[1] < energy - ENERGY_TOL:
        return hi, *at(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] >= energy - ENERGY_TOL:
            hi = mid
        else:
            lo = mid + 1
    return lo, *at(lo)


# ---- costs: weights only (the bias stays on the last factor and is counted by the caller) -----

def svd_params(out: int, inp: int, rank: int) -> int:
    return rank * (inp + out)


def tucker2_params(o: int, i: int, kernel: Sequence[int], ranks: tuple[int, int]) -> int:
    return i * ranks[1] + ranks[0] * ranks[1] * math.prod(kernel) + ranks[0] * o


def cp_params(o: int, i: int, kernel: Sequence[int], rank: int) -> int:
    return rank * (i + sum(kernel) + o)


def conv_macs(o: int, i: int, kernel: Sequence[int], out_spatial: Sequence[int], groups: int = 1) -> int:
    return math.prod(out_spatial) * o * (i // groups) * math.prod(kernel)


def svd_macs(out: int, inp: int, rank: int, positions: int = 1) -> int:
    """A Linear applied at ``positions`` places (1 for a flat input)."""
    return positions * rank * (inp + out)


def tucker2_macs(o: int, i: int, kernel: Sequence[int], ranks: tuple[int, int], in_spatial: Sequence[int],
                 out_spatial: Sequence[int]) -> int:
    """1x1 at the input resolution, the core (with the original stride) and 1x1 at the output's."""
    p_in, p_out = math.prod(in_spatial), math.prod(out_spatial)
    return p_in * i * ranks[1] + p_out * ranks[0] * ranks[1] * math.prod(kernel) + p_out * ranks[0] * o


def cp_macs(o: int, i: int, kernel: Sequence[int], rank: int, in_spatial: Sequence[int],
            out_spatial: Sequence[int]) -> int:
    """1x1, then one depthwise conv per spatial dim (each reaching the output size along its dim),
    then 1x1."""
    total = math.prod(in_spatial) * i * rank
    for d, k in enumerate(kernel):
        positions = math.prod(out_spatial[:d + 1]) * math.prod(in_spatial[d + 1:])
        total += positions * rank * k
    return total + math.prod(out_spatial) * rank * o


# ---- rank under a budget ---------------------------------------------------------------------

def max_threshold(cost_at: Callable[[float], int], budget: float, iterations: int = 50) -> float:
    """The largest energy threshold ``e`` in [0, 1] with ``cost_at(e) <= budget``, for a cost that
    does not decrease with ``e`` (bisection). Returns 0.0 when even the smallest ranks exceed it."""
    if cost_at(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if cost_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
