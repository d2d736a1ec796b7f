"""k-means for weight sharing: exact against brute force and scikit-learn."""
from __future__ import annotations

import torch

from edgecompress.primitives import kmeans


def test_assign_is_the_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1000, generator=g)
    c = torch.sort(torch.randn(7, generator=g)).values
    brute = (v[:, None] - c[None, :]).abs().argmin(dim=1)
    assert torch.equal(kmeans.assign(v, c), brute)


def test_inits():
    v = torch.arange(101, dtype=torch.float32)
    assert torch.equal(kmeans.init_centroids(v, 5, "linear"), torch.tensor([0.0, 25.0, 50.0, 75.0, 100.0]))
    assert torch.equal(kmeans.init_centroids(v, 2, "density"), torch.tensor([25.0, 75.0]))
    r = kmeans.init_centroids(v, 4, "random", torch.Generator().manual_seed(1))
    assert r.numel() == 4 and bool((r[1:] > r[:-1]).all()) and set(r.tolist()) <= set(v.tolist())


def test_torch_and_sklearn_agree_and_lloyd_is_a_fixed_point():
    g = torch.Generator().manual_seed(2)
    v = torch.cat([torch.randn(100, generator=g) * 0.1 - 1, torch.randn(100, generator=g) * 0.1 + 1])
    ct, lt = kmeans.kmeans(v, 4, init="linear", backend="torch")
    cs, ls = kmeans.kmeans(v, 4, init="linear", backend="sklearn")
    assert torch.allclose(ct, cs, atol=1e-5) and torch.equal(lt, ls)
    again, labels = kmeans.lloyd(v, ct, iters=1)  # idempotent: a converged solution does not move
    assert torch.equal(again, ct) and torch.equal(labels, lt)
    for k in range(4):  # every centroid is the mean of its cluster
        assert abs(float(v[lt == k].double().mean()) - float(ct[k])) < 1e-6


def test_fewer_distinct_values_than_clusters_is_exact():
    v = torch.tensor([0.5, -0.25, 0.5, 3.0])
    c, labels = kmeans.kmeans(v, 16)
    assert torch.equal(c[labels], v)


def test_fp16_grid():
    c = kmeans.to_fp16_grid(torch.tensor([0.1, -0.3333]))
    assert torch.equal(c.half().float(), c)
