"""The public functions: a wrong argument type is one TypeError naming the function and the parameter;
a task name works wherever the CLI takes one; a metric's change is shown in its own units; a user's
factory can import torchvision."""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import edgecompress as ec
from edgecompress.export.c import export_model as export_c
from edgecompress.export.onnx import export_onnx
from edgecompress.export.pte import export_pte
from edgecompress.export.tensorrt import export_tensorrt
from edgecompress.export.tflite import export_model as export_tflite
from edgecompress.export.tvm import export_model as export_tvm
from edgecompress.measure import Metrics
from edgecompress.pipeline import Result
from edgecompress.report import Report, Row
from edgecompress.report.html import headline, to_html
from edgecompress.task import change_text

TASK = "an edgecompress.Task or a task name such as 'digits-lenet300'"
TASK_OR_NONE = TASK + " or None (the recipe's task)"
PATH = "a path (str or os.PathLike)"
X = torch.zeros(1, 4)
NET = nn.Linear(4, 2)


def tiny_task() -> ec.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return ec.Task(model=nn.Linear(4, 2), train_data=(x, x[:, 0].gt(0).long()), eval_data=(x, x[:, 0].gt(0).long()))


RESULT = Result(model=NET, report=None, recipe=None, task=tiny_task())
RECIPE = ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}], "measure": {"latency": False}})

WRONG = [
    (lambda: ec.measure("model.onnx", 3), f"measure(): task must be {TASK}; got int"),
    (lambda: ec.measure(3, "digits-lenet300"),
     "measure(): model_or_path must be a torch.nn.Module or the path of an .onnx or .ecz file; got int"),
    (lambda: ec.measure(NET, "digits-lenet300", onnx_path=3), f"measure(): onnx_path must be {PATH} or None; got int"),
    (lambda: ec.measure(NET, "digits-lenet300", artifact=b"m.ecz"),
     f"measure(): artifact must be {PATH} or None; got bytes"),
    (lambda: ec.compress(3, RECIPE), f"compress(): task must be {TASK_OR_NONE}; got int"),
    (lambda: ec.compress("digits-lenet300", "recipes/prune-90.yaml"),
     "compress(): recipe must be an edgecompress.Recipe (Recipe.from_yaml(path) or Recipe.from_dict(d)); got str"),
    (lambda: ec.compress(None, RECIPE, workdir=1), f"compress(): workdir must be {PATH} or None; got int"),
    (lambda: ec.search(NET, "space.yaml"), f"search(): task must be {TASK_OR_NONE}; got Linear"),
    (lambda: ec.search(None, 3), "search(): recipe must be a recipe file's path, its dict or a search.Space; got int"),
    (lambda: ec.search(None, {}, out=0), f"search(): out must be {PATH} or None; got int"),
    (lambda: ec.load(3), f"load(): path must be {PATH}; got int"),
    (lambda: export_onnx("model.pt", X, "m.onnx"), "export_onnx(): model must be a torch.nn.Module; got str"),
    (lambda: export_onnx(NET, [0.0] * 4, "m.onnx"), "export_onnx(): example_input must be a torch.Tensor; got list"),
    (lambda: export_onnx(NET, X, None), f"export_onnx(): path must be {PATH}; got NoneType"),
    (lambda: export_tensorrt(NET, X.numpy(), "m.onnx"),
     "export_tensorrt(): example_input must be a torch.Tensor; got ndarray"),
    (lambda: export_pte({"fc": NET}, X, "m.pte"), "export_pte(): model must be a torch.nn.Module; got dict"),
    (lambda: export_tvm(NET, X, 7), f"tvm.export_model(): out_dir must be {PATH}; got int"),
    (lambda: export_tflite(NET, 3, "m.tflite"), f"tflite.export_model(): task must be {TASK}; got int"),
    (lambda: export_tflite(NET, "digits-lenet300", 3), f"tflite.export_model(): path must be {PATH}; got int"),
    (lambda: export_c(None, "digits-lenet300", "out"),
     "c.export_model(): model must be a torch.nn.Module; got NoneType"),
    (lambda: export_c(NET, tiny_task().model, "out"), f"c.export_model(): task must be {TASK}; got Linear"),
    (lambda: RESULT.export_onnx(3), f"Result.export_onnx(): path must be {PATH}; got int"),
    (lambda: RESULT.save(None), f"Result.save(): path must be {PATH}; got NoneType"),
    (lambda: RESULT.export_tflite(3), f"Result.export_tflite(): path must be {PATH}; got int"),
    (lambda: RESULT.export_c(3), f"Result.export_c(): out_dir must be {PATH}; got int"),
    (lambda: RESULT.export_tensorrt(3), f"Result.export_tensorrt(): path must be {PATH}; got int"),
    (lambda: RESULT.export_tvm(3), f"Result.export_tvm(): out_dir must be {PATH}; got int"),
    (lambda: RESULT.export_pte(3), f"Result.export_pte(): path must be {PATH}; got int"),
]


