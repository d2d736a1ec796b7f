"""minilm-embed: the pretrained MiniLM from the optional extra, quantized and run by ONNX Runtime.
Skipped only when the ``transformers`` extra is not installed. The full-size targets (int4 GPTQ
cosine, latency at batch 8) are measured by ``python -m bench.quantize``."""
from __future__ import annotations

import copy

import pytest
import torch

from edgecompress.context import Context
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.export.onnx_quant import optimized_ops
from edgecompress.task import predict
from edgecompress.techniques import TECHNIQUES
from edgecompress.techniques.quantize import QuantizeSpec
from edgecompress.zoo import minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="the transformers extra is not installed")


@pytest.fixture(scope="module")
def mtask():
    return minilm.task(n_calib=8, n_eval=16)


def _quantize(t, **kw):
    ctx = Context(task=t, seed=0, where="stages[0]")
    return TECHNIQUES["quantize"][1](copy.deepcopy(t.model), QuantizeSpec(**kw), ctx), ctx


def test_corpus_and_metric(mtask):
    pairs = minilm.corpus()
    assert len(pairs) >= 400 and pairs == minilm.corpus()
    x, y = next(iter(mtask.eval_data))
    assert x.shape[1] == 128 and y.shape[1] == 384
    out, tgt = predict(mtask.model, mtask.eval_data)
    assert mtask.metric_fn(out, tgt) == pytest.approx(1.0, abs=1e-6)
    assert minilm.retrieval_agreement(out, tgt) == 1.0


def test_dynamic_int8_cosine_and_ort(mtask, tmp_path):
    q, ctx = _quantize(mtask, mode="dynamic")
    out, tgt = predict(q, mtask.eval_data)
    assert mtask.metric_fn(out, tgt) >= 0.99
    assert minilm.retrieval_agreement(out, tgt) >= 0.9
    assert any(n.startswith("dynamic int8 runs") for n in ctx.log.notes)
    path = export_onnx(q, mtask.example_input, tmp_path / "q.onnx")
    ops = optimized_ops(path)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulInteger"] == 36
    ort = run(session(path), torch.cat([x for x, _ in mtask.eval_data]), batch_size=16)
    assert minilm.cosine(ort, tgt) >= 0.99


def test_int4_weight_only_file_and_cosine(mtask, tmp_path):
    q, ctx = _quantize(mtask, mode="weight_only", bits=4, granularity="group", group_size=32)
    assert ctx.log.touched["bert.embeddings.word_embeddings"].startswith("embedding int8 sym per-channel")
    path = export_onnx(q, mtask.example_input, tmp_path / "q4.onnx")
    ref = export_onnx(mtask.model, mtask.example_input, tmp_path / "f.onnx")
    assert path.stat().st_size <= 0.30 * ref.stat().st_size
    assert optimized_ops(path)["MatMulNBits"] == 36
    xs = torch.cat([x for x, _ in mtask.eval_data])
    ort = run(session(path), xs, batch_size=16)
    sim, tgt = predict(q, mtask.eval_data)
    assert float((ort - sim).abs().max()) < 1e-4
    assert minilm.cosine(ort, tgt) >= 0.95
