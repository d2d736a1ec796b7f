"""A fast slice of the conformance matrix (``python -m bench.conformance`` runs all of it): models
written as users write them — attention on nn.MultiheadAttention and nn.TransformerEncoderLayer, a
concatenation net with squeeze-excitation and a grouped conv — with random weights and tiny data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import edgecompress as ec
from bench.conformance import run_cell
from edgecompress.primitives.attention import Attention, explicit_attention
from edgecompress.task import Task
from edgecompress.zoo import architectures as A

ROOT = Path(__file__).resolve().parents[1]


def _tiny(model_cls, n_train: int = 64, n_eval: int = 32) -> Task:
    (xtr, ytr), (xv, yv), (xt, yt) = A._images(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls().eval()
    return Task(model=model, train_data=(xtr[:n_train], ytr[:n_train]), val_data=(xv[:32], yv[:32]),
                eval_data=(xt[:n_eval], yt[:n_eval]), batch_size=32, name=model_cls.__name__)


def tiny_vit() -> Task:
    """A factory for the command line (``--task tests.test_conformance:tiny_vit``)."""
    return _tiny(A.PatchViT)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_equals_multihead_attention_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[:, -2:] = True
    mask = torch.randn(5, 7)
    holder = nn.Module()
    holder.attn = mha
    ref_out, ref_w = mha(q, kv, kv, key_padding_mask=pad, attn_mask=mask)
    assert explicit_attention(holder) == ["attn"]
    assert isinstance(holder.attn, Attention)
    out, w = holder.attn(q, kv, kv, key_padding_mask=pad, attn_mask=mask)
    assert (out - ref_out).abs().max() <= 1e-5
    assert (w - ref_w).abs().max() <= 1e-5


@pytest.mark.parametrize("model_cls", [A.PatchViT, A.EncoderClassifier])
def test_vit_and_encoder_layer_unchanged_by_the_split(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert len(explicit_attention(model)) == 2
        assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        assert (model(x) - ref).abs().max() <= 1e-5


def _report_row(task: Task, stage: dict):
    result = ec.compress(task, ec.Recipe.from_dict({"stages": [stage], "measure": {"latency": False}}))
    return result, result.report.rows[-1]


def test_static_int8_vit_runs_projections_as_integer_kernels():
    task = _tiny(A.PatchViT)
    result, row = _report_row(task, {"stage": "quantize", "mode": "static", "keep_slow_float": False,
                                     "calib_batches": 1})
    for block in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert row.touched[f"blocks.{block}.attn.{proj}"].startswith("static: weight int7")
    kernels = next(n for n in row.notes if n.startswith("ONNX Runtime integer kernels"))
    assert "MatMulIntegerToFloat x" in kernels and "QLinearAdd x4" in kernels
    assert row.metrics.max_abs_diff < 0.05  # torch simulation vs ONNX Runtime's integer kernels


def test_dynamic_int8_encoder_layer_quantizes_every_projection():
    task = _tiny(A.EncoderClassifier)
    result, row = _report_row(task, {"stage": "quantize", "mode": "dynamic"})
    touched = [n for n in row.touched if ".self_attn." in n]
    assert len(touched) == 8  # q, k, v, out of two layers
    kernels = next(n for n in row.notes if n.startswith("ONNX Runtime integer kernels"))
    assert "DynamicQuantizeMatMul" in kernels or "MatMulIntegerToFloat" in kernels


def test_lowrank_svd_of_attention_projections_keeps_the_attention_working():
    task = _tiny(A.PatchViT)
    result, row = _report_row(task, {"stage": "lowrank", "method": "svd", "ratio": 0.25,
                                     "finetune": {"epochs": 1, "distill": {}}})
    assert row.touched["blocks.0.attn.out_proj"].startswith("svd rank 16")
    assert isinstance(result.model.get_submodule("blocks.0.attn.out_proj"), nn.Sequential)
    assert row.metrics.max_abs_diff < 1e-4


def test_channel_pruning_removes_whole_heads():
    task = _tiny(A.PatchViT)
    result, row = _report_row(task, {"stage": "prune", "granularity": "channel", "sparsity": 0.3})
    heads = [m.num_heads for m in result.model.modules() if isinstance(m, Attention)]
    assert heads == [3, 2]
    for m in result.model.modules():
        if isinstance(m, Attention):
            assert m.q_proj.out_features == m.k_proj.out_features == m.v_proj.out_features == 16 * m.num_heads
            assert m.out_proj.in_features == 16 * m.num_heads
    assert "blocks.1.attn: attention heads 4 -> 2 (head width 16)" in row.notes
    assert row.metrics.max_abs_diff < 1e-4


def test_block_pruning_removes_a_layer_of_a_transformer_encoder():
    """The encoder's layers are the candidates (not the encoder as one block); a removed layer leaves
    the ModuleList, which nn.TransformerEncoder loops over (an identity there would break its forward)."""
    task = _tiny(A.EncoderClassifier)
    result, row = _report_row(task, {"stage": "prune", "granularity": "block", "sparsity": 0.5})
    assert set(row.touched) | set(row.skipped) == {"encoder.layers.0", "encoder.layers.1"}
    (removed,) = row.touched
    assert row.touched[removed].startswith("removed from its layer list (calibration loss ")
    assert len(result.model.encoder.layers) == 1
    assert row.metrics.max_abs_diff < 1e-4


class _GroupedOnly(nn.Module):
    """A grouped conv and the classifier: nothing tucker2 may factor."""

    def __init__(self):
        super().__init__()
        self.g, self.fc = nn.Conv2d(4, 8, 3, groups=4), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.g(x.repeat(1, 4, 1, 1)).mean((2, 3)))


def test_bench_cell_reports_unsupported_with_the_reason():
    cell = run_cell("tiny", "lowrank tucker2", epochs=0, task=_tiny(_GroupedOnly))
    assert cell.status == "unsupported"
    assert cell.detail == ("lowrank tucker2 changed no layer: fc (Linear): the model's output layer is left whole "
                           "(name it in layers, or keep_output: false, to include it); g (Conv2d): grouped "
                           "convolution (groups=4): tucker2 needs groups=1")


def test_tucker2_and_cp_factor_the_linear_layers_of_an_encoder_by_svd():
    """A matrix's Tucker-2 and CP are its truncated SVD: the encoder's Linear layers are factored."""
    for column in ("lowrank tucker2", "lowrank cp"):
        cell = run_cell("tiny", column, epochs=0, task=_tiny(A.EncoderClassifier))
        assert cell.status == "works", cell.detail
        assert float(cell.detail.removeprefix("ORT rel diff ")) <= 1e-4


def test_cli_unsupported_export_is_one_line_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - stage: quantize\n    keep_slow_float: false\n    calib_batches: 1\n"
                      "export: [tflite]\nmeasure: {latency: false}\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edgecompress", "run", str(recipe), "--task",
                        "tests.test_conformance:tiny_vit", "-o", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%" not in ln and "fine-tune" not in ln]
    assert lines[-1].startswith("error: export tflite: layer 'blocks.0.norm1' (LayerNorm) is not supported; "
                                "supported:")
    assert "Traceback" not in r.stderr
    assert not out.exists()


def _tiny_bert() -> Task:
    """A 2-layer BERT (hidden 64, 4 heads) under minilm-embed's sentence-embedding head, random weights."""
    pytest.importorskip("transformers")
    from edgecompress.zoo.minilm import SentenceEmbedder, _embed, _torchvision_for_transformers, cosine, cosine_loss

    _torchvision_for_transformers()
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, attn_implementation="eager")
        model = SentenceEmbedder(BertModel(cfg)).eval()
        ids = torch.randint(1, 100, (48, 16))
    y = _embed(model, ids)
    return Task(model=model, train_data=(ids[:32], y[:32]), val_data=(ids[:16], y[:16]), eval_data=(ids[32:], y[32:]),
                metric=cosine, example_input=ids[:1], loss=cosine_loss, name="tiny-bert", batch_size=16)


