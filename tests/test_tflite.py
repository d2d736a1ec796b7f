"""TFLite export written with LiteRT's flatbuffer schema: run by LiteRT and TFLite Micro, every scale
and zero point equal to the spec's, argmax agreement with the integer simulation."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ai_edge_litert")
pytest.importorskip("tflite_micro")

from edgecompress.context import Context  # noqa: E402
from edgecompress.errors import ArtifactError, RecipeError  # noqa: E402
from edgecompress.export import tflite as tf  # noqa: E402
from edgecompress.export.ir import lower, lower_task, run_int, to_nhwc  # noqa: E402

from .conftest import _task  # noqa: E402


@functools.lru_cache(maxsize=None)
def _quantized(name: str):
    """The task's model after a static int8 quantize stage, and its integer graph."""
    from edgecompress.techniques import quantize as QZ

    t = _task(name)
    qm = QZ.apply(copy.deepcopy(t.model), QZ.QuantizeSpec(mode="static", bits=8, reduce_range=False, keep_slow_float=False),
                  Context(task=t, seed=0)).eval()
    return qm, lower_task(qm, t, "tflite")


def _test_inputs(name: str) -> torch.Tensor:
    return torch.cat([x for x, _ in _task(name).eval_data])


@pytest.mark.parametrize("name", ["mnist1d-cnn", "digits-lenet5"])
def test_int8_tflite_runs_in_litert_and_tflite_micro(name):
    qm, g = _quantized(name)
    x = _test_inputs(name)
    q = g.quantize_input(x)
    ref = run_int(g, q)
    data = tf.to_tflite(g, int8=True)
    micro = tf.run_tflm(data, q)
    assert np.array_equal(micro, ref)  # TFLite Micro's reference kernels: bit for bit
    builtin = tf.run_litert(data, q, delegate=False)
    assert np.abs(builtin.astype(int) - ref).max() <= 1
    litert = tf.run_litert(data, q)  # as shipped: XNNPACK, its own requantization
    assert (litert.argmax(1) == ref.argmax(1)).mean() >= 0.995
    with torch.no_grad():
        sim = qm(x).numpy()  # the quantize stage's torch simulation
    qo = g.tensors[g.output].q
    sim_q = np.clip(np.round(sim / qo.scale) + qo.zero_point, -128, 127)
    for out in (micro, litert):
        assert (out.argmax(1) == sim_q.argmax(1)).mean() >= 0.995


def test_every_scale_and_zero_point_is_the_specs():
    qm, g = _quantized("mnist1d-cnn")
    model = tf.read_model(tf.to_tflite(g))
    sub = model.subgraphs[0]
    by_name = {t.name.decode() if isinstance(t.name, bytes) else t.name: t for t in sub.tensors}
    for layer in ("conv1", "conv2", "conv3", "fc"):
        ql = getattr(qm, layer)
        w = by_name[f"{layer}/weight"].quantization
        assert np.array_equal(np.array(w.scale, dtype=np.float32), ql.w_spec.scale.numpy())
        assert list(w.zeroPoint) == [0] * len(w.scale) and w.quantizedDimension == 0
        b = by_name[f"{layer}/bias"].quantization
        assert np.array_equal(np.array(b.scale, dtype=np.float32), ql.bias_spec.scale.numpy())
        assert np.array_equal(np.frombuffer(bytes(model.buffers[by_name[f"{layer}/bias"].buffer].data), np.int32),
                              torch.round(ql.layer.bias / ql.bias_spec.scale).to(torch.int64).numpy())
        if ql.in_spec is not None:
            op = next(o for o in g.ops if o.layer == layer)
            t = by_name[op.inputs[0]].quantization
            assert np.float32(t.scale[0]) == ql.in_spec.scale.numpy()
            assert t.zeroPoint[0] == int(ql.in_spec.zero_point) - 128  # uint8 spec -> int8, same grid
        if ql.out_spec is not None:
            t = by_name[next(o for o in g.ops if o.layer == layer).output].quantization
            assert np.float32(t.scale[0]) == ql.out_spec.scale.numpy()
            assert t.zeroPoint[0] == int(ql.out_spec.zero_point) - 128
    assert sub.tensors[sub.inputs[0]].type == 9  # INT8: full-integer input and output
    assert sub.tensors[sub.outputs[0]].type == 9


@pytest.mark.parametrize("name", ["mnist1d-cnn", "digits-lenet5"])
def test_fp32_tflite_matches_torch(name):
    t = _task(name)
    g = lower_task(t.model, t, "tflite", quantize=False)
    data = tf.to_tflite(g, int8=False)
    x = _test_inputs(name)[:64]
    with torch.no_grad():
        want = t.model(x).numpy()
    for out in (tf.run_litert(data, to_nhwc(x)), tf.run_tflm(data, to_nhwc(x))):
        assert np.abs(out - want).max() < 1e-4


def test_tflite_micro_reports_its_arena():
    _, g = _quantized("mnist1d-cnn")
    arena = tf.tflm_arena_bytes(tf.to_tflite(g))
    assert 4530 < arena < 64 * 1024  # at least every activation TFLite Micro keeps, plus its own structures


