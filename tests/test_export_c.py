"""C export: fixed-point primitives against an independent big-integer reference, the arena planner,
and the generated C bit-exact with the integer reference on the host (every test input) and under
QEMU for Cortex-M4, Cortex-M0 and Cortex-M55 (a few inputs each)."""
from __future__ import annotations

import copy
import functools
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgecompress.errors import RecipeError
from edgecompress.export import c as cexp
from edgecompress.export.ir import SUPPORTED, lower, lower_task, plan_arena, run_int
from edgecompress.primitives import fixedpoint as fp

from .conftest import _task

needs_arm = pytest.mark.skipif(not cexp.have_toolchain(), reason="arm-none-eabi-gcc / qemu-system-arm missing "
                                                                 "(make toolchain installs them)")


@functools.lru_cache(maxsize=None)
def _graph(name: str):
    return lower_task(_task(name).model, _task(name), "c")


# ---- fixed point --------------------------------------------------------------------------------

def _ref_high_mul(a: int, b: int) -> int:
    if a == b == -(2 ** 31):
        return 2 ** 31 - 1
    ab = a * b
    v = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    q = abs(v) >> 31
    return q if v >= 0 else -q


def _ref_div_pot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    rem = x & mask
    return (x >> e) + (1 if rem > (mask >> 1) + (1 if x < 0 else 0) else 0)


def test_fixed_point_matches_big_integer_reference():
    rng = random.Random(0)
    xs = [rng.randint(-(2 ** 24), 2 ** 24) for _ in range(2000)] + [0, 1, -1, 2 ** 31 - 1, -(2 ** 31)]
    for real in [1e-6, 3.7e-4, 0.01234, 0.5, 0.7071, 0.999999, 1.0, 1.5, 3.25]:
        m, shift = fp.quantize_multiplier(real)
        assert 2 ** 30 <= m < 2 ** 31
        assert abs(m * 2.0 ** (shift - 31) - real) <= real * 2 ** -30
        got = fp.multiply_by_quantized_multiplier(np.array(xs, dtype=np.int64), m, shift)
        safe = [x for x in xs if abs(x * 2 ** max(shift, 0)) < 2 ** 31]
        want = [_ref_div_pot(_ref_high_mul(x * 2 ** max(shift, 0), m), max(-shift, 0)) for x in safe]
        assert got[[xs.index(x) for x in safe]].tolist() == want
        # within one step of the exact product
        exact = np.array(safe, dtype=np.float64) * real
        assert np.abs(np.array(want) - exact).max() <= 1.0
    assert fp.quantize_multiplier(0.0) == (0, 0)


def test_average_rounds_half_away_from_zero():
    assert fp.avg_round(np.array([5, -5, 6, -6, 0, 7, -7]), 4).tolist() == [1, -1, 2, -2, 0, 2, -2]


# ---- a model with every supported layer ---------------------------------------------------------

class Everything(nn.Module):
    """Conv + BN + ReLU, depthwise + ReLU6, pointwise, residual add + ReLU, max pool, standalone ReLU,
    average pool, global average pool, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.mp = nn.MaxPool2d(2)
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        y = self.pw(F.relu6(self.dw(x)))
        x = F.relu(x + y)
        x = torch.relu(self.mp(x))
        x = self.gap(self.pool(x)).flatten(1)
        return self.fc(x)


def _everything():
    torch.manual_seed(0)
    m = Everything()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    m.eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.rand(32, 3, 16, 16, generator=g) for _ in range(2)]
    test = torch.rand(64, 3, 16, 16, generator=g)
    return m, calib, test


class Grouped(nn.Module):
    """ShuffleNet-style grouped convolutions: groups=4 (3x3, then strided), groups=2 pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.g2 = nn.Conv2d(16, 16, 3, stride=2, groups=4)
        self.pw = nn.Conv2d(16, 8, 1, groups=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.g1(x))
        x = F.relu(self.g2(x))
        return self.fc(self.gap(self.pw(x)).flatten(1))


