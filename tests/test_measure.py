import pytest
import torch

import edgecompress as ec
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.measure import compare_latency


def test_measure_torch_model_counts_exactly(task):
    t = task("digits-lenet300")
    m = ec.measure(t.model, t, batches=(1, 8), repeats=5)
    assert (m.params, m.nonzero_params, m.dense_bytes) == (266_610, 266_610, 1_066_440)
    assert m.macs == 784 * 300 + 300 * 100 + 100 * 10
    assert sorted(m.latency_ms) == ["b1", "b8"] and all(v > 0 for v in m.latency_ms.values())
    assert m.max_abs_diff < 1e-4
    assert 1_066_440 < m.stored_bytes < 1_070_000  # the ONNX file: weights plus a small graph


def test_measure_onnx_path_matches_torch(task, tmp_path):
    t = task("digits-lenet5")
    path = export_onnx(t.model, t.example_input, tmp_path / "m.onnx")
    from_file = ec.measure(path, t, latency=False)
    from_model = ec.measure(t.model, t, latency=False)
    assert from_file.stored_bytes == path.stat().st_size
    assert from_file.macs == from_model.macs == 2_293_000
    assert from_file.params == from_model.params == 431_080
    assert from_file.metric == pytest.approx(from_model.metric, abs=1 / 360)


def test_not_onnx_is_an_artifact_error(task, tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf at all \xff\xfe")
    with pytest.raises(ec.ArtifactError) as e:
        ec.measure(bad, task("digits-lenet300"), latency=False)
    assert str(e.value).startswith(f"{bad} is not an ONNX model")


def test_export_onnx_runs_in_onnxruntime_within_1e4(task, tmp_path):
    for name in ("digits-lenet300", "digits-lenet5", "mnist1d-cnn"):
        t = task(name)
        path = export_onnx(t.model, t.example_input, tmp_path / f"{name}.onnx")
        import onnx
        proto = onnx.load(str(path))
        assert proto.opset_import[0].version >= 17
        x = torch.cat([x for x, _ in t.eval_data])
        with torch.no_grad():
            ref = t.model(x)
        assert (run(session(path), x) - ref).abs().max().item() < 1e-4


def test_failed_export_leaves_no_file(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        export_onnx(Broken(), torch.zeros(1, 3), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_compare_latency_gives_one_median_per_model_and_batch(task, tmp_path):
    t = task("digits-lenet300")
    p = export_onnx(t.model, t.example_input, tmp_path / "a.onnx")
    lat = compare_latency([p, p], t.example_input, batches=(1, 4), repeats=7)
    assert [sorted(x) for x in lat] == [["b1", "b4"], ["b1", "b4"]]