def test_refusals_are_one_line():
    pooled = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(RecipeError) as e:
        lower(pooled, torch.rand(1, 1, 7, 7), calib=[torch.rand(2, 1, 7, 7)], fmt="tflite")
    assert str(e.value).startswith("export tflite: layer '0' (MaxPool2d) is not supported (ceil_mode and dilation "
                                   "must be their defaults, and an average pool unpadded); supported: ")
    with pytest.raises(ArtifactError, match="^not a TFLite flatbuffer"):
        tf.read_model(b"\x00" * 16)


@pytest.mark.parametrize("model", ["everything", "grouped", "padded_pools", "dense_se", "shuffle"])
def test_every_supported_layer_in_tflite(model):
    """Depthwise, grouped conv (CONV_2D with filter channels = input channels / groups), ReLU6, residual
    add, pools, a standalone ReLU, explicit padding, padded max pools (PADV2 with the lowest value, or
    SAME), CONCATENATION (an input other layers read too rescaled onto its grid by an int8 QUANTIZE), a
    batch norm before a conv (DEPTHWISE_CONV_2D 1x1), the SE gate (LOGISTIC, broadcast MUL), chunks and
    channel shuffles (GATHER on the channels): TFLite Micro bit-exact, LiteRT within one step."""
    from .test_export_c import SMALL

    m, calib, test = SMALL[model]()
    g = lower(m, test[:1], calib=calib, fmt="tflite")
    q = g.quantize_input(test)
    ref = run_int(g, q)
    data = tf.to_tflite(g)
    assert np.array_equal(tf.run_tflm(data, q), ref)
    assert np.abs(tf.run_litert(data, q).astype(int) - ref).max() <= 1
    f32 = tf.to_tflite(lower(m, test[:1], quantize=False, fmt="tflite"), int8=False)
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(tf.run_tflm(f32, to_nhwc(test)) - want).max() < 1e-5
    assert np.abs(tf.run_litert(f32, to_nhwc(test)) - want).max() < 1e-5


def test_int8_logistic_in_tflite_micro_is_the_exported_table():
    """Every input code on input grids from [-1, 1] to [-20, 3]: TFLite Micro's int8 LOGISTIC gives the
    integer reference's table (sigmoid in float64, rounded, on TFLite's output grid 1/256, -128)."""
    from edgecompress.export.ir import Graph, Op, QParams, Tensor, lut_table

    codes = np.arange(-128, 128, dtype=np.int8).reshape(4, 8, 8, 1)
    for lo, hi in ((-1, 1), (-3, 5), (-8, 8), (-20, 3), (-0.5, 12)):
        scale = np.float32((hi - lo) / 255)
        qi, qo = QParams(scale, int(round(-128 - lo / scale))), QParams(1 / 256, -128)
        op = Op("lut", "gate", ["x"], "y", fn="Sigmoid", table=lut_table("Sigmoid", qi, qo))
        g = Graph({"x": Tensor("x", (8, 8, 1), qi), "y": Tensor("y", (8, 8, 1), qo)}, [op], "x", "y")
        assert np.array_equal(tf.run_tflm(tf.to_tflite(g), codes).reshape(codes.shape), run_int(g, codes)), (lo, hi)


def test_activations_without_an_exact_builtin_look_their_table_up():
    """Hardswish, Hardsigmoid and SiLU in int8 as CAST, ADD 128 and GATHER from the exported table (TFLite
    Micro's int8 HARD_SWISH is one step off the table for some inputs; there is no HARD_SIGMOID or SiLU
    builtin): TFLite Micro bit-exact, LiteRT within one step; in fp32 HARD_SWISH, relu6(x + 3) / 6 and
    x * LOGISTIC(x)."""
    from .test_export_c import SMALL

    m, calib, test = SMALL["activations"]()
    g = lower(m, test[:1], calib=calib, fmt="tflite")
    q = g.quantize_input(test)
    ref = run_int(g, q)
    data = tf.to_tflite(g)
    model = tf.read_model(data)
    ops = [model.operatorCodes[o.opcodeIndex].builtinCode for o in model.subgraphs[0].operators]
    B = tf._schema().BuiltinOperator
    assert ops.count(B.GATHER) == 3 and ops.count(B.CAST) == 3 and B.HARD_SWISH not in ops
    assert np.array_equal(tf.run_tflm(data, q), ref)
    assert np.abs(tf.run_litert(data, q, delegate=False).astype(int) - ref).max() <= 1  # its own conv rounding
    f32 = tf.to_tflite(lower(m, test[:1], quantize=False, fmt="tflite"), int8=False)
    with torch.no_grad():
        want = m(test).numpy()
    assert np.abs(tf.run_tflm(f32, to_nhwc(test)) - want).max() < 1e-5


def test_quantize_stage_dense_se_in_tflite_micro_is_the_integer_reference():
    """The zoo's DenseNet+SE after a static quantize stage (concatenations on their specs' grids, QUANTIZE
    for the inputs other layers read too, the batch norms before convs, the SE gates): bit-exact."""
    from .test_export_c import _static_dense_se

    _, t, g = _static_dense_se()
    q = g.quantize_input(torch.cat([x for x, _ in t.eval_data]))
    data = tf.to_tflite(g)
    assert np.array_equal(tf.run_tflm(data, q), run_int(g, q))
    assert np.abs(tf.run_litert(data, q, delegate=False).astype(int) - run_int(g, q)).max() <= 2