def _grouped():
    torch.manual_seed(0)
    m = Grouped().eval()
    g = torch.Generator().manual_seed(1)
    return m, [torch.rand(32, 3, 16, 16, generator=g)], torch.rand(64, 3, 16, 16, generator=g)


class PaddedPools(nn.Module):
    """ResNet's stem pool (3x3, stride 2, padding 1) on signed values, a padded 2x2 pool to an odd
    size and a 3x3 stride-1 one (TFLite's SAME): padding never wins the max."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pools = nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 2, padding=1), nn.MaxPool2d(3, 1, 1))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv(self.pools(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _padded_pools():
    torch.manual_seed(0)
    m = PaddedPools().eval()
    g = torch.Generator().manual_seed(1)
    return m, [torch.rand(32, 3, 16, 16, generator=g) - 0.5], torch.rand(64, 3, 16, 16, generator=g) - 0.5


class DenseSE(nn.Module):
    """DenseNet-style: each layer's output concatenated to its input (chained concatenations), batch
    norm before a conv (pre-activation), a squeeze-excitation gate (sigmoid, channel-broadcast multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc1 = nn.Conv2d(24, 8, 1)
        self.fc2 = nn.Conv2d(8, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([x, self.conv1(F.relu(self.bn1(x)))], 1)
        x = torch.cat((x, self.conv2(F.relu(self.bn2(x)))), dim=1)
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Activations(nn.Module):
    """MobileNetV3's layers: Hardswish, a hardsigmoid gate (gate first, as torchvision writes it), SiLU,
    a multiply of two same-shape tensors, a concatenation of the model input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.se = nn.Conv2d(8, 8, 1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(11, 5)

    def forward(self, x):
        y = F.hardswish(self.stem(x))
        y = F.hardsigmoid(self.se(y.mean((2, 3), keepdim=True))) * y
        y = nn.functional.silu(self.pw(y)) * y
        return self.fc(F.adaptive_avg_pool2d(torch.cat([y, x], 1), 1).flatten(1))


def _channel_shuffle(x, groups: int):
    n, c, h, w = x.size()  # as torchvision's ShuffleNetV2 writes it
    x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(n, -1, h, w)


class Shuffle(nn.Module):
    """ShuffleNetV2's block: chunk along the channels, one half through a conv, concatenation, channel
    shuffle; torch.split with uneven parts; x.mean((2, 3)) without keepdim."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = _channel_shuffle(torch.cat((a, F.relu(self.branch(b))), dim=1), 2)
        c, d = torch.split(x, [3, 5], dim=1)
        x = _channel_shuffle(F.relu(self.pw(torch.cat([d, c], 1))), 4)
        return self.fc(x.mean([2, 3]))


def _shuffle():
    torch.manual_seed(0)
    m = Shuffle().eval()
    g = torch.Generator().manual_seed(1)
    return m, [torch.rand(32, 3, 8, 8, generator=g)], torch.rand(64, 3, 8, 8, generator=g)


def _random_bn(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(-1.5, 1.5)  # negative scales too
            bn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def _dense_se():
    torch.manual_seed(0)
    m = _random_bn(DenseSE())
    g = torch.Generator().manual_seed(1)
    return m, [torch.rand(32, 3, 8, 8, generator=g)], torch.rand(64, 3, 8, 8, generator=g)


def _activations():
    torch.manual_seed(0)
    m = Activations().eval()
    g = torch.Generator().manual_seed(1)
    return m, [torch.rand(32, 3, 8, 8, generator=g) - 0.5], torch.rand(64, 3, 8, 8, generator=g) - 0.5


SMALL = {"everything": _everything, "grouped": _grouped, "padded_pools": _padded_pools, "dense_se": _dense_se,
         "activations": _activations, "shuffle": _shuffle}


def test_lowering_covers_every_layer_and_tracks_float():
    m, calib, test = _everything()
    g = lower(m, test[:1], calib=calib)
    assert [(op.kind, op.relu, op.relu6) for op in g.ops] == [
        ("conv", True, False), ("dwconv", True, True), ("conv", False, False), ("add", True, False),
        ("maxpool", False, False), ("relu", False, False), ("avgpool", False, False), ("avgpool", False, False),
        ("reshape", False, False), ("fc", False, False)]
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    scale = g.tensors[g.output].q.scale
    assert np.abs(out - want).max() < 6 * scale  # int8 end to end stays within a few output steps


def test_padded_max_pools_lower_with_their_padding():
    m, calib, test = _padded_pools()
    g = lower(m, test[:1], calib=calib)
    pools = [op for op in g.ops if op.kind == "maxpool"]
    assert [(op.kernel, op.stride, op.pad, g.tensors[op.output].shape) for op in pools] == [
        ((3, 3), (2, 2), (1, 1), (8, 8, 8)), ((2, 2), (2, 2), (1, 1), (5, 5, 8)), ((3, 3), (1, 1), (1, 1), (5, 5, 8))]
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(out - want).max() < 6 * g.tensors[g.output].q.scale  # int8 through three layers


def test_grouped_convolution_lowers_with_its_groups():
    m, calib, test = _grouped()
    g = lower(m, test[:1], calib=calib)
    assert [(op.kind, op.groups, op.qweight.shape if op.qweight is not None else None) for op in g.ops] == [
        ("conv", 1, (8, 3, 3, 3)), ("conv", 4, (16, 3, 3, 2)), ("conv", 4, (16, 3, 3, 4)), ("conv", 2, (8, 1, 1, 8)),
        ("avgpool", 1, None), ("reshape", 1, None), ("fc", 1, (5, 8))]
    assert g.ops[1].macs == 16 * 16 * 16 * 3 * 3 * 2
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(out - want).max() < 3 * g.tensors[g.output].q.scale


def test_concatenation_batch_norm_and_gate_lower_exactly():
    """A concatenation's inputs are on its grid, so it copies codes: the conv that feeds it alone writes
    there, a tensor other layers read too is rescaled onto it; a batch norm without a conv before it is
    a 1x1 depthwise conv of gamma / sqrt(var + eps); the sigmoid writes [0, 1] in steps of 1/256; the
    integer graph tracks the float model."""
    m, calib, test = _dense_se()
    g = lower(m, test[:1], calib=calib)
    assert [(op.kind, op.layer, op.relu) for op in g.ops] == [
        ("conv", "stem", True), ("dwconv", "bn1", True), ("conv", "conv1", False), ("rescale", "cat/in0", False),
        ("concat", "cat", False), ("dwconv", "bn2", True), ("conv", "conv2", False), ("rescale", "cat_1/in0", False),
        ("concat", "cat_1", False), ("avgpool", "adaptive_avg_pool2d", False), ("conv", "fc1", True),
        ("conv", "fc2", False), ("lut", "sigmoid", False), ("mul", "mul", False),
        ("avgpool", "adaptive_avg_pool2d_1", False), ("reshape", "flatten", False), ("fc", "fc", False)]
    for i in (3, 7):  # the stem's output and the first concatenation are read by a batch norm as well
        assert g.ops[i].inputs == [g.ops[i - 3].output]
        assert g.ops[i + 1].inputs == [g.ops[i].output, g.ops[i - 1].output]
        grid = g.tensors[g.ops[i + 1].output].q
        assert g.tensors[g.ops[i].output].q == g.tensors[g.ops[i - 1].output].q == grid
        assert g.tensors[g.ops[i].inputs[0]].q != grid
    bn = g.ops[1]
    want = (m.bn1.weight / torch.sqrt(m.bn1.running_var + m.bn1.eps)).detach().numpy()
    assert bn.layer == "bn1" and bn.kernel == (1, 1) and bn.weight.shape == (1, 1, 1, 8)
    assert np.allclose(bn.weight.reshape(-1), want, rtol=1e-6)
    assert np.array_equal(np.abs(bn.qweight.reshape(-1)), np.full(8, 127))  # one weight a channel: exact codes
    gate = g.ops[12]
    qo = g.tensors[gate.output].q
    assert (gate.fn, qo.scale, qo.zero_point) == ("Sigmoid", 1 / 256, -128)
    qi = g.tensors[gate.inputs[0]].q
    x = (np.arange(-128, 128) - qi.zero_point) * qi.scale
    assert np.abs((gate.table.astype(int) + 128) / 256 - 1 / (1 + np.exp(-x))).max() <= 0.5 / 256 + 1e-9
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(out - want).max() < 3 * g.tensors[g.output].q.scale
    m, calib, test = _activations()
    g = lower(m, test[:1], calib=calib)
    assert [(op.kind, op.fn) for op in g.ops if op.kind in ("lut", "mul", "concat", "rescale")] == [
        ("lut", "Hardswish"), ("lut", "Hardsigmoid"), ("mul", ""), ("lut", "SiLU"), ("mul", ""), ("rescale", ""),
        ("concat", "")]
    assert g.ops[-5].inputs == [g.input]  # the model input, read by the stem too, rescaled for the concatenation
    hs = g.tensors[next(op for op in g.ops if op.fn == "Hardsigmoid").output].q
    assert (hs.scale, hs.zero_point) == (float(np.float32(1 / 255)), -128)  # [0, 1], 1 included
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(out - want).max() < 3 * g.tensors[g.output].q.scale


def test_chunk_split_and_channel_shuffle_pick_channels():
    m, calib, test = _shuffle()
    g = lower(m, test[:1], calib=calib)
    picks = [op.index.tolist() for op in g.ops if op.kind == "gather"]
    assert picks == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 4, 1, 5, 2, 6, 3, 7], [0, 1, 2], [3, 4, 5, 6, 7],
                     [0, 2, 4, 6, 1, 3, 5, 7]]
    assert all(g.tensors[op.output].q == g.tensors[op.inputs[0]].q for op in g.ops if op.kind == "gather")
    out = g.dequantize_output(run_int(g, g.quantize_input(test)))
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(out - want).max() < 2 * g.tensors[g.output].q.scale


@functools.lru_cache(maxsize=None)
def _static_dense_se():
    """The zoo's DenseNet+SE (random weights) after a static int8 quantize stage, its task and its integer
    graph: quantized convs, batch norms before convs left float, the quantize stage's specs for each
    concatenation, gate and product."""
    from edgecompress.context import Context
    from edgecompress.task import Task
    from edgecompress.techniques import quantize as QZ
    from edgecompress.zoo import architectures as A

    (xtr, ytr), (xv, yv), (xt, yt) = A._images(1)
    torch.manual_seed(0)
    t = Task(model=A.DenseSENet().eval(), train_data=(xtr[:64], ytr[:64]), val_data=(xv[:32], yv[:32]),
             eval_data=(xt[:16], yt[:16]), batch_size=32, name="dense_se")
    _random_bn(t.model)
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", keep_slow_float=False),
                  Context(task=t, seed=0)).eval()
    return qm, t, lower_task(qm, t, "c")


