"""The command line as a user meets it: exit codes, one-line errors, nothing partial left behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """version: 1
task: digits-lenet300
stages:
  - stage: prune
    sparsity: {sparsity}
    finetune: {{epochs: {epochs}}}
constraints: {{max_metric_drop: {drop}}}
measure: {{repeats: 3, batches: [1, 8]}}
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecompress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def recipe(tmp_path: Path, sparsity=0.5, epochs=0, drop=0.05, text: str | None = None) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text if text is not None else RECIPE.format(sparsity=sparsity, epochs=epochs, drop=drop))
    return p


def test_run_json_prints_only_the_report_and_writes_files(tmp_path, task):
    task("digits-lenet300")
    out = tmp_path / "out"
    r = cli("run", str(recipe(tmp_path)), "-o", str(out), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [row["label"] for row in report["rows"]] == ["baseline", "1. prune"]
    assert report["rows"][1]["metrics"]["nonzero_params"] < report["rows"][0]["metrics"]["nonzero_params"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == report


def test_missed_constraint_exits_1_with_the_report_written(tmp_path, task):
    task("digits-lenet300")
    out = tmp_path / "out"
    r = cli("run", str(recipe(tmp_path, sparsity=0.995, drop=0.0)), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 1
    assert "constraint missed: accuracy dropped" in r.stderr
    assert (out / "report.json").exists()


BAD = {
    "unknown stage": ("stages:\n  - stage: shrink\n", "r.yaml: stages[0].stage must be one of "),
    "sparsity 1.5": ("stages:\n  - stage: prune\n    sparsity: 1.5\n", "r.yaml: stages[0].sparsity must be < 1.0; got 1.5"),
    "unknown key": ("stages:\n  - stage: prune\n    sparsity: 0.5\n    sparsty: 0.9\n",
                    "r.yaml: stages[0].sparsty is not a known key (a prune stage takes: "),
    "malformed yaml": ("stages: [\n", "r.yaml: malformed YAML"),
    "unknown task": ("task: digits-lenet400\nstages:\n  - stage: prune\n    sparsity: 0.5\n",
                     "task must be a built-in task ("),
    "pattern matches nothing": ("task: digits-lenet300\nstages:\n  - stage: prune\n    sparsity: 0.5\n"
                                "    layers: ['re:conv.*']\n",
                                "stages[0].layers[0] matches no layer; got 're:conv.*' (layers: fc1, fc2, fc3)"),
}


def assert_one_line_error(r: subprocess.CompletedProcess, start: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: " + start), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_gives_one_line_and_exit_2(tmp_path, case, task):
    text, start = BAD[case]
    out = tmp_path / "out"
    recipe(tmp_path, text=text)
    r = cli("run", "r.yaml", "-o", str(out), cwd=tmp_path)
    assert_one_line_error(r, start)
    assert not out.exists(), "no partial output"


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(cli("run", "missing.yaml", cwd=tmp_path), "missing.yaml: no such recipe file")


def test_eval_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("hello")
    before = bad.read_bytes()
    r = cli("eval", str(bad), "--task", "digits-lenet300", cwd=tmp_path)
    assert_one_line_error(r, f"{bad} is not an ONNX model")
    assert bad.read_bytes() == before


def test_eval_measures_an_exported_model(tmp_path, task):
    import edgecompress as ec

    t = task("digits-lenet300")
    out = tmp_path / "out"
    assert cli("run", str(recipe(tmp_path)), "-o", str(out), "--json", cwd=tmp_path).returncode == 0
    r = cli("eval", str(out / "model.onnx"), "--task", "digits-lenet300", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    report = json.loads((out / "report.json").read_text())
    assert m["stored_bytes"] == (out / "model.onnx").stat().st_size
    # `eval` scores the file in ONNX Runtime, as measure does for a file: the same number exactly
    assert m["metric"] == ec.measure(out / "model.onnx", t, latency=False).metric
    # the report scored the torch model that file came from: another backend, so on any machine's weights
    # a near-tie may flip one argmax; within one test sample
    n = sum(len(y) for _, y in t.eval_data)
    assert abs(m["metric"] - report["rows"][-1]["metrics"]["metric"]) <= 1 / n + 1e-9


def test_help_for_every_command(tmp_path):
    for cmd in ("demo", "run", "eval"):
        r = cli(cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "Usage" in r.stdout


def test_an_export_that_cannot_handle_a_layer_leaves_nothing_behind(tmp_path):
    (tmp_path / "mytask.py").write_text(
        "import torch\nfrom torch import nn\nimport edgecompress as ec\n\n\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.rand(64, 8, generator=g)\n"
        "    y = (x.sum(1) > 4).long()\n"
        "    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))\n"
        "    return ec.Task(model=model, train_data=(x, y), eval_data=(x, y))\n")
    recipe(tmp_path, text="task: mytask:make\nstages:\n  - stage: prune\n    sparsity: 0.5\n"
                          "export: [onnx, c]\nmeasure: {latency: false}\n")
    r = cli("run", "r.yaml", "-o", "out", cwd=tmp_path)
    assert_one_line_error(r, "export c: layer '1' (GELU) is not supported; supported: Conv1d, Conv2d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mytask.py", "r.yaml"]
