"""What a new user runs into with their own files and models: one line, exit 2, nothing lost; the
output layer left whole unless named; choices that do not depend on how busy the machine is."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import edgecompress as ec
from edgecompress.context import Context
from edgecompress.layers import output_layers
from edgecompress.techniques import TECHNIQUES

RECIPE = """version: 1
task: digits-lenet300
stages:
  - stage: prune
    sparsity: 0.5
"""


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecompress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_factory_that_raises_and_an_existing_file_as_out(tmp_path):
    (tmp_path / "userpkg.py").write_text("def make():\n    raise FileNotFoundError('no data in /data/kws')\n")
    (tmp_path / "r.yaml").write_text(RECIPE)
    r = cli("run", "r.yaml", "--task", "userpkg:make", "-o", "out", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert one_line(r) == "error: task 'userpkg:make': the factory raised FileNotFoundError: no data in /data/kws"
    assert not (tmp_path / "out").exists()
    taken = tmp_path / "model.onnx"
    taken.write_bytes(b"keep me")
    r = cli("run", "r.yaml", "-o", "model.onnx", cwd=tmp_path)
    assert one_line(r) == "error: --out must name a folder; 'model.onnx' is an existing file"
    assert taken.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == \
        ["model.onnx", "r.yaml", "userpkg.py"]


def test_a_truncated_ecz_names_its_file(tmp_path, task):
    t = task("digits-lenet300")
    path = tmp_path / "m.ecz"
    from edgecompress.export.onnx import export_onnx
    from edgecompress.export.ecz import pack

    pack(export_onnx(t.model, t.example_input, tmp_path / "m.onnx"), path)
    data = path.read_bytes()
    path.write_bytes(data[:-32])
    with pytest.raises(ec.ArtifactError) as e:
        ec.load(path)
    assert str(e.value).startswith(f"{path}: truncated .ecz file: stream ")
    r = cli("unpack", str(path), "-o", str(tmp_path / "back.onnx"), cwd=tmp_path)
    assert one_line(r).startswith(f"error: {path}: truncated .ecz file: stream ")
    assert not (tmp_path / "back.onnx").exists()


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: digits-lenet300\nstages:\n  - stage: prune\n    sparsity: 0.5\n    sparsity: 0.9\n")
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_yaml(p)
    assert str(e.value) == f"{p}: stages[0].sparsity is given twice (lines 4 and 5); keep one"
    p.write_text("task: a\ntask: b\nstages: []\n")
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_yaml(p)
    assert str(e.value) == f"{p}: task is given twice (lines 1 and 2); keep one"


def _apply(t, spec: dict):
    spec_cls, apply = TECHNIQUES[spec["stage"]]
    ctx = Context(task=t, seed=0, where="stages[0]")
    return apply(copy.deepcopy(t.model), spec_cls(**spec), ctx), ctx


LEFT_WHOLE = "the model's output layer is left whole (name it in layers, or keep_output: false, to include it)"


def test_the_classifier_is_left_out_of_lowrank_and_prune_unless_named(task):
    t = task("digits-lenet300")
    m, ctx = _apply(t, {"stage": "lowrank", "method": "svd", "ratio": 0.25})
    assert ctx.log.skipped == {"fc3": LEFT_WHOLE}
    assert isinstance(m.fc3, nn.Linear) and set(ctx.log.touched) == {"fc1", "fc2"}
    m, ctx = _apply(t, {"stage": "lowrank", "method": "svd", "ratio": 0.25, "layers": ["fc2", "fc3"]})
    assert not isinstance(m.fc3, nn.Linear) and set(ctx.log.touched) == {"fc2", "fc3"}

    m, ctx = _apply(t, {"stage": "prune", "sparsity": 0.9})
    assert ctx.log.skipped == {"fc3": LEFT_WHOLE}
    assert int((m.fc3.weight != 0).sum()) == 1000
    kept = int((m.fc1.weight != 0).sum()) + int((m.fc2.weight != 0).sum())
    assert kept == round(0.1 * (784 * 300 + 300 * 100))
    m, ctx = _apply(t, {"stage": "prune", "sparsity": 0.9, "keep_output": False})
    assert "fc3" not in ctx.log.skipped and int((m.fc3.weight != 0).sum()) < 1000
    m, ctx = _apply(t, {"stage": "prune", "sparsity": 0.9, "per_layer": {"fc3": 0.5}})
    assert int((m.fc3.weight != 0).sum()) == 500


class LogSoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return torch.log_softmax(self.head(torch.relu(self.body(x))), dim=1)


class Pooled(nn.Module):
    """An embedding model: its last Linear feeds a norm and a mean, so it has no output layer."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x)).mean(dim=1)


def test_output_layers_of_models_we_did_not_write():
    assert output_layers(LogSoftmaxHead(), torch.zeros(2, 8), fallback=False) == ["head"]
    assert output_layers(nn.Sequential(nn.Linear(8, 4), nn.Flatten()), torch.zeros(2, 8)) == ["0"]
    assert output_layers(Pooled(), torch.zeros(2, 5, 8), fallback=False) == []


def test_thin_convs_stay_float_by_a_rule_not_a_timing(task, monkeypatch):
    import importlib

    measure = importlib.import_module("edgecompress.measure")

    def no_timing(*a, **k):
        raise AssertionError("the quantize stage must not time the model to choose its layers")

    monkeypatch.setattr(measure, "compare_latency", no_timing)
    _, ctx = _apply(task("digits-lenet5"), {"stage": "quantize", "mode": "static", "calib_batches": 2})
    assert ctx.log.skipped["conv1"] == (
        "a 1-channel conv (12.6% of the MACs) makes the all-int8 model an estimated 1.33x slower in ONNX "
        "Runtime: kept float, the next layer quantizes its output (keep_slow_float: false quantizes it)")
    _, ctx = _apply(task("mnist1d-cnn"), {"stage": "quantize", "mode": "static", "calib_batches": 2})
    assert "conv1" not in ctx.log.skipped
    assert "thin-input convs conv1 (3.3% of the MACs) stay int8: all-int8 is estimated 1.04x the time with " \
           "them float, under 1.2x" in ctx.log.notes


def test_the_int4_peer_of_bench_quantize_runs_from_a_fresh_install(tmp_path):
    """bench.quantize's onnxruntime MatMulNBits row needs onnx-ir, which the `bench` extra installs."""
    import onnx

    from bench._peers import ort_int4
    from edgecompress.export.onnx import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()  # on (batch, tokens, 64): MatMul
    src = export_onnx(model, torch.zeros(1, 4, 64), tmp_path / "fp32.onnx")
    ort_int4(src, tmp_path / "int4.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops


def test_recipe_c_format_forces_a_layer_format_in_the_c_export(task, tmp_path):
    """`c: {format: ...}` reaches the C export; a bad format is one line naming the field."""
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}], "c": {"format": "sparse2"}})
    assert str(e.value).startswith("recipe: c.format must be one of auto, dense, int4, codebook, sparse, ")
    assert str(e.value).endswith("; got 'sparse2'")
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "quantize", "mode": "static", "calib_batches": 2}],
                                  "c": {"format": {"fc1": "dense"}}, "measure": {"latency": False}})
    result = ec.compress(task("digits-lenet300"), recipe)
    out = result.export_c(tmp_path / "c")
    header = (out / "model.h").read_text()
    assert " fc1: fc + relu, dense weights -> [300]" in header
    assert " fc2: fc + relu, dense weights" not in header  # the other layers stay auto: their smallest format