def test_quantize_stage_specs_drive_concatenation_and_gate(tmp_path):
    from edgecompress.primitives.qlayer import act_quants

    qm, t, g = _static_dense_se()
    aq = act_quants(qm)
    for op in (op for op in g.ops if op.kind in ("concat", "mul")):
        spec = aq[{"cat": "block1.0.cat_q", "cat_1": "block1.1.cat_q", "cat_2": "block2.0.cat_q",
                   "cat_3": "block2.1.cat_q", "mul": "se1.mul_q", "mul_1": "se2.mul_q"}[op.layer]].spec
        q = g.tensors[op.output].q
        assert (q.scale, q.zero_point) == (float(spec.scale), int(spec.zero_point) - 128)
        if op.kind == "concat":
            assert all(g.tensors[i].q == q for i in op.inputs)
    assert [op.kind for op in g.ops].count("rescale") == 4  # the stem, a pool and two concatenations
    assert [op.layer for op in g.ops if op.kind == "dwconv"] == ["block1.0.bn", "block1.1.bn", "block2.0.bn",
                                                                 "block2.1.bn"]
    x = torch.cat([xb for xb, _ in t.eval_data])
    q = g.quantize_input(x)
    assert np.array_equal(cexp.run_host(cexp.export_c(g, tmp_path / "d", name="d"), q), run_int(g, q))


