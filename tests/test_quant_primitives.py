"""primitives/quant.py against independent references, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecompress.primitives import observers
from edgecompress.primitives import quant as Q
from edgecompress.primitives.onnxops import pack_nbits, pack_zero_points
from edgecompress.primitives.quant import QuantSpec


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("bits,signed,symmetric", [(8, False, False), (8, True, True), (4, True, False),
                                                   (2, False, False), (5, True, True)])
def test_per_channel_equals_torch(bits, signed, symmetric):
    x = _x(16, 8, 3)
    spec = Q.calibrate(x, QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity="channel", axis=0))
    ref = torch.fake_quantize_per_channel_affine(x, spec.scale, spec.zero_point, 0, spec.qmin, spec.qmax)
    assert torch.equal(Q.fake_quant(x, spec), ref)


@pytest.mark.parametrize("bits,signed,symmetric", [(8, False, False), (8, True, True), (3, True, True)])
def test_per_tensor_equals_torch(bits, signed, symmetric):
    x = _x(64, 10, seed=1)
    spec = Q.calibrate(x, QuantSpec(bits=bits, signed=signed, symmetric=symmetric))
    ref = torch.fake_quantize_per_tensor_affine(x, float(spec.scale), int(spec.zero_point), spec.qmin, spec.qmax)
    assert torch.equal(Q.fake_quant(x, spec), ref)


def test_affine_params_equal_torch_observer():
    x = _x(1000, seed=2) + 1.5
    spec = Q.calibrate(x, QuantSpec(bits=8, signed=False, symmetric=False))
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert torch.equal(spec.scale.reshape(1), scale) and int(spec.zero_point) == int(zp)


def test_per_group_equals_numpy():
    x = _x(6, 64, seed=3)
    spec = Q.calibrate(x, QuantSpec(bits=4, signed=True, symmetric=False, granularity="group", group_size=16))
    assert spec.scale.shape == (6, 4)
    a = x.numpy().reshape(6, 4, 16)
    lo = np.minimum(a.min(axis=2), 0)
    hi = np.maximum(a.max(axis=2), 0)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    zp = np.clip(-8 - np.round(lo / scale), -8, 7)
    q = np.clip(np.round(a * (np.float32(1) / scale)[..., None]) + zp[..., None], -8, 7)
    ref = ((q - zp[..., None]) * scale[..., None]).astype(np.float32).reshape(6, 64)
    assert np.array_equal(spec.scale.numpy(), scale)
    assert np.array_equal(Q.fake_quant(x, spec).numpy(), ref)


def test_pow2_scale_and_float16_and_idempotence():
    x = _x(8, 32, seed=4)
    base = Q.calibrate(x, QuantSpec(bits=8, granularity="channel"))
    p2 = Q.calibrate(x, QuantSpec(bits=8, granularity="channel", scale_type="pow2"))
    assert torch.equal(torch.log2(p2.scale), torch.round(torch.log2(p2.scale)))
    assert bool((p2.scale >= base.scale).all()) and bool((p2.scale < 2 * base.scale).all())
    assert torch.equal(Q.fake_quant(x, QuantSpec(bits=16)), x.half().float())
    y = Q.fake_quant(x, base)
    assert torch.equal(Q.fake_quant(y, base), y)
    assert QuantSpec(bits=8).qmin == -127 and QuantSpec(bits=8, symmetric=False).qmin == -128
    assert QuantSpec(bits=4, signed=False).qmax == 15


def test_observers():
    x = torch.cat([_x(4000, seed=5), torch.tensor([60.0])])
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    mm = observers.observer("minmax", spec)
    pc = observers.observer("percentile", spec, percentile=99.0)
    mse = observers.observer("mse", spec)
    ent = observers.observer("entropy", spec)
    ma = observers.observer("moving_average", spec, momentum=0.5)
    for o in (mm, pc, mse, ent, ma):
        o.observe(x[:2000])
        o.observe(x[2000:])
    assert float(mm.result().scale) == pytest.approx((60 - float(x.min())) / 255, rel=1e-6)
    lo1, hi1 = x[:2000].min(), x[:2000].max()
    assert float(ma.range()[1]) == pytest.approx(float(hi1 + 0.5 * (60 - hi1)))
    assert float(ma.range()[0]) == pytest.approx(float(lo1 + 0.5 * (x[2000:].min() - lo1)))
    for o in (pc, mse, ent):
        assert float(o.result().scale) < float(mm.result().scale)
    err = {n: float(((Q.fake_quant(x, o.result()) - x) ** 2).mean()) for n, o in (("mm", mm), ("mse", mse))}
    assert err["mse"] < err["mm"]


def test_gptq_beats_nearest_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    spec = QuantSpec(bits=4, granularity="group", group_size=16)
    codes, s2 = Q.gptq(w, x.t() @ x, spec)
    assert s2.scale.shape == (32, 4) and float(codes.min()) >= -7 and float(codes.max()) <= 7
    near = Q.fake_quant(w, Q.calibrate(w, spec))
    e_gptq = float(((x @ (w - Q.dequantize(codes, s2)).t()) ** 2).mean())
    e_near = float(((x @ (w - near).t()) ** 2).mean())
    assert e_gptq < 0.7 * e_near


def test_equalization_and_bn_folding_keep_the_function():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.5, 2, generator=g)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w, b = Q.fold_batchnorm(conv.weight.detach(), conv.bias.detach(), bn.running_mean, bn.running_var,
                            bn.weight.detach(), bn.bias.detach(), bn.eps)
    assert torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
    w1, w2 = torch.randn(8, 5, generator=g) * torch.logspace(-2, 1, 8).unsqueeze(1), torch.randn(3, 8, generator=g)
    s = Q.equalize_scales(w1, w2)
    r1 = (w1 / s.unsqueeze(1)).abs().max(dim=1).values
    r2 = (w2 * s).abs().max(dim=0).values
    assert torch.allclose(r1, r2, rtol=1e-5)


def test_nbits_packing_layout():
    codes = torch.tensor([[1, 2, 3, 4] * 4, [15, 0, 7, 8] * 4])
    packed = pack_nbits(codes, 4, 16)
    assert packed.shape == (2, 1, 8)
    assert packed[0, 0, 0] == 1 | (2 << 4) and packed[1, 0, 1] == 7 | (8 << 4)
    assert pack_zero_points(torch.tensor([[8, 9, 10]]), 4).tolist() == [8 | (9 << 4), 10]


def test_quantize_divides_by_the_scale_as_onnx_quantize_linear():
    """Codes of values on a pooled grid (k * scale / 4, where ties are common) are ONNX Runtime's
    QuantizeLinear codes, which divide by the scale; multiplying by 1 / scale rounds some differently."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    scale, zp = 0.0271939542, 3
    x = (torch.arange(-400, 400, dtype=torch.float32) * scale) / 4
    spec = QuantSpec(bits=8, signed=False, symmetric=False).with_params(torch.tensor(scale), torch.tensor(zp))
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [800])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [800])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("z", TensorProto.UINT8, [], [zp])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x.numpy()})[0].astype(np.float32)
    assert np.array_equal(Q.quantize(x, spec).numpy(), ref)
    by_inverse = torch.clamp(torch.round(x * (1.0 / scale)) + zp, 0, 255)
    assert int((by_inverse.numpy() != ref).sum()) > 0  # the values do test the difference