@pytest.mark.parametrize("call, message", WRONG, ids=[m.split(" must")[0] for _, m in WRONG])
def test_a_wrong_type_is_one_type_error_naming_the_parameter(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as e:
        call()
    assert f"{type(e.value).__name__}: {e.value}" == f"TypeError: {message}"
    assert list(tmp_path.iterdir()) == []


def test_measure_takes_a_task_name_and_a_missing_file_first(tmp_path, task):
    t = task("digits-lenet300")
    with pytest.raises(ec.ArtifactError) as e:
        ec.measure(tmp_path / "model.onnx", "digits-lenet300")
    assert str(e.value) == f"{tmp_path / 'model.onnx'}: no such file"
    path = export_onnx(t.model, t.example_input, tmp_path / "model.onnx")
    by_name = ec.measure(path, "digits-lenet300", latency=False)
    by_task = ec.measure(path, t, latency=False)
    assert by_name.to_dict() == by_task.to_dict()
    assert by_name.metric_name == "accuracy" and by_name.metric >= 0.95  # the baseline scores 0.969
    assert by_name.params == 266_610


def test_exporters_and_compress_take_a_task_name(tmp_path, task):
    t = task("digits-lenet300")
    a = export_tflite(t.model, "digits-lenet300", tmp_path / "a.tflite")
    b = export_tflite(t.model, t, tmp_path / "b.tflite")
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 200_000
    ca = export_c(t.model, "digits-lenet300", tmp_path / "ca")
    cb = export_c(t.model, t, tmp_path / "cb")
    assert (ca.dir / "model.c").read_text() == (cb.dir / "model.c").read_text()
    r = ec.compress("digits-lenet300", RECIPE)
    assert r.task.name == "digits-lenet300"
    assert r.report.final.nonzero_params < 0.51 * r.report.final.params


# ---- a metric's change in its own units ------------------------------------------------------------------

def neg_mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return -float((outputs.squeeze(1) - targets).abs().mean())


def metrics(metric: float, name: str) -> Metrics:
    return Metrics(params=100, nonzero_params=100, dense_bytes=400, stored_bytes=400, artifact="onnx", macs=100,
                   metric=metric, metric_name=name)


def lost(r: Report) -> str:
    return re.search(r'What was lost</div><div class="big">([^<]*)<', headline(r)).group(1)


def test_change_is_in_points_only_for_fractions():
    assert change_text("accuracy", -0.005) == "-0.50 pt"
    assert change_text("cosine", 0.0123) == "+1.23 pt"  # the minilm-embed task's metric
    assert change_text("neg_mae", 0.0379) == "+0.0379"
    assert change_text("metric", -1.25) == "-1.2500"


def test_a_non_fraction_metric_reads_in_its_own_units():
    r = Report("custom", [Row("baseline", "baseline", metrics(-0.6623, "neg_mae")),
                          Row("1. prune", "prune", metrics(-0.6244, "neg_mae"))], {"max_metric_drop": 0.05})
    head, rows = r.table()
    assert head[1] == "neg_mae (change)"
    assert [row[1] for row in rows] == ["-0.6623 (+0.0000)", "-0.6244 (+0.0379)"]
    assert lost(r) == "nothing: neg_mae +0.0379"
    page = html.unescape(to_html(r))
    assert "-0.6623 \u2192 -0.6244 on held-out data (allowed drop 0.05)" in page
    assert "<td>-0.6244 (+0.0379)</td>" in page.replace(' class="num"', "")
    assert " pt" not in page and "points" not in page
    assert json.loads(r.to_json())["rows"][1]["ratios"]["metric_change"] == pytest.approx(0.0379, abs=1e-12)
    r.rows[1].metrics.metric = -0.7
    assert lost(r) == "neg_mae \u22120.0377"


def test_a_callable_metric_of_a_user_task_is_reported_in_its_units(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    t = ec.Task(model=model, train_data=(x, y), eval_data=(x, y), metric=neg_mae)
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}], "measure": {"latency": False}})
    report = ec.compress(t, recipe).report
    base, final = report.baseline.metric, report.final.metric
    assert report.final.metric_name == "neg_mae" and base < 0 and final != base
    cell = f"{final:.4f} ({final - base:+.4f})"
    assert report.table()[1][1][1] == cell
    assert f"| {cell} |" in report.to_markdown()
    page = html.unescape(to_html(report))
    assert cell in page and " pt)" not in page
    number = f"{final - base:+.4f}".replace("-", "\u2212")
    assert f"neg_mae {number}<" in page
    d = json.loads(report.to_json())
    assert d["rows"][1]["metrics"]["metric_name"] == "neg_mae"
    assert d["rows"][1]["ratios"]["metric_change"] == final - base