def test_arena_plan_reuses_memory_and_never_overlaps_live_tensors(task):
    for name, peak, total in (("mnist1d-cnn", 3840, 4530), ("digits-lenet5", 14400, 19694)):
        g = _graph(name)
        plan = plan_arena(g)
        assert (plan.peak, plan.total) == (peak, total)
        bufs = list(plan.offsets)
        for i, a in enumerate(bufs):
            for b in bufs[i + 1:]:
                (s1, e1), (s2, e2) = plan.lifetimes[a], plan.lifetimes[b]
                if s1 <= e2 and s2 <= e1:  # both live at some step: disjoint bytes
                    lo1, lo2 = plan.offsets[a], plan.offsets[b]
                    assert lo1 + plan.sizes[a] <= lo2 or lo2 + plan.sizes[b] <= lo1, (a, b)


# ---- generated C ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(SMALL))
def test_every_kernel_is_bit_exact_on_the_host(tmp_path, model):
    m, calib, test = SMALL[model]()
    g = lower(m, test[:1], calib=calib)
    q = g.quantize_input(test)
    exp = cexp.export_c(g, tmp_path / model, name=model)
    assert np.array_equal(cexp.run_host(exp, q), run_int(g, q))


@needs_arm
@pytest.mark.parametrize("model", ["grouped", "padded_pools", "dense_se", "activations", "shuffle"])
def test_grouped_convolution_and_padded_pools_under_qemu_match_the_reference(tmp_path, model):
    m, calib, test = SMALL[model]()
    g = lower(m, test[:1], calib=calib)
    q = g.quantize_input(test[:3])
    exp = cexp.export_c(g, tmp_path / model, name=model)
    for target in ("cortex-m4", "cortex-m0", "cortex-m55"):
        assert np.array_equal(cexp.run_qemu(exp, cexp.build_arm(exp, q, target), target), run_int(g, q)), target


