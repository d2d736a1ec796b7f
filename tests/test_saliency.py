import math

import pytest
import torch

from edgecompress.primitives import saliency


def _scores(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_keep_mask_prunes_exactly_the_lowest():
    s = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert torch.equal(saliency.keep_mask(s, 2), torch.tensor([True, False, True, False, True]))
    assert torch.equal(saliency.keep_mask(s, 0), torch.ones(5, dtype=torch.bool))


def test_global_and_layer_masks_are_exact():
    scores = [_scores(30, 7), _scores(11, 3, 2, 2, seed=1), _scores(5, seed=2)]
    total = sum(s.numel() for s in scores)
    for sp in (0.1, 0.5, 0.93):
        masks = saliency.global_masks(scores, sp)
        assert sum(int((~m).sum()) for m in masks) == round(sp * total)
        ref = torch.cat([s.flatten() for s in scores]).sort().values[round(sp * total) - 1]
        assert all(bool((s[~m] <= ref).all()) for s, m in zip(scores, masks))
        for s, m in zip(scores, saliency.layer_masks(scores, sp)):
            assert int((~m).sum()) == round(sp * s.numel())


def test_balanced_rows_keep_the_same_count():
    s = _scores(12, 5, 3, 3)
    m = saliency.balanced_mask(s, 0.6)
    kept = m.reshape(12, -1).sum(1)
    assert kept.unique().tolist() == [45 - round(0.6 * 45)]
    # in every row, every kept score beats every pruned one
    rows, mr = s.reshape(12, -1), m.reshape(12, -1)
    assert all(rows[i][mr[i]].min() >= rows[i][~mr[i]].max() for i in range(12))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3), (3, 16, 5)])
def test_nm_mask_holds_in_every_group(n, m, shape):
    s = _scores(*shape)
    mask = saliency.nm_mask(s, n, m)
    assert saliency.nm_holds(mask, n, m)
    assert int(mask.sum()) == s.numel() * n // m
    # independent reference: top-n per group of m along the input, input innermost
    laid = s.movedim(1, -1) if s.dim() > 2 else s
    groups = laid.reshape(-1, m)
    ref = torch.zeros_like(groups, dtype=torch.bool)
    ref.scatter_(1, groups.topk(n, dim=1).indices, True)
    ref = ref.reshape(laid.shape)
    ref = ref.movedim(-1, 1) if s.dim() > 2 else ref
    assert torch.equal(mask, ref)


def test_nm_mask_refuses_partial_groups():
    with pytest.raises(ValueError, match="input size 6 is not a multiple of 4"):
        saliency.nm_mask(_scores(3, 6), 2, 4)


def test_taylor_is_mean_abs_grad_times_weight():
    w = torch.tensor([1.0, -2.0, 0.0])
    g = [torch.tensor([1.0, 1.0, 5.0]), torch.tensor([-3.0, 0.0, 1.0])]
    assert torch.equal(saliency.taylor(w, g), torch.tensor([2.0, 1.0, 0.0]))


def test_activation_statistics():
    x = torch.tensor([[[0.0, 2.0], [1.0, 1.0]], [[0.0, 0.0], [3.0, 1.0]]])  # (N=2, C=2, L=2)
    s, z, c = saliency.activation_stats(x, 1)
    assert c == 4
    assert torch.equal(saliency.mean_activation(s, c), torch.tensor([0.5, 1.5]))
    assert torch.equal(saliency.apoz(z, c), torch.tensor([0.75, 0.0]))
    assert saliency.channel_dim(torch.zeros(3, 7)) == 1 and saliency.channel_dim(torch.zeros(3, 7, 2)) == 1


def test_schedules():
    sp = saliency.iterative_sparsities(0.9, 3)
    assert math.isclose(sp[-1], 0.9) and sp == sorted(sp)
    assert math.isclose(1 - sp[0], 0.1 ** (1 / 3))
    vals = [saliency.polynomial_sparsity(t, 100, 0.8, end=0.5) for t in range(101)]
    assert vals[0] == 0 and vals[50] == 0.8 and vals[100] == 0.8
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert math.isclose(vals[25], 0.8 + (0 - 0.8) * 0.5 ** 3)


def test_allocate_prefers_the_insensitive_layer_and_hits_the_target():
    ratios = [0.5, 1 - 1e-9]
    drops = {"robust": [0.0, 0.01], "fragile": [0.2, 0.5]}
    savings = {"robust": [50.0, 100.0], "fragile": [50.0, 100.0]}
    out = saliency.allocate(drops, savings, ratios, target=60.0)
    assert out["fragile"] == 0.0
    assert math.isclose(out["robust"], 0.6, abs_tol=1e-9)
    out = saliency.allocate(drops, savings, ratios, target=120.0)
    assert out["robust"] > 0.99 and math.isclose(out["fragile"], 0.2, abs_tol=1e-6)
