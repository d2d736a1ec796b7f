"""The cluster stage: shared weights stay shared, zeros stay zero, gradients are summed per cluster."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import edgecompress as ec
from edgecompress.techniques.cluster import Shared


def test_centroid_gradient_is_the_sum_over_its_cluster():
    layer = nn.Linear(3, 2, bias=False)
    index = torch.tensor([[0, 1, 2], [2, 1, 0]])  # slot 0 is the fixed zero
    centroids = torch.tensor([0.5, -1.0])
    parametrize.register_parametrization(layer, "weight", Shared(centroids, index, zero_slot=True), unsafe=True)
    assert torch.equal(layer.weight, torch.tensor([[0.0, 0.5, -1.0], [-1.0, 0.5, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    layer(x).sum().backward()
    grad_w = x.sum(0).expand(2, 3)  # d(sum(x W^T))/dW
    expected = torch.stack([grad_w[index == k].sum() for k in (1, 2)])
    assert torch.equal(layer.parametrizations.weight.original.grad, expected)


def test_prune_then_cluster_keeps_zeros_and_shares_weights(task):
    t = task("digits-lenet300")
    fast = {"seed": 1, "measure": {"latency": False}}
    pruned = ec.compress(t, ec.Recipe.from_dict({**fast, "stages": [
        {"stage": "prune", "sparsity": 0.9, "finetune": {"epochs": 1}}]})).model
    t2 = ec.Task(model=pruned, train_data=t.train_data, eval_data=t.eval_data, name="pruned")
    result = ec.compress(t2, ec.Recipe.from_dict({**fast, "stages": [
        {"stage": "cluster", "bits": 3, "layer_bits": {"fc3": 5}, "bias_bits": 4, "finetune": {"epochs": 2}}]}))
    before = dict(pruned.named_parameters())
    for name, p in result.model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(p == 0, before[name] == 0), name
        distinct = torch.unique(p[p != 0]).numel()
        limit = 2 ** 4 if name.endswith("bias") else 2 ** (5 if name.startswith("fc3") else 3)
        assert distinct <= limit, (name, distinct)
        assert torch.equal(p.half().float(), p), "shared values are float16 by default"
    base, row = result.report.rows[0].metrics, result.report.rows[-1].metrics
    assert row.nonzero_params <= base.nonzero_params
    assert row.metric >= base.metric - 0.02
    assert row.artifact == "ecz" and row.breakdown["indices"] > 0 and row.breakdown["positions"] > 0
    assert row.stored_bytes < base.stored_bytes / 3
    assert row.onnx_bytes > 1_000_000
    assert result.report.rows[-1].touched["fc3"].startswith("32 shared values (5 bits)")
