"""kd_loss and the hint loss against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from edgecompress.primitives.kd import feature_loss, kd_loss, match_spatial, teacher_probs

LN3 = math.log(3.0)


def test_kd_loss_by_hand():
    # teacher [2 ln 3, 0] at T=2 -> softmax([ln 3, 0]) = [3/4, 1/4]; student [0, 0] -> [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...; times T^2 = 4
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * LN3, 0.0]]), temperature=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.5232481, abs=1e-6)


def test_kd_loss_is_a_batch_mean_and_zero_when_equal():
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[2 * LN3, 0.0], [1.0, 2.0]])
    one = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(one / 2, abs=1e-6)
    assert kd_loss(t, t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_gradient_is_t_times_the_probability_gap():
    s = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -1.0]])
    T = 3.0
    kd_loss(s, t, temperature=T).backward()
    gap = torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)
    assert torch.allclose(s.grad, T * gap, atol=1e-6)


def test_ensembles_by_hand():
    t1, t2 = torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, LN3]])  # [3/4, 1/4] and [1/4, 3/4] at T=1
    uniform = torch.zeros(1, 2)
    assert kd_loss(uniform, [t1, t2], temperature=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # weights 3:1 -> mixture [5/8, 3/8]; KL to uniform = 5/8 ln(5/4) + 3/8 ln(3/4)
    expected = 0.625 * math.log(1.25) + 0.375 * math.log(0.75)
    assert kd_loss(uniform, [t1, t2], temperature=1.0, weights=[3, 1]).item() == pytest.approx(expected, abs=1e-6)
    # averaging logits instead: [ln3/2, ln3/2] is uniform too; with weights 3:1 -> [3 ln3/4, ln3/4]
    assert torch.allclose(teacher_probs([t1, t2], temperature=1.0, ensemble="logits"), torch.full((1, 2), 0.5))
    p = teacher_probs([t1, t2], temperature=1.0, weights=[3, 1], ensemble="logits")
    assert p[0, 0].item() == pytest.approx(1 / (1 + math.exp(-LN3 / 2)), abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature must be > 0; got 0"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0)
    with pytest.raises(ValueError, match=r"weights must be 2 non-negative numbers"):
        kd_loss(torch.zeros(1, 2), [torch.zeros(1, 2)] * 2, temperature=1, weights=[1])


def test_feature_loss_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert feature_loss(s, t).item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    # a 1-D map of length 4 pooled to the teacher's length 2: [1, 3, 5, 7] -> [2, 6]
    s = torch.tensor([[[1.0, 3.0, 5.0, 7.0]]])
    assert torch.equal(match_spatial(s, torch.zeros(1, 1, 2)), torch.tensor([[[2.0, 6.0]]]))
    assert feature_loss(s, torch.tensor([[[2.0, 8.0]]])).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"feature shapes must match after projection; got \(1, 1, 2\) and \(1, 3, 2\)"):
        feature_loss(s, torch.zeros(1, 3, 2))