@pytest.mark.parametrize("kind,groups", [("conv2d", 1), ("conv2d", 2), ("conv1d", 1)])
def test_gptq_on_convolutions_beats_nearest_rounding(kind, groups):
    """GPTQ on a convolution's im2col patches: the columns reproduce the conv exactly, and its codes
    give a smaller output error than rounding to nearest."""
    from torch import nn

    from edgecompress.techniques.quantize.gptq import gptq_columns, gptq_layer

    g = torch.Generator().manual_seed(0)
    conv = (nn.Conv2d(8, 12, 3, padding=1, groups=groups) if kind == "conv2d" else nn.Conv1d(8, 12, 5, padding=2))
    x = torch.randn(16, 8, *((10, 10) if kind == "conv2d" else (40,)), generator=g).cumsum(1)  # correlated inputs
    cols = gptq_columns(conv, x)
    w = conv.weight.detach().reshape(groups, 12 // groups, -1)
    out = torch.cat([cols[i] @ w[i].t() for i in range(groups)], 1)  # (N*L, out)
    ref = conv._conv_forward(x, conv.weight, None)
    assert torch.allclose(out, ref.movedim(1, -1).reshape(-1, 12), atol=1e-4)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, granularity="channel", axis=0)
    codes, cal = gptq_layer(conv, cols.transpose(-1, -2) @ cols, spec, mse=False)
    assert codes.shape == conv.weight.shape and cal.scale.shape == (12,)

    def err(wq):
        return float(((conv._conv_forward(x, wq, None) - ref) ** 2).mean())
    assert err(Q.dequantize(codes, cal)) < 0.8 * err(Q.fake_quant(conv.weight.detach(), Q.calibrate(conv.weight.detach(), spec)))