def test_channel_pruning_of_bert_removes_heads_and_keeps_the_embedding_width():
    result, row = _report_row(_tiny_bert(), {"stage": "prune", "granularity": "channel", "sparsity": 0.5})
    assert "bert.encoder.layer.1.attention.self: attention heads 4 -> 2 (head width 16)" in row.notes
    attn = result.model.bert.encoder.layer[1].attention.self
    assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 32, 32)
    layer = result.model.bert.encoder.layer[0]  # the residual stream (the embedding) keeps 64; the FFN shrinks
    assert (layer.output.dense.out_features, layer.attention.output.dense.out_features) == (64, 64)
    assert layer.intermediate.dense.out_features < 128 and result.report.final.params < result.report.baseline.params
    assert row.metrics.max_abs_diff < 1e-4  # ONNX Runtime runs the pruned model as torch does


def test_block_pruning_drops_a_bert_layer_from_its_list():
    result, row = _report_row(_tiny_bert(), {"stage": "prune", "granularity": "block", "sparsity": 0.5})
    assert len(result.model.bert.encoder.layer) == 1
    assert any(v.startswith("removed from its layer list") for v in row.touched.values())
    assert row.metrics.max_abs_diff < 1e-4


class _ResNetStyle(nn.Module):
    """Convs and batch norms as attributes, called in forward (torchvision's ResNet writes it so)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.fc = (F.relu if functional else nn.ReLU()), nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _ResNetStyleFunctional(_ResNetStyle):
    """The same with ``F.relu`` in the forward: the conv before it still ends in its own ReLU."""

    def __init__(self):
        super().__init__(functional=True)


@pytest.mark.parametrize("model_cls", [_ResNetStyle, _ResNetStyleFunctional], ids=["nn.ReLU", "F.relu"])
def test_static_int8_folds_batch_norms_called_in_forward_and_runs_every_conv_as_an_integer_kernel(model_cls):
    task = _tiny(model_cls)
    with torch.no_grad():
        for bn in (task.model.bn1, task.model.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.3, 0.3)
    result, row = _report_row(task, {"stage": "quantize", "mode": "static", "keep_slow_float": False})
    assert {"bn1 folded into conv1", "bn2 folded into conv2"} <= set(row.notes)
    assert isinstance(result.model.bn1, nn.Identity) and isinstance(result.model.bn2, nn.Identity)
    kernels = next(n for n in row.notes if n.startswith("ONNX Runtime integer kernels"))
    assert "QLinearConv x2" in kernels and kernels.endswith("float matmul/conv kernels left: none")


def test_held_out_is_every_digit_outside_the_training_and_validation_examples(monkeypatch):
    splits = A._images(1)
    monkeypatch.setitem(A._SPLITS, "digits", splits)
    xs, ys = A.held_out("digits")
    assert len(ys) == 1797 - 512 - 128 == 1157
    (xtr, _), (xv, _), (xt, yt) = splits
    assert torch.equal(xs[:256], xt[:256]) and torch.equal(ys[:256], yt[:256])  # the test split first
    seen = torch.cat([xtr[:512], xv[:128]]).flatten(1)
    held = xs.flatten(1)
    assert not any(bool((seen == h).all(1).any()) for h in held)  # no training or validation image in it
    assert len({tuple(h.tolist()) for h in held}) == len(held)  # and none twice


def test_lsq_keeps_the_grids_it_shares_with_concatenations_gates_and_pools():
    """Learned step sizes train only grids no ActQuant also uses: a layer reading the SE gate's product
    (or a pool reading a layer) stays on that grid, so ONNX Runtime runs every conv as QLinearConv."""
    from edgecompress.primitives.qlayer import ActQuant, quant_layers

    task = _tiny(A.DenseSENet)
    result, row = _report_row(task, {"stage": "quantize", "mode": "qat", "lsq": True, "keep_slow_float": False,
                                     "calib_batches": 1, "finetune": {"epochs": 2, "lr": 0.01}})
    mods = dict(result.model.named_modules())
    gate = next(m for n, m in mods.items() if isinstance(m, ActQuant) and n.endswith("mul_q"))
    assert torch.equal(quant_layers(result.model)["trans1.0"].in_scale, gate.scale)
    kernels = next(n for n in row.notes if n.startswith("ONNX Runtime integer kernels"))
    assert "QLinearConv x11" in kernels and kernels.endswith("float matmul/conv kernels left: none"), kernels
