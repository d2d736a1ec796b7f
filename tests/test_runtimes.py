"""Deployment beyond ONNX Runtime: TensorRT-ready int8 ONNX (checked rule by rule, run by ONNX Runtime),
Apache TVM libraries (host llvm run by TVM's runtime; aarch64 cross-compiled) and ExecuTorch .pte files
lowered to XNNPACK (run by ExecuTorch's Python runtime), each against our int8 model."""
from __future__ import annotations

import copy
import functools
import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgecompress.context import Context
from edgecompress.errors import RecipeError
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.export.tensorrt import export_tensorrt, symmetric_int8, violations
from edgecompress.primitives.qlayer import quant_layers, tensor_specs
from edgecompress.primitives.quant import QuantSpec
from edgecompress.techniques import TECHNIQUES
from edgecompress.techniques.quantize import QuantizeSpec
from edgecompress.zoo import builtin_task

CONV_TASKS = ["digits-lenet5", "mnist1d-cnn", "digits-resnet8", "digits-mobilenet"]


@functools.lru_cache(maxsize=None)
def int8(name: str, mode: str = "static"):
    """(task, our int8 model, eval inputs, our int8 model's outputs), built once per session."""
    t = builtin_task(name)
    q = TECHNIQUES["quantize"][1](copy.deepcopy(t.model), QuantizeSpec(stage="quantize", mode=mode),
                                  Context(task=t, seed=0, where="stages[0]")).eval()
    xs = torch.cat([x for x, _ in t.eval_data])
    with torch.no_grad():
        return t, q, xs, q(xs)


#: measured agreement floors of the TensorRT-ready file with our int8 model (0.995 where not listed)
TRT_AGREEMENT = {"mnist1d-cnn": 0.99}


def agreement(a, b) -> float:
    return float((torch.as_tensor(a).argmax(1) == torch.as_tensor(b).argmax(1)).float().mean())


# ---- TensorRT-ready ONNX ---------------------------------------------------------------------

def test_symmetric_int8_covers_the_affine_range():
    relu = QuantSpec(bits=8, signed=False, symmetric=False).with_params(torch.tensor(0.02), torch.tensor(0))
    s = symmetric_int8(relu)
    assert (s.signed, s.symmetric, int(s.zero_point), s.qmin, s.qmax) == (True, True, 0, -127, 127)
    assert torch.equal(s.scale, torch.tensor(0.02) * 255 / 127)
    mid = QuantSpec(bits=8, signed=False, symmetric=False).with_params(torch.tensor(0.5), torch.tensor(100))
    assert torch.equal(symmetric_int8(mid).scale, torch.tensor(0.5) * 155 / 127)  # max(100, 255 - 100)
    weight = QuantSpec(bits=8, granularity="channel").with_params(torch.tensor([0.1, 0.2]), torch.zeros(2))
    assert symmetric_int8(weight) is weight