@pytest.mark.parametrize("name", ["mnist1d-cnn", "digits-lenet5"])
def test_builtin_tasks_bit_exact_on_host_for_every_test_input(task, tmp_path, name):
    t = task(name)
    g = _graph(name)
    x = torch.cat([xb for xb, _ in t.eval_data])
    q = g.quantize_input(x)
    ref = run_int(g, q)
    exp = cexp.export_c(g, tmp_path / name, name="net")
    out = cexp.run_host(exp, q)
    assert out.shape == (len(x), 10)
    assert np.array_equal(out, ref)
    header = (tmp_path / name / "net.h").read_text()
    assert f"#define NET_ARENA_SIZE {plan_arena(g).peak}" in header
    assert "malloc" not in (tmp_path / name / "net.c").read_text()


@needs_arm
@pytest.mark.parametrize("name,targets", [("mnist1d-cnn", ["cortex-m4", "cortex-m0", "cortex-m55"]),
                                          ("digits-lenet5", ["cortex-m4"])])
def test_cortex_m_under_qemu_matches_the_reference(task, tmp_path, name, targets):
    t = task(name)
    g = _graph(name)
    x = torch.cat([xb for xb, _ in t.eval_data])[:4]
    q = g.quantize_input(x)
    ref = run_int(g, q)
    exp = cexp.export_c(g, tmp_path / name, name="net")
    weights = sum(op.qweight.size + 4 * op.qbias.size + 5 * op.qbias.size for op in g.ops if op.qweight is not None)
    for target in targets:
        elf = cexp.build_arm(exp, q, target)
        assert np.array_equal(cexp.run_qemu(exp, elf, target), ref), target
        size = cexp.arm_size(exp, target)
        assert size.bss == plan_arena(g).peak  # the arena is the only RAM the library takes
        assert size.data == 0
        assert weights <= size.text < weights + 8192  # weights, multipliers, shifts, plus the kernels' code


