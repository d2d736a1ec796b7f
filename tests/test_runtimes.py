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
from edgecompress.primitives.qlayer import act_quants, quant_layers, tensor_specs
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


#: floor of the TensorRT-ready file's agreement with our int8 model. Symmetric int8 activations double
#: a ReLU output's step (see symmetric_int8), and how many argmaxes that flips depends on the trained
#: baseline: 0.987 to 1.000 measured over the four tasks and three kernel settings. A wrong scale or a
#: missing Q/DQ pair flips far more; the file's own exactness is checked against the symmetric simulation.
TRT_AGREEMENT = 0.98


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
    # step (see symmetric_int8)
    trt = run(session(path), xs)
    assert agreement(trt, ours) >= TRT_AGREEMENT
    # and only that: our model simulated in torch with those symmetric specs (nothing else changed) agrees
    # with the file (MNIST-1D 0.999, ResNet-8 0.997, 1.000 the others) and with ours as the file does
    # (MNIST-1D 0.991 against 0.992; ResNet-8 1.000 against 0.997, one image of 360)
    sym = copy.deepcopy(q)
    for ql in quant_layers(sym).values():
        for key in ("in", "out"):
            if getattr(ql, f"{key}_spec") is not None:
                ql.set_spec(key, symmetric_int8(getattr(ql, f"{key}_spec")))
    for aq in act_quants(sym).values():
        aq.set_spec(symmetric_int8(aq.spec))
    with torch.no_grad():
        sym_out = sym(xs)
    assert agreement(trt, sym_out) >= 0.995
    assert abs(agreement(sym_out, ours) - agreement(trt, ours)) <= 0.003


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


# ---- device profiles: the runtime a device implies, measured in a device row -------------------

def _profile(tmp_path, **change) -> str:
    import yaml
    from importlib import resources

    data = yaml.safe_load(resources.files("edgecompress.devices").joinpath("rpi4.yaml").read_text())
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({**data, **change}))
    return str(path)


@pytest.mark.parametrize("change,line", [
    ({"runtime": "tensorflow"}, "runtime[0] must be one of c, tflite-micro, onnxruntime, executorch, tvm, tensorrt; "
                                "got 'tensorflow'"),
    ({"runtime": ["tvm", "tvm"]}, "runtime must not name a runtime twice; got ['tvm', 'tvm']"),
    ({"runtime": ["c", "tvm"]}, "runtime c runs alone (a microcontroller runs one runtime); got ['c', 'tvm']"),
    ({"runtime": []}, "runtime must have at least 1 item(s); got []"),
    ({"runtime": "tvm", "tvm_target": None}, "tvm_target is required when runtime lists tvm (host or aarch64); "
                                             "got None"),
    ({"runtime": "onnxruntime"}, "tvm_target is only for runtime tvm (runtime: onnxruntime); got 'aarch64'"),
    ({"tvm_target": "riscv"}, "tvm_target must be one of host, aarch64; got 'riscv'"),
])
def test_a_profile_runtime_is_validated_in_one_line(tmp_path, change, line):
    from edgecompress.devices import load_device

    path = _profile(tmp_path, **change)
    with pytest.raises(RecipeError) as e:
        load_device(path)
    assert str(e.value) == f"{path}: not a valid device profile: {line}"


def test_shipped_profiles_name_their_runtimes():
    from edgecompress.devices import NAMES, load_device

    runtimes = {n: load_device(n).runtime for n in NAMES}
    assert runtimes.pop("rpi4") == ["onnxruntime", "executorch", "tvm"]
    assert load_device("rpi4").tvm_target == "aarch64"
    assert runtimes.pop("jetson-orin-nano") == ["tensorrt", "onnxruntime"]
    assert runtimes == {n: ["tflite-micro"] if n == "esp32-s3" else ["c"] for n in runtimes}


@_needs("executorch", "executorch")
@_needs("tvm", "tvm")
def test_rpi4_rows_give_bytes_and_latency_in_each_runtime(tmp_path):
    """device: rpi4 lists ONNX Runtime, ExecuTorch and TVM: every row gives the bytes of each file, the
    .pte timed on this host round-robin with the row's ONNX file in one loop, and the aarch64 library's
    bytes with the reason it is not timed."""
    import edgecompress as ec

    recipe = ec.Recipe.from_dict({"task": "mnist1d-cnn", "device": "rpi4", "stages": [{"stage": "quantize"}],
                                  "measure": {"batches": [1], "repeats": 3}})
    from edgecompress.export import pte

    rep = ec.compress(None, recipe, workdir=tmp_path).report
    for i, (row, onnx_name, tag) in enumerate(zip(rep.rows, ["baseline.onnx", "stage1.onnx"], ["fp32", "int8"])):
        d = row.device
        ort, et, tv = d.runtimes
        assert [e["runtime"] for e in d.runtimes] == ["onnxruntime", "executorch", "tvm"]
        assert (d.runtime, d.precision, d.artifact) == ("onnxruntime", tag, "ONNX file")
        assert d.flash_bytes == ort["bytes"] == (tmp_path / onnx_name).stat().st_size
        assert et["bytes"] == (tmp_path / f"device-{i}" / "model.pte").stat().st_size
        assert et["artifact"] == f"ExecuTorch .pte lowered to XNNPACK ({tag})"
        assert pte.delegated(et["file"]) == (1, 0)
        assert tv["bytes"] == (tmp_path / f"device-{i}" / "model-aarch64.so").stat().st_size
        assert "ARM aarch64" in subprocess.run(["file", "-b", tv["file"]], capture_output=True, text=True).stdout
        assert ort["latency_ms"] > 0 and et["latency_ms"] > 0
        assert et["onnxruntime_ms"] == ort["latency_ms"] == ort["onnxruntime_ms"]  # the same loop
        assert tv["latency_ms"] is None
        assert tv["note"].startswith("not measured: cannot run here (an aarch64 library, this host is ")
    assert rep.rows[1].device.runtimes[1]["bytes"] < rep.rows[0].device.runtimes[1]["bytes"] / 1.5  # int8 .pte
    head, cells = rep.table()
    assert head[-2:] == ["onnxruntime ms b=1", "executorch ms b=1"]
    assert cells[1][-1] == f"{rep.rows[1].device.runtimes[1]['latency_ms']:.3f}"
    lines = rep.device_lines()
    et = rep.rows[1].device.runtimes[1]
    assert (f"1. quantize: executorch: {et['bytes']:,} bytes (ExecuTorch .pte lowered to XNNPACK (int8)); "
            f"{et['latency_ms']:.3f} ms at batch 1 measured on this host, not on rpi4 (ONNX Runtime "
            f"{et['onnxruntime_ms']:.3f} ms in the same loop, 1 thread(s))") in lines