@pytest.mark.parametrize("name", CONV_TASKS)
def test_tensorrt_file_follows_every_rule_with_our_scales(tmp_path, name):
    """Symmetric int8 everywhere (zero point 0), per-channel weight scales on the output-channel axis,
    a Q/DQ pair on the input and weight of every quantized Conv and Gemm, residual adds quantized on
    both inputs; every scale is ours (weights) or covers our spec's range (activations); ONNX Runtime
    runs the file and agrees with our int8 model."""
    import onnx
    from onnx import numpy_helper

    t, q, xs, ours = int8(name)
    path = export_tensorrt(q, t.example_input, tmp_path / "model-tensorrt.onnx")
    assert violations(path) == []
    proto = onnx.load(str(path))
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = proto.graph.node
    layers = quant_layers(q)
    weight_q = [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0].endswith(".weight")]
    assert sorted(n.input[0].removesuffix(".weight") for n in weight_q) == sorted(layers)
    for lname, ql in layers.items():  # our codes come back exactly from the float weight and our scales
        w = torch.from_numpy(arrays[f"{lname}.weight"].copy())
        scale = ql.w_spec.scale.reshape(-1, *[1] * (w.dim() - 1))
        assert torch.equal(torch.round(w / scale).to(torch.int8), ql.qweight.to(torch.int8))
    weighted = [n for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert sum(1 for n in weighted if n.input[1].endswith("DequantizeLinear_1_output_0")) == len(layers)
    acts = {k: s for k, s in tensor_specs(q).items() if k.endswith((".input", ".output"))}
    want = {symmetric_int8(s).scale.numpy().tobytes() for s in acts.values()}
    got = {arrays[n.input[1]].tobytes() for n in nodes
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not n.input[0].endswith(".weight")
           and not n.input[0].endswith(".weight_q")}
    assert got == want
    adds = [n for n in nodes if n.op_type == "Add"]
    assert len(adds) == {"digits-resnet8": 3, "digits-mobilenet": 2}.get(name, 0)
    # the one cost of TensorRT's form: a uint8 ReLU output becomes int8 over the same range, twice the
    # step (see symmetric_int8); MNIST-1D's 500 test signals flip 4 argmaxes (0.992), the others <= 0.5%
    assert agreement(run(session(path), xs), ours) >= TRT_AGREEMENT.get(name, 0.995)


def test_rules_catch_our_plain_int8_file(tmp_path):
    """The checker is not vacuous: our ONNX Runtime int8 file breaks the zero point and weight rules."""
    t, q, _, _ = int8("digits-resnet8")
    found = violations(export_onnx(q, t.example_input, tmp_path / "int8.onnx"))
    assert any("zero point must be int8 0; got (dtype('uint8')" in v for v in found)
    assert any("DequantizeLinear of a constant int8 tensor" in v for v in found)
    assert any("Conv weight is not a QuantizeLinear/DequantizeLinear pair" in v for v in found)


def test_tensorrt_refuses_dynamic_quantization_in_one_line(tmp_path):
    t = builtin_task("digits-lenet300")
    q = TECHNIQUES["quantize"][1](copy.deepcopy(t.model), QuantizeSpec(stage="quantize", mode="dynamic"),
                                  Context(task=t, seed=0, where="stages[0]"))
    with pytest.raises(RecipeError) as e:
        export_tensorrt(q, t.example_input, tmp_path / "m.onnx")
    assert str(e.value) == ("export onnx-tensorrt: layer fc1 is quantized with mode dynamic; TensorRT's int8 form "
                            "needs mode static or qat (int8 weights and activations)")
    assert not list(tmp_path.iterdir())


# ---- Apache TVM ------------------------------------------------------------------------------

def _needs(module: str, extra: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed: pip install 'edgecompress[{extra}]'")


@_needs("tvm", "tvm")
@pytest.mark.parametrize("name,tag", [("digits-lenet5", "fp32"), ("digits-lenet5", "int8"), ("digits-resnet8", "int8")])
def test_tvm_host_library_agrees_with_onnx_runtime(tmp_path, name, tag):
    from edgecompress.export import tvm

    t, q, xs, _ = int8(name)
    onnx_path = export_onnx(t.model if tag == "fp32" else q, t.example_input, tmp_path / "model.onnx")
    lib = tvm.export_library(onnx_path, tmp_path / "model.so")
    out = tvm.runner(lib)(xs.numpy())
    ort = run(session(onnx_path), xs)
    assert agreement(out, ort) >= 0.995
    assert float((torch.from_numpy(out) - ort).abs().max()) < (1e-3 if tag == "fp32" else 0.1)


@_needs("tvm", "tvm")
def test_tvm_cross_compiles_int8_for_aarch64(tmp_path):
    """Objects for 64-bit Arm always; the linked library where Debian's cross gcc is installed. Neither
    can run here (an x86-64 host)."""
    from edgecompress.export import tvm

    t, q, _, _ = int8("digits-lenet5")
    onnx_path = export_onnx(q, t.example_input, tmp_path / "model.onnx")
    tar = tvm.export_library(onnx_path, tmp_path / "model-aarch64.tar", tvm.AARCH64)
    shutil.unpack_archive(tar, tmp_path / "objects")
    kinds = {subprocess.run(["file", "-b", str(p)], capture_output=True, text=True).stdout.split(",")[1].strip()
             for p in (tmp_path / "objects").glob("*.o")}
    assert kinds == {"ARM aarch64"}
    if shutil.which(tvm.CROSS_CC) is None:
        with pytest.raises(RecipeError) as e:
            tvm.export_library(onnx_path, tmp_path / "model-aarch64.so", tvm.AARCH64)
        assert str(e.value) == ("export tvm for aarch64 links with aarch64-linux-gnu-gcc, which is not installed: "
                                "apt-get install gcc-aarch64-linux-gnu")
        pytest.skip("aarch64-linux-gnu-gcc is not installed: apt-get install gcc-aarch64-linux-gnu")
    so = tvm.export_library(onnx_path, tmp_path / "model-aarch64.so", tvm.AARCH64)
    assert "ARM aarch64" in subprocess.run(["file", "-b", str(so)], capture_output=True, text=True).stdout


# ---- ExecuTorch ------------------------------------------------------------------------------

@_needs("executorch", "executorch")
@pytest.mark.parametrize("name", CONV_TASKS)
def test_pte_int8_with_our_scales_runs_in_executorch(tmp_path, name):
    """Lowered whole to XNNPACK (one delegate call, no portable kernel); ExecuTorch's runtime agrees with
    our int8 ONNX model in ONNX Runtime."""
    from edgecompress.export import pte

    t, q, xs, _ = int8(name)
    path = pte.export_pte(q, t.example_input, tmp_path / "model.pte")
    assert pte.delegated(path) == (1, 0)
    f = pte.runner(path)
    out = np.concatenate([f(xs[i:i + 1].numpy()) for i in range(len(xs))])
    ort = run(session(export_onnx(q, t.example_input, tmp_path / "int8.onnx")), xs)
    assert agreement(out, ort) >= 0.995


@_needs("executorch", "executorch")
def test_pte_refuses_a_spec_xnnpack_lacks_in_one_line(tmp_path):
    from edgecompress.export import pte

    t = builtin_task("digits-lenet300")
    q = TECHNIQUES["quantize"][1](copy.deepcopy(t.model), QuantizeSpec(stage="quantize", mode="static", symmetric=False),
                                  Context(task=t, seed=0, where="stages[0]"))
    with pytest.raises(RecipeError) as e:
        pte.export_pte(q, t.example_input, tmp_path / "m.pte")
    assert str(e.value) == ("export pte: layer fc1 weight is int7 affine per-channel(axis 0); XNNPACK takes int8 "
                            "weights with zero point 0, per-tensor or per-channel on axis 0")
    assert not list(tmp_path.iterdir())


# ---- recipes and missing runtimes --------------------------------------------------------------

def test_recipe_takes_the_runtime_exports():
    from edgecompress.recipe import Recipe

    r = Recipe.from_dict({"stages": [{"stage": "quantize"}], "export": ["onnx-tensorrt", "tvm", "pte"]})
    assert r.export == ["onnx-tensorrt", "tvm", "pte"]


@pytest.mark.parametrize("module,call,line", [
    ("tvm", lambda: __import__("edgecompress.export.tvm", fromlist=["_tvm"])._tvm(),
     "export tvm needs Apache TVM: pip install 'edgecompress[tvm]'"),
    ("executorch", lambda: __import__("edgecompress.export.pte", fromlist=["_executorch"])._executorch(),
     "export pte needs ExecuTorch: pip install 'edgecompress[executorch]'"),
])
def test_a_missing_runtime_is_one_line_naming_the_extra(monkeypatch, module, call, line):
    import sys

    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(RecipeError) as e:
        call()
    assert str(e.value) == line
