import hashlib

import torch

import edgecompress as ec


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


FAST = {"latency": False}


def test_input_model_unchanged_and_same_seed_same_weights(task):
    t = task("digits-lenet300")
    before = _digest(t.model)
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.8, "finetune": {"epochs": 1}}],
                                  "measure": FAST})
    a = ec.compress(t, recipe)
    b = ec.compress(t, recipe)
    assert _digest(t.model) == before
    assert _digest(a.model) == _digest(b.model)
    assert _digest(a.model) != before