# ---- torchvision in a user's factory ---------------------------------------------------------------------

def python(code: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)} if path is not None else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_plain_import_torchvision_works_after_edgecompress():
    r = python("import edgecompress, torchvision; print(torchvision.models.resnet18(weights=None).fc.out_features)")
    assert (r.returncode, r.stdout, r.stderr) == (0, "1000\n", "")
    r = python("import sys, edgecompress; print('torchvision' in sys.modules)")  # not imported until asked for
    assert (r.returncode, r.stdout, r.stderr) == (0, "False\n", "")


def test_a_factory_importing_torchvision_loads(tmp_path):
    (tmp_path / "tvtask.py").write_text(
        "import torch\nimport torchvision\nimport edgecompress as ec\n\n\n"
        "def make():\n"
        "    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)\n"
        "    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()\n"
        "    return ec.Task(model=model, train_data=(x, y), eval_data=(x, y))\n")
    r = python("from edgecompress.zoo import load_task\nt = load_task('tvtask:make')\n"
               "print(type(t.model).__name__, t.name, t.model(t.example_input).shape[1])", tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "MobileNetV3 tvtask:make 10\n", "")


def test_a_torchvision_that_still_cannot_load_says_what_to_do(tmp_path):
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::roi_align does not exist')\n")
    (tmp_path / "tvtask.py").write_text("import torchvision\n\n\ndef make():\n    pass\n")
    r = python("import sys, torch, edgecompress\ntry:\n    import torchvision\nexcept ImportError as e:\n"
               "    print(torch.__version__, e, sep='\\n')\n"
               "from edgecompress.zoo import load_task\nload_task('tvtask:make')", tmp_path)
    version, message = r.stdout.splitlines()
    assert message == (f"torchvision cannot load beside torch {version} (operator torchvision::roi_align does not "
                       "exist); install the CPU torchvision build made for this torch (from PyTorch's CPU wheel "
                       "index)")
    assert r.stderr.strip().splitlines()[-1] == f"edgecompress.errors.RecipeError: task 'tvtask:make' cannot be " \
                                                f"imported: {message}"