@needs_arm
def test_quantize_stage_spec_drives_the_c_export(task, tmp_path):
    from edgecompress.context import Context
    from edgecompress.techniques import quantize as QZ

    t = task("mnist1d-cnn")
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False, keep_slow_float=False),
                  Context(task=t, seed=0)).eval()
    g = lower_task(qm, t, "c")
    conv1 = qm.conv1
    op = g.ops[0]
    assert np.array_equal(op.wscale, conv1.w_spec.scale.numpy())
    assert np.array_equal(op.qweight[:, 0, :, 0], conv1.qweight.numpy()[:, 0, :])
    assert g.tensors[g.input].q.scale == float(conv1.in_spec.scale)
    assert g.tensors[g.input].q.zero_point == int(conv1.in_spec.zero_point) - 128
    assert g.tensors[op.output].q.scale == float(conv1.out_spec.scale)
    x = torch.cat([xb for xb, _ in t.eval_data])
    q = g.quantize_input(x)
    ref = run_int(g, q)
    exp = cexp.export_c(g, tmp_path / "q", name="q")
    assert np.array_equal(cexp.run_host(exp, q), ref)
    elf = cexp.build_arm(exp, q[:3], "cortex-m4")
    assert np.array_equal(cexp.run_qemu(exp, elf, "cortex-m4"), ref[:3])
    with torch.no_grad():
        sim = qm(x).numpy()
    qo = g.tensors[g.output].q
    sim_q = np.clip(np.round(sim / qo.scale) + qo.zero_point, -128, 127)  # the same int8 output grid
    assert (ref.argmax(1) == sim_q.argmax(1)).mean() >= 0.995


def test_a_conv_left_float_by_the_quantize_stage_has_its_batch_norm_folded(task, tmp_path):
    """ResNet's stem: the quantize stage keeps a thin-input conv float (here: excluded), and its batch
    norm stays beside it in the model; the device exports fold it as they do for a float model."""
    from edgecompress.context import Context
    from edgecompress.techniques import quantize as QZ

    t = task("digits-resnet8")
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", exclude=["stem.conv"]),
                  Context(task=t, seed=0)).eval()
    assert isinstance(qm.stem.conv, nn.Conv2d) and isinstance(qm.stem.bn, nn.BatchNorm2d)
    g = lower_task(qm, t, "c")
    assert g.ops[0].layer == "stem.conv" and g.ops[0].kind == "conv" and g.ops[0].relu
    x = torch.cat([xb for xb, _ in t.eval_data])[:32]
    q = g.quantize_input(x)
    assert np.array_equal(cexp.run_host(cexp.export_c(g, tmp_path / "r", name="r"), q), run_int(g, q))
    with torch.no_grad():
        want = qm(x).argmax(1).numpy()
    assert (run_int(g, q).argmax(1) == want).mean() >= 0.9


def test_residual_add_uses_the_quantize_stage_spec(task, tmp_path):
    """The add quantizer the quantize stage put after each residual block is the C export's add
    output grid; the integer graph agrees with the torch simulation and the host C is bit-exact."""
    from edgecompress.context import Context
    from edgecompress.primitives.qlayer import act_quants
    from edgecompress.techniques import quantize as QZ

    t = task("digits-resnet8")
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False, keep_slow_float=False),
                  Context(task=t, seed=0)).eval()
    g = lower_task(qm, t, "c")
    adds = [op for op in g.ops if op.kind == "add"]
    aq = act_quants(qm)
    assert len(adds) == 3
    for op, name in zip(adds, ["block1.add_q", "block2.add_q", "block3.add_q"]):
        assert g.tensors[op.output].q.scale == float(aq[name].spec.scale)
        assert g.tensors[op.output].q.zero_point == int(aq[name].spec.zero_point) - 128
    x = torch.cat([xb for xb, _ in t.eval_data])
    q = g.quantize_input(x)
    ref = run_int(g, q)
    exp = cexp.export_c(g, tmp_path / "r", name="r")
    assert np.array_equal(cexp.run_host(exp, q), ref)
    with torch.no_grad():
        sim = qm(x).numpy()
    assert (ref.argmax(1) == sim.argmax(1)).mean() >= 0.99


