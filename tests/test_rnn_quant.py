"""Dynamic quantization of recurrent layers: LSTM through ONNX Runtime's DynamicQuantizeLSTM, GRU as
int8 weights dequantized in the graph. Accuracy floors, ONNX Runtime agreement on the same batches,
the kernel that ran, scales in the file equal to the spec, file bytes, .ecz round trip."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import edgecompress as ec
from edgecompress.context import Context
from edgecompress.errors import RecipeError
from edgecompress.export.ir import lower_task
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.export.onnx_quant import optimized_ops, quant_params
from edgecompress.export.ecz import pack
from edgecompress.primitives.qlayer import tensor_specs
from edgecompress.primitives.qrnn import QuantGRU, QuantLSTM, QuantRNN, dynamic_matmul
from edgecompress.primitives.quant import QuantSpec
from edgecompress.task import evaluate
from edgecompress.techniques import TECHNIQUES
from edgecompress.techniques.quantize import QuantizeSpec


def quantize(t, **kw):
    spec = QuantizeSpec(stage="quantize", **kw)
    ctx = Context(task=t, seed=0, where="stages[0]")
    return TECHNIQUES["quantize"][1](copy.deepcopy(t.model), spec, ctx), ctx


def same_batches(model, sess, t):
    """torch and ONNX Runtime outputs on the same batches (run-time scales depend on the batch)."""
    with torch.no_grad():
        sim = torch.cat([model(x) for x, _ in t.eval_data])
    return sim, torch.cat([run(sess, x) for x, _ in t.eval_data])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Recurrent layers step through tiny matrices: on a shared machine, intra-op threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lstm(task, one_thread):
    t = task("digits-lstm")
    return t, *quantize(t, mode="dynamic")


def test_lstm_dynamic_accuracy_ort_agreement_and_kernel(lstm, tmp_path):
    t, q, ctx = lstm
    base, acc = evaluate(t.model, t), evaluate(q, t)
    assert base >= 0.95 and base - acc <= 0.005, (base, acc)
    assert isinstance(q.rnn, QuantLSTM)
    assert ctx.log.touched["rnn"].startswith("dynamic: W and R int7 sym per-channel(axis 0) (rows in ONNX gate order")
    assert "DynamicQuantizeLSTM x1" in next(n for n in ctx.log.notes if n.startswith("ONNX Runtime integer kernels"))
    assert any("dynamic int8 runs" in n and ("FASTER" in n or "SLOWER" in n) for n in ctx.log.notes)
    path = export_onnx(q, t.example_input, tmp_path / "q.onnx")
    sim, ort = same_batches(q, session(path), t)
    assert float((sim.argmax(1) == ort.argmax(1)).float().mean()) >= 0.995
    assert float((sim - ort).abs().max()) < 0.05
    ops = optimized_ops(path)
    assert ops["DynamicQuantizeLSTM"] == 1 and ops["LSTM"] == 0
    assert ops["MatMul"] == ops["Gemm"] == 0  # the head runs as DynamicQuantizeMatMul


def test_lstm_file_holds_the_spec_and_the_codes(lstm, tmp_path):
    t, q, _ = lstm
    path = export_onnx(q, t.example_input, tmp_path / "q.onnx")
    specs = tensor_specs(q)
    w, r = specs["rnn.weight_ih_l0"], specs["rnn.weight_hh_l0"]
    assert w.bits == r.bits == 7 and w.describe() == "int7 sym per-channel(axis 0)"
    in_file = [(s, z) for op, s, z in quant_params(path) if op == "DynamicQuantizeLSTM"]
    assert len(in_file) == 2
    for (s, z), spec in zip(in_file, (w, r)):
        assert s.dtype == np.float32 and s.shape == (1, 256) and z.dtype == np.int8 and z.shape == (1, 256)
        assert s.tobytes() == spec.scale.numpy().tobytes()
        assert z.astype(np.int32).tobytes() == spec.zero_point.numpy().tobytes()
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(path))
    consts = {t_.name: numpy_helper.to_array(t_) for t_ in proto.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                   if n.op_type == "Constant"})
    node = next(n for n in proto.graph.node if n.op_type == "DynamicQuantizeLSTM")
    # [directions, input, 4 * hidden]: the layout onnxruntime.quantization.quantize_dynamic writes
    assert np.array_equal(consts[node.input[1]], q.rnn.ih0_q.numpy().T[None])
    assert np.array_equal(consts[node.input[2]], q.rnn.hh0_q.numpy().T[None])
    assert consts[node.input[1]].dtype == np.int8 and consts[node.input[1]].shape == (1, 28, 256)
    # 23,552 LSTM and 640 head weights lose 3 of their 4 bytes; 522 float32 scales and 512 int8 zero
    # points are added
    fp32 = export_onnx(t.model, t.example_input, tmp_path / "fp32.onnx").stat().st_size
    size = path.stat().st_size
    assert fp32 - size >= 3 * (23_552 + 640) - 4 * 522 - 512 - 3_000, (fp32, size)
    assert fp32 / size > 2.9, (fp32, size)


def test_lstm_ecz_loads_and_runs_like_the_onnx_file(lstm, tmp_path):
    t, q, _ = lstm
    path = export_onnx(q, t.example_input, tmp_path / "q.onnx")
    packed = pack(path, tmp_path / "q.ecz")
    assert packed.size < path.stat().st_size
    model = ec.load(tmp_path / "q.ecz")
    xs = torch.cat([x for x, _ in t.eval_data])
    assert torch.equal(model(xs), run(session(path), xs, batch_size=len(xs)))


def test_gru_int8_storage_float_compute(task, tmp_path):
    t = task("digits-gru")
    base = evaluate(t.model, t)
    q, ctx = quantize(t, mode="dynamic")
    acc = evaluate(q, t)
    assert base >= 0.95 and base - acc <= 0.005, (base, acc)
    assert isinstance(q.rnn, QuantGRU)
    assert "ONNX Runtime has no integer GRU kernel" in ctx.log.touched["rnn"]
    assert "the compute stays float" in ctx.log.touched["rnn"]
    path = export_onnx(q, t.example_input, tmp_path / "q.onnx")
    sim, ort = same_batches(q, session(path), t)
    assert float((sim.argmax(1) == ort.argmax(1)).float().mean()) >= 0.995
    ops = optimized_ops(path)
    assert ops["GRU"] == 1
    specs = tensor_specs(q)
    dq = [(s, z) for op, s, z in quant_params(path) if op == "DequantizeLinear"]
    assert len(dq) == 2
    for (s, z), key in zip(dq, ("rnn.weight_ih_l0", "rnn.weight_hh_l0")):
        assert s.tobytes() == specs[key].scale.numpy().tobytes() and s.shape == (192,)
        assert z.astype(np.int32).tobytes() == specs[key].zero_point.numpy().tobytes()
    # 17,664 GRU and 640 head weights lose 3 of their 4 bytes; 394 float32 scales and 384 zero points
    fp32 = export_onnx(t.model, t.example_input, tmp_path / "fp32.onnx").stat().st_size
    size = path.stat().st_size
    assert fp32 - size >= 3 * (17_664 + 640) - 4 * 394 - 384 - 3_000, (fp32, size)
    assert fp32 / size > 2.8, (fp32, size)


def test_two_layer_bidirectional_lstm_gru_rnn_match_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 12, 6)
    for cls, qcls in ((nn.LSTM, QuantLSTM), (nn.GRU, QuantGRU), (nn.RNN, QuantRNN)):
        layer = cls(6, 16, num_layers=2, bidirectional=True, batch_first=True)
        spec = QuantSpec(bits=7, signed=True, symmetric=True, granularity="tensor")
        model = nn.Sequential(qcls(layer, spec)).eval()

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = model[0]

            def forward(self, x):
                out, _ = self.rnn(x)
                return out

        m = Head().eval()
        path = export_onnx(m, x[:1], tmp_path / f"{cls.__name__}.onnx")
        with torch.no_grad():
            sim = m(x)
        ort = run(session(path), x, batch_size=len(x))
        assert sim.shape == ort.shape == (8, 12, 32)
        assert float((sim - ort).abs().max()) < 1e-3, cls.__name__
        with torch.no_grad():  # torch's own layer on the dequantized weights, float activations
            ref, _ = layer(x)
        tol = 0.05 if cls is nn.LSTM else 1e-5
        assert float((sim - ref).abs().max()) < tol, cls.__name__


def test_dynamic_matmul_is_onnx_runtimes_integer_product():
    x = torch.tensor([[0.0, 1.0, -0.5], [2.0, 0.25, 0.0]])
    q = torch.tensor([[1, -2, 3], [127, 0, -127]], dtype=torch.int8)
    ws = torch.tensor([0.5, 0.01])
    s = (2.0 - -0.5) / 255  # range widened to hold zero; zero point round(0.5 / s) = 51
    xq = torch.clamp(torch.round(x / s) + 51, 0, 255) - 51
    ref = (xq @ q.float().t()) * (s * ws)
    assert torch.equal(dynamic_matmul(x, q, ws), ref)


def test_other_modes_skip_recurrent_layers_with_the_reason(lstm):
    t, _, _ = lstm
    _, ctx = quantize(t, mode="weight_only", bits=8)
    assert ctx.log.skipped["rnn"] == ("LSTM layers are quantized in mode dynamic (int8 weights; ONNX Runtime has no "
                                      "weight_only LSTM kernel); kept float")


def test_layers_and_exclude_address_the_recurrent_layer(lstm):
    t, _, _ = lstm
    only, ctx = quantize(t, mode="dynamic", layers=["rnn"])
    assert isinstance(only.rnn, QuantLSTM) and isinstance(only.fc, nn.Linear)
    assert ctx.log.skipped["fc"] == "excluded by the recipe"
    rest, ctx2 = quantize(t, mode="dynamic", exclude=["rnn"])
    assert isinstance(rest.rnn, nn.LSTM) and ctx2.log.skipped["rnn"] == "excluded by the recipe"


def test_device_exports_refuse_int8_recurrent_layers_in_one_line(lstm):
    t, q, _ = lstm
    for fmt in ("c", "tflite"):
        with pytest.raises(RecipeError) as e:
            lower_task(q, t, fmt)
        assert str(e.value) == (f"export {fmt}: the model cannot be traced by torch.fx: LSTM with int8 weights runs "
                                f"in ONNX Runtime only; the C and TFLite exports have no recurrent kernel")
