"""minilm-embed: the pretrained MiniLM from the optional extra, quantized and run by ONNX Runtime.
Skipped only when the ``transformers`` extra is not installed. Latency at batch 8 and the peers'
accuracy are measured by ``python -m bench.quantize``."""
from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch

from edgecompress.context import Context
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.export.onnx_quant import optimized_ops, quant_params
from edgecompress.task import predict
from edgecompress.techniques import TECHNIQUES
from edgecompress.primitives.qlayer import tensor_specs
from edgecompress.techniques.quantize import QuantizeSpec
from edgecompress.zoo import minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="the transformers extra is not installed")


@pytest.fixture(scope="module")
def mtask():
    return minilm.task(n_calib=16, n_eval=48)  # 32 calibration texts (2 batches), 96 held-out


@pytest.fixture(scope="module")
def fp32_onnx(mtask, tmp_path_factory):
    return export_onnx(mtask.model, mtask.example_input, tmp_path_factory.mktemp("minilm") / "f.onnx")


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


def test_dynamic_int8_cosine_and_ort(mtask, fp32_onnx, tmp_path):
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
    # every scale and zero point in the file is a spec's (float16-exact weight scales stored as float16,
    # an all-zero zero point as one scalar zero), and every spec's is in the file but the pooler's (the
    # embedding does not use BERT's pooler, so the export drops it)
    def same(spec, s, z):
        want_s, want_z = spec.scale.numpy(), spec.zero_point.numpy()
        return s is not None and s.astype(np.float32).tobytes() == want_s.tobytes() \
            and np.array_equal(np.broadcast_to(z.astype(np.int32), want_z.shape), want_z)

    in_file = [(s, z) for _, s, z in quant_params(path)]
    specs = tensor_specs(q)
    assert len(in_file) == 36 + 2
    assert all(any(same(spec, s, z) for spec in specs.values()) for s, z in in_file)
    assert [k for k, spec in specs.items() if not any(same(spec, s, z) for s, z in in_file)] == ["bert.pooler.dense.weight"]
    # no larger than onnxruntime.quantization.quantize_dynamic's file of the same model
    from onnxruntime.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32_onnx), str(tmp_path / "ort.onnx"))
    assert path.stat().st_size <= (tmp_path / "ort.onnx").stat().st_size


def test_int4_weight_only_file_and_cosine(mtask, fp32_onnx, tmp_path):
    # recipes/minilm-int4.yaml: GPTQ rounding with MSE-searched group scales
    q, ctx = _quantize(mtask, mode="weight_only", bits=4, granularity="group", group_size=32, rounding="gptq",
                       observer="mse", calib_batches=2)
    assert ctx.log.touched["bert.embeddings.word_embeddings"].startswith("embedding int8 sym per-channel")
    assert ctx.log.touched["bert.encoder.layer.0.output.dense"] == ("weight_only: weight int4 sym per-group(32), "
                                                                   "GPTQ rounding, MSE-searched weight scales")
    path = export_onnx(q, mtask.example_input, tmp_path / "q4.onnx")
    assert path.stat().st_size <= 0.30 * fp32_onnx.stat().st_size
    assert optimized_ops(path)["MatMulNBits"] == 36
    xs = torch.cat([x for x, _ in mtask.eval_data])
    ort = run(session(path), xs, batch_size=16)
    tgt = torch.cat([y for _, y in mtask.eval_data])
    with torch.no_grad():  # the torch simulation agrees with ONNX Runtime (one batch is enough to show it)
        assert float((ort[:16] - q(xs[:16])).abs().max()) < 1e-4
    assert minilm.cosine(ort, tgt) >= 0.98


def test_distillation_split_is_disjoint_from_held_out():
    # recipes/minilm-small.yaml fine-tunes on minilm.distillation_task(): 32 calibration pairs, 48 held-out
    # pairs as task(), and every other corpus text plus the methods' docstrings to distil from
    calib, ev, texts = minilm.split(32, 48)
    assert (len(calib), len(ev)) == (32, 48) and (calib, ev) == (minilm.corpus()[:32], minilm.corpus()[32:80])
    assert len(texts) == len(set(texts)) >= 2000
    assert texts == minilm.split(32, 48)[2] and minilm.distill_texts() == minilm.distill_texts.__wrapped__()
    if sys.version_info[:2] == (3, 11):  # the docstrings of CPython 3.11's standard library
        assert (len(minilm.corpus()), len(minilm.distill_texts()), len(texts)) == (513, 1548, 2389)
    held = [t for p in ev for t in p]
    assert not any(t in h or h in t for t in texts for h in held)
    assert not {t for p in calib for t in p} & set(held)
    # the other pairs' texts are all there but those that share text with a held-out one (7)
    rest = {t for p in minilm.corpus()[80:] for t in p}
    assert {t for t in rest if not any(t in h or h in t for h in held)} <= set(texts)
    assert len(rest - set(texts)) == 7 or sys.version_info[:2] != (3, 11)


def test_distillation_task_targets_are_lazy(mtask):
    t = minilm.task(n_calib=16, n_eval=48, distill=True)  # distillation_task() is task(distill=True)
    data = t.train_data.dataset
    assert isinstance(data, minilm.LazyTargets) and len(data) == 32 + len(minilm.split(16, 48)[2])
    assert data._targets is None  # nothing embedded until a fine-tune reads it
    assert torch.equal(t.val_data.dataset.tensors[0], data.ids[:32])
    assert torch.equal(t.eval_data.dataset.tensors[0], mtask.eval_data.dataset.tensors[0])
    few = minilm.LazyTargets(t.model, data.ids[32:36])
    x, y = few[1]
    with torch.no_grad():
        assert torch.equal(x, data.ids[33]) and torch.allclose(y, t.model(data.ids[33:34])[0], atol=1e-5)
    assert len(mtask.train_data.dataset) == 32  # task() alone fine-tunes on the calibration texts