# ---- what the exporters refuse -----------------------------------------------------------------

def test_unsupported_layer_is_one_line_naming_layer_and_operator():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(RecipeError) as e:
        lower(m, torch.rand(1, 1, 8, 8), calib=[torch.rand(4, 1, 8, 8)])
    assert str(e.value) == f"export c: layer '1' (GELU) is not supported; supported: {SUPPORTED}"
    dilated = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, dilation=2))
    with pytest.raises(RecipeError) as e:
        lower(dilated, torch.rand(1, 4, 8, 8), calib=[torch.rand(4, 4, 8, 8)], fmt="tflite")
    assert str(e.value) == (f"export tflite: layer '0' (Conv2d) is not supported (dilation must be 1 and "
                            f"padding_mode zeros); supported: {SUPPORTED}")
    assert "\n" not in str(e.value)


def test_concatenation_multiply_and_batch_norm_refusals_are_one_line():
    class Odd(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.conv = nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm1d(4)
            self.rows = nn.AvgPool2d((4, 1))

        def forward(self, x):
            y = self.conv(x)
            if self.kind == "cat":
                return torch.cat([y, y], dim=2).flatten(1)
            if self.kind == "mul":
                return (y * self.rows(y)).flatten(1)  # a row gate, not a channel gate
            if self.kind == "view":
                return y.view(1, 2, 2, 4, 4).transpose(1, 3).flatten(1)
            if self.kind == "chunk":
                return y.chunk(2, dim=3)[0].flatten(1)
            return self.bn(y.mean((2, 3)))

    lines = []
    for kind in ("cat", "mul", "view", "chunk", "bn"):
        with pytest.raises(RecipeError) as e:
            lower(Odd(kind).eval(), torch.rand(1, 2, 4, 4), calib=[torch.rand(2, 2, 4, 4)])
        lines.append(str(e.value).removesuffix(f"; supported: {SUPPORTED}"))
    assert lines == [
        "export c: layer 'cat' (cat) is not supported (dim=2: only along the channels (dim 1))",
        "export c: layer 'mul' (mul) is not supported (shapes [1, 4, 4, 4] and [1, 4, 1, 4]: only a tensor of the "
        "same shape or a channel gate (N, C, 1, 1))",
        "export c: layer 'transpose' (.transpose()) is not supported (of a 5-D view: only a channel shuffle (view to "
        "(N, groups, C / groups, H, W), transpose(1, 2), view back))",
        "export c: layer 'chunk' (.chunk()) is not supported (dim=3: only along the channels (dim 1) of an "
        "unflattened tensor)",
        "export c: layer 'bn' (BatchNorm1d) is not supported (only on an image or a signal: (N, C, H, W) or "
        "(N, C, L))"]


def test_a_layer_without_kernel_is_named_not_the_flatten_next_to_it():
    """digits-lstm flattens (N, 1, 28, 28) to rows with Flatten(1, 2) for its LSTM: the line names the LSTM."""
    from edgecompress.zoo.models import digits_lstm

    with pytest.raises(RecipeError) as e:
        lower(digits_lstm().eval(), torch.rand(1, 1, 28, 28), calib=[torch.rand(2, 1, 28, 28)])
    assert str(e.value) == f"export c: layer 'rnn' (LSTM) is not supported; supported: {SUPPORTED}"
    rows = nn.Sequential(nn.Flatten(1, 2), nn.Flatten(), nn.Linear(28 * 28, 2))
    with pytest.raises(RecipeError) as e:
        lower(rows, torch.rand(1, 1, 28, 28), calib=[torch.rand(2, 1, 28, 28)])
    assert str(e.value) == ("export c: layer '0' (Flatten) is not supported (start_dim=1, end_dim=2: only a flatten "
                            f"from dim 1 to the last); supported: {SUPPORTED}")
