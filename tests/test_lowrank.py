"""Low-rank factors (primitives) and the lowrank stage: exact at full rank, costs equal the formulas,
rank rules, skipped layers, the fixed-rank manifold fine-tune and accuracy floors on digits."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import edgecompress as ec
from edgecompress.primitives import lowrank as lr
from edgecompress.techniques.lowrank import cp_module, factorize

FAST = {"latency": False}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(task, stage: dict, seed: int = 0):
    return ec.compress(task, ec.Recipe.from_dict({"stages": [stage], "seed": seed, "measure": FAST}))


# ---- primitives --------------------------------------------------------------------------------

def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14 -> kept 0.643, 0.929, 1.0
    assert [lr.energy_rank(s, e) for e in (0.5, 9 / 14, 0.9, 0.93, 1.0)] == [1, 1, 2, 3, 3]
    assert lr.kept_energy(s, 2) == pytest.approx(13 / 14)
    assert [lr.ratio_rank(300, r) for r in (0.001, 0.1, 0.25, 1.0)] == [1, 30, 75, 300]


def test_svd_factors_are_the_truncated_svd():
    w = torch.randn(30, 20, generator=_gen())
    down, up = lr.svd_factors(w, 5)
    assert down.shape == (5, 20) and up.shape == (30, 5)
    s = lr.singular_values(w)
    err = (w.double() - up.double() @ down.double()).pow(2).sum()
    assert float(err) == pytest.approx(float(s[5:].pow(2).sum()), rel=1e-5)  # Eckart-Young
    t = lr.truncate(w, 5)
    assert torch.linalg.matrix_rank(t, rtol=1e-5) == 5
    assert torch.allclose(lr.truncate(t, 5), t, atol=1e-5)  # a retraction is idempotent on the manifold


def test_tucker2_truncate_is_a_projection_onto_the_multilinear_rank():
    w = torch.randn(12, 8, 3, 3, generator=_gen(1))
    t = lr.tucker2_truncate(w, (4, 3))
    assert torch.linalg.matrix_rank(lr.unfold(t, 0), rtol=1e-5) == 4
    assert torch.linalg.matrix_rank(lr.unfold(t, 1), rtol=1e-5) == 3
    assert torch.allclose(lr.tucker2_truncate(t, (4, 3)), t, atol=1e-5)


def test_cp_recovers_an_exact_low_rank_tensor():
    factors = [torch.randn(n, 4, generator=_gen(i)) for i, n in enumerate((10, 6, 3, 3))]
    w = lr.cp_weight(factors)
    found = lr.cp_factors(w, 4, iterations=500, seed=0)
    assert lr.fit(w, lr.cp_weight(found)) > 0.9999


def test_budget_threshold_is_the_largest_that_fits():
    cost = lambda e: int(100 * e)  # noqa: E731
    assert lr.max_threshold(cost, 50) == pytest.approx(0.51, abs=1e-9)  # int(100 * e) <= 50 below 0.51
    assert lr.max_threshold(cost, 1000) == 1.0


# ---- factored modules reproduce the layer at full rank -----------------------------------------

def test_svd_full_rank_reproduces_the_linear():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    x = torch.randn(7, 20, generator=_gen(2))
    f = factorize(layer, "svd", 12)
    assert (f(x) - layer(x)).abs().max() < 1e-5


CONVS = {"conv2d-stride": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
         "conv2d-rect-dilated": lambda: nn.Conv2d(4, 5, (3, 5), padding=(1, 0), dilation=(2, 1)),
         "conv2d-same": lambda: nn.Conv2d(4, 5, (3, 5), padding="same"),
         "conv1d": lambda: nn.Conv1d(6, 8, 5, stride=2, padding=2)}


@pytest.mark.parametrize("method", ["tucker2", "svd"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_full_rank_factors_reproduce_the_conv(kind, method):
    """tucker2: 1x1, the core, 1x1; svd: the kxk conv to r channels and the 1x1 (the SVD of the
    weight unfolded as [out, in * k * k])."""
    torch.manual_seed(0)
    conv = CONVS[kind]()
    shape = (2, conv.in_channels, 11, 13) if isinstance(conv, nn.Conv2d) else (2, conv.in_channels, 17)
    x = torch.randn(*shape, generator=_gen(3))
    rank = (conv.out_channels, conv.in_channels) if method == "tucker2" else conv.out_channels
    f = factorize(conv, method, rank)
    assert [type(m) for m in f] == [type(conv)] * (3 if method == "tucker2" else 2)
    assert f.up.kernel_size == (1,) * (conv.weight.dim() - 2)
    assert (f(x) - conv(x)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
def test_cp_module_computes_the_cp_weight(kind):
    """The 1x1 / depthwise kx1 / depthwise 1xk / 1x1 chain equals a conv with the CP tensor as weight."""
    kernel = (3, 5) if kind == "conv2d" else (5,)
    factors = [torch.randn(n, 6, generator=_gen(i)) for i, n in enumerate((8, 4, *kernel))]
    cls = nn.Conv2d if kind == "conv2d" else nn.Conv1d
    conv = cls(4, 8, kernel, stride=2, padding=tuple(k // 2 for k in kernel))
    with torch.no_grad():
        conv.weight.copy_(lr.cp_weight(factors))
    x = torch.randn(2, 4, *((9, 12) if kind == "conv2d" else (15,)), generator=_gen(5))
    assert (cp_module(conv, factors)(x) - conv(x)).abs().max() < 1e-4


# ---- the stage: counts equal the formulas (MACs measured on the exported ONNX graph) ------------

def test_svd_counts_equal_the_formula(task):
    r = _run(task("digits-lenet300"), {"stage": "lowrank", "method": "svd", "rank": 20, "layers": ["fc1"]})
    m = r.report.final
    # fc1 784x300 (235,200 weights) becomes 20 * (784 + 300) = 21,680
    assert m.params == 266_610 - 235_200 + 21_680 == 53_090
    assert m.macs == 266_200 - 235_200 + 21_680 == 52_680
    assert r.model.fc1.down.weight.shape == (20, 784) and r.model.fc1.up.weight.shape == (300, 20)


def test_svd_of_a_conv_counts_equal_the_formula(task):
    r = _run(task("digits-lenet5"), {"stage": "lowrank", "method": "svd", "rank": 8, "layers": ["conv2"]})
    m = r.report.final
    # conv2 50x20x5x5 on 12x12 -> 8x8: 5x5 conv 20->8 (no bias), 1x1 8->50 (+50 bias), both at 8x8
    assert m.params == 431_080 - 25_050 + (8 * 20 * 25 + 8 * 50 + 50) == 410_480
    assert m.macs == 2_293_000 - 1_600_000 + 64 * 8 * (20 * 25 + 50) == 974_600
    assert r.model.conv2.down.weight.shape == (8, 20, 5, 5) and r.model.conv2.up.weight.shape == (50, 8, 1, 1)


def test_tucker2_counts_equal_the_formula(task):
    r = _run(task("digits-lenet5"), {"stage": "lowrank", "method": "tucker2", "rank": [8, 4], "layers": ["conv2"]})
    m = r.report.final
    # conv2 50x20x5x5 on 12x12 -> 8x8: 1x1 20->4, core 4->8 5x5, 1x1 8->50 (+50 bias)
    assert m.params == 431_080 - 25_050 + (20 * 4 + 8 * 4 * 25 + 8 * 50 + 50) == 407_360
    assert m.macs == 2_293_000 - 1_600_000 + (144 * 20 * 4 + 64 * 8 * 4 * 25 + 64 * 8 * 50) == 781_320
    assert m.macs == 2_293_000 - 1_600_000 + lr.tucker2_macs(50, 20, (5, 5), (8, 4), (12, 12), (8, 8))


def test_cp_counts_equal_the_formula(task):
    r = _run(task("digits-lenet5"), {"stage": "lowrank", "method": "cp", "rank": 10, "layers": ["conv2"]})
    m = r.report.final
    # 1x1 20->10 at 12x12, depthwise 5x1 to 8x12, depthwise 1x5 to 8x8, 1x1 10->50 at 8x8
    assert m.params == 431_080 - 25_050 + (10 * (20 + 5 + 5 + 50) + 50) == 406_880
    assert m.macs == 2_293_000 - 1_600_000 + (144 * 20 * 10 + 96 * 10 * 5 + 64 * 10 * 5 + 64 * 10 * 50) == 761_800
    assert [type(c).__name__ for c in r.model.conv2] == ["Conv2d"] * 4
    assert r.model.conv2.spatial0.groups == 10 and r.model.conv2.spatial0.kernel_size == (5, 1)


def test_a_layer_that_would_not_shrink_is_kept_and_reported(task):
    r = _run(task("digits-lenet300"), {"stage": "lowrank", "method": "svd", "rank": 10, "keep_output": False})
    row = r.report.rows[-1]
    assert row.skipped == {"fc3": "svd rank 10 would hold 1,100 weights, not fewer than the layer's 1,000: kept whole"}
    assert isinstance(r.model.fc3, nn.Linear) and set(row.touched) == {"fc1", "fc2"}
    r = _run(task("digits-lenet5"), {"stage": "lowrank", "method": "tucker2", "rank": 4})
    row = r.report.rows[-1]
    # fc1 800x500: a matrix's Tucker-2 is its SVD, rank 4 holds 4 * (800 + 500) weights
    assert row.touched["fc1"].startswith("svd rank 4 ") and "weights 400,000 -> 5,200" in row.touched["fc1"]
    assert "Linear layers get the truncated SVD: a matrix's tucker2 is its SVD" in row.notes
    assert row.touched["conv2"].startswith("tucker2 rank 4x4 ")


# ---- rank rules and accuracy --------------------------------------------------------------------

def test_param_budget_is_met_and_accuracy_holds(task):
    t = task("digits-lenet300")
    r = _run(t, {"stage": "lowrank", "method": "svd", "param_budget": 0.3, "finetune": {"epochs": 3}})
    base, final = r.report.baseline, r.report.final
    # fc3 is skipped when its rank would not save (it keeps its 1,010); the rest fit the budget
    assert final.params - 410 <= 0.3 * (base.params - 410)
    assert final.metric >= base.metric - 0.01


def test_mac_budget_tucker2_on_lenet5(task):
    r = _run(task("digits-lenet5"), {"stage": "lowrank", "method": "tucker2", "mac_budget": 0.4,
                                     "finetune": {"epochs": 2}})
    base, final = r.report.baseline, r.report.final
    conv = 1_888_000  # conv1 288,000 + conv2 1,600,000 MACs
    assert final.macs - (base.macs - conv) <= 0.4 * conv
    assert final.metric >= 0.96


def test_energy_rank_keeps_the_energy(task):
    r = _run(task("digits-lenet300"), {"stage": "lowrank", "method": "svd", "energy": 0.8, "layers": ["fc1"]})
    s = lr.singular_values(task("digits-lenet300").model.fc1.weight)
    rank = r.model.fc1.down.weight.shape[0]
    assert lr.kept_energy(s, rank) >= 0.8 > lr.kept_energy(s, rank - 1)


def test_manifold_finetune_retracts_and_differs_from_factor_finetune(task):
    t = task("digits-lenet300")
    common = {"stage": "lowrank", "method": "svd", "rank": 16, "layers": ["fc1", "fc2"], "finetune": {"epochs": 2}}
    manifold = _run(t, {**common, "finetune_on": "manifold"})
    plain = _run(t, common)
    for r in (manifold, plain):
        assert r.model.fc1.down.weight.shape == (16, 784)
        assert r.report.final.params == plain.report.final.params
        assert r.report.final.metric >= 0.95
    assert not torch.equal(manifold.model.fc1.down.weight, plain.model.fc1.down.weight)
    assert any("fixed-rank manifold" in n for n in manifold.report.rows[-1].notes)


@pytest.mark.parametrize("stage,message", [
    ({"stage": "lowrank", "energy": 0.9, "ratio": 0.5},
     "recipe: stages[0] must set at most one of energy, ratio, rank, param_budget, mac_budget; "
     "got {'stage': 'lowrank', 'energy': 0.9, 'ratio': 0.5}"),
    ({"stage": "lowrank", "method": "svd", "rank": [4, 2]},
     "recipe: stages[0].rank must be an integer >= 1 (tucker2 also takes [r_out, r_in]); got [4, 2]"),
    ({"stage": "lowrank", "method": "cp", "finetune_on": "manifold", "finetune": {"epochs": 1}},
     "recipe: stages[0].finetune_on must be factors unless method is svd or tucker2 and a finetune section "
     "is given; got 'manifold'"),
    ({"stage": "lowrank", "method": "qr"}, "recipe: stages[0].method must be one of svd, tucker2, cp; got 'qr'"),
    ({"stage": "lowrank", "param_budget": 1.0}, "recipe: stages[0].param_budget must be < 1.0; got 1.0"),
])
def test_bad_specs_give_one_line(stage, message):
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [stage]})
    assert str(e.value) == message


def test_layer_pattern_matching_nothing(task):
    with pytest.raises(ec.RecipeError) as e:
        _run(task("digits-lenet300"), {"stage": "lowrank", "layers": ["conv9"]})
    assert str(e.value) == "stages[0].layers[0] matches no layer; got 'conv9' (layers: fc1, fc2, fc3)"


def test_formulas_by_hand():
    assert lr.svd_params(300, 784, 20) == 21_680
    assert lr.tucker2_params(50, 20, (5, 5), (8, 4)) == 80 + 800 + 400
    assert lr.cp_params(50, 20, (5, 5), 10) == 800
    assert lr.conv_macs(50, 20, (5, 5), (8, 8)) == 1_600_000
    assert lr.cp_macs(50, 20, (5, 5), 10, (12, 12), (8, 8)) == 28_800 + 4_800 + 3_200 + 32_000
    assert math.isclose(lr.fit(torch.ones(4), torch.zeros(4)), 0.0)