@_needs("tvm", "tvm")
def test_host_tvm_and_tensorrt_profile(tmp_path):
    """A profile whose first runtime is TVM for this host: flash is the library's bytes and the library is
    timed; TensorRT beside it gives the TensorRT-ready file's bytes and says it was not built by TensorRT."""
    from edgecompress.deploy import evaluate, time_runtimes
    from edgecompress.devices import load_device
    from edgecompress.export import tvm

    t, q, xs, _ = int8("mnist1d-cnn")
    onnx_path = export_onnx(q, t.example_input, tmp_path / "int8.onnx")
    dev = load_device(_profile(tmp_path, runtime=["tvm", "tensorrt"], tvm_target="host"))
    m = evaluate(q, t, dev, tmp_path / "dev", onnx_path)
    lib, trt = m.runtimes
    assert (m.runtime, m.precision, m.artifact) == ("tvm", "int8", "TVM library for this host, llvm (int8)")
    assert m.flash_bytes == lib["bytes"] == (tmp_path / "dev" / "model.so").stat().st_size
    assert agreement(tvm.runner(lib["file"])(xs.numpy()), run(session(onnx_path), xs)) >= 0.995
    assert trt["bytes"] == (tmp_path / "dev" / "model-tensorrt.onnx").stat().st_size
    assert violations(trt["file"]) == []
    assert trt["note"] == ("not measured: TensorRT needs an NVIDIA GPU and none is here; the file was not built "
                           "by TensorRT")
    time_runtimes([m], [onnx_path], t.example_input, repeats=3)
    assert lib["latency_ms"] > 0 and lib["onnxruntime_ms"] > 0 and trt["latency_ms"] is None


def test_a_device_runtime_not_installed_is_one_line_before_any_work(monkeypatch, tmp_path):
    import sys

    import edgecompress as ec

    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "executorch", None)
    recipe = ec.Recipe.from_dict({"task": "mnist1d-cnn", "device": "rpi4", "stages": [{"stage": "quantize"}]})
    with pytest.raises(RecipeError) as e:
        ec.compress(None, recipe, workdir=tmp_path / "out")
    assert str(e.value) == "device rpi4: runtime executorch needs ExecuTorch: pip install 'edgecompress[executorch]'"
    assert not (tmp_path / "out").exists()


def test_jetson_rows_give_the_tensorrt_file_and_say_it_was_not_built(tmp_path):
    from edgecompress.deploy import evaluate
    from edgecompress.devices import load_device
    from edgecompress.measure import Metrics
    from edgecompress.report import Report, Row

    t, q, _, _ = int8("mnist1d-cnn")
    dev = load_device("jetson-orin-nano")
    fp32_onnx = export_onnx(t.model, t.example_input, tmp_path / "fp32.onnx")
    base = evaluate(t.model, t, dev, tmp_path / "base", fp32_onnx)
    assert (base.runtime, base.precision, base.artifact) == ("tensorrt", "fp32", "ONNX file (TensorRT builds its "
                                                                                 "fp32/fp16 engine from it)")
    assert base.flash_bytes == fp32_onnx.stat().st_size
    int8_onnx = export_onnx(q, t.example_input, tmp_path / "int8.onnx")
    m = evaluate(q, t, dev, tmp_path / "q", int8_onnx)
    assert (m.precision, m.artifact) == ("int8", "TensorRT-ready ONNX (symmetric int8 Q/DQ)")
    assert m.flash_bytes == (tmp_path / "q" / "model-tensorrt.onnx").stat().st_size
    assert violations(tmp_path / "q" / "model-tensorrt.onnx") == []
    assert [e["runtime"] for e in m.runtimes] == ["tensorrt", "onnxruntime"]
    assert m.runtimes[1]["bytes"] == int8_onnx.stat().st_size
    metrics = Metrics(params=1, nonzero_params=1, dense_bytes=4, stored_bytes=1, artifact="onnx", macs=1, metric=1.0,
                      metric_name="accuracy")
    lines = Report("mnist1d-cnn", [Row("1. quantize", "quantize", metrics, device=m)]).device_lines()
    assert (f"1. quantize: tensorrt: {m.flash_bytes:,} bytes (TensorRT-ready ONNX (symmetric int8 Q/DQ)); not "
            "measured: TensorRT needs an NVIDIA GPU and none is here; the file was not built by TensorRT") in lines
    assert (f"1. quantize: onnxruntime: {int8_onnx.stat().st_size:,} bytes (ONNX file); not timed "
            "(measure: {latency: false})") in lines
