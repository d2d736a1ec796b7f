"""One-dimensional k-means for weight sharing (Deep Compression, Han et al. 2016).

Pure functions on 1-D float tensors. Zeros are not clustered by these functions: callers pass the
nonzero weights only, so pruned weights stay exactly zero.
"""
from __future__ import annotations

from typing import Literal

import torch

Init = Literal["linear", "density", "random"]
Backend = Literal["torch", "sklearn"]


def init_centroids(values: torch.Tensor, k: int, method: Init, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` starting centroids (sorted): evenly spaced between min and max (``linear``), at evenly
    spaced quantiles of the values (``density``), or ``k`` distinct values drawn at random (``random``)."""
    v = values.detach().flatten().double()
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    if method == "linear":
        c = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64)
    elif method == "density":
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        c = torch.quantile(v, q)
    elif method == "random":
        c = v[torch.randperm(v.numel(), generator=generator)[:k]]
    else:
        raise ValueError(f"init must be one of linear, density, random; got {method!r}")
    return torch.sort(c).values.float()


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (``centroids`` sorted ascending; ties go to the lower one)."""
    if centroids.numel() == 1:
        return torch.zeros(values.shape, dtype=torch.long)
    mids = (centroids[1:].double() + centroids[:-1].double()) / 2
    return torch.bucketize(values.double(), mids, right=False)


def lloyd(values: torch.Tensor, centroids: torch.Tensor, iters: int = 100, tol: float = 0.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations in float64 from ``centroids``; an empty cluster keeps its centroid.
    Returns (sorted float32 centroids, labels)."""
    v = values.detach().flatten().double()
    c = torch.sort(centroids.double()).values
    labels = assign(v, c)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, labels, v)
        counts = torch.zeros_like(c).index_add_(0, labels, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = torch.sort(new).values
        moved = float((new - c).abs().max()) if c.numel() else 0.0
        c = new
        labels = assign(v, c)
        if moved <= tol:
            break
    return c.float(), assign(v, c.float().double())


def kmeans(values: torch.Tensor, k: int, *, init: Init = "linear", backend: Backend = "torch",
           iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``values`` (1-D) into at most ``k`` shared values. Returns (centroids, labels) with
    centroids sorted, float32, and ``centroids[labels]`` the shared weights. With fewer distinct
    values than ``k`` every value is its own centroid (exact)."""
    v = values.detach().flatten().float()
    uniq = torch.unique(v)
    if uniq.numel() <= k:
        return uniq, torch.bucketize(v, uniq)
    start = init_centroids(v, k, init, torch.Generator().manual_seed(seed))
    if backend == "torch":
        return lloyd(v, start, iters)
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, init=start.double().numpy().reshape(-1, 1), n_init=1, max_iter=iters,
                    random_state=seed, algorithm="lloyd", tol=0.0)
        km.fit(v.double().numpy().reshape(-1, 1))
        c = torch.sort(torch.from_numpy(km.cluster_centers_.ravel()).float()).values
        return c, assign(v, c)
    raise ValueError(f"backend must be one of torch, sklearn; got {backend!r}")


def to_fp16_grid(centroids: torch.Tensor) -> torch.Tensor:
    """Centroids rounded to values exactly representable in float16 (stored as 2 bytes each)."""
    return centroids.half().float()
