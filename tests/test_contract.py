"""Every technique in the table passes the same contract (see contract.py)."""
from __future__ import annotations

import hashlib

import pytest
import torch
import yaml

import edgecompress as ec
from edgecompress.techniques import TECHNIQUES

from .contract import EXAMPLES

VARIANTS = [(stage, t, spec) for stage, ex in EXAMPLES.items() for t, spec in ex["variants"]]
IDS = [f"{stage}-{i}" for i, (stage, _, _) in enumerate(VARIANTS)]
DETERMINISTIC = ["params", "nonzero_params", "dense_bytes", "stored_bytes", "macs", "metric"]


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_every_technique_has_examples():
    assert sorted(TECHNIQUES) == sorted(EXAMPLES)


@pytest.mark.parametrize("stage,task_name,spec", VARIANTS, ids=IDS)
def test_spec_round_trips_through_yaml(stage, task_name, spec):
    cls = TECHNIQUES[stage][0]
    parsed = cls.model_validate(spec)
    again = cls.model_validate(yaml.safe_load(yaml.safe_dump(parsed.model_dump(mode="json"))))
    assert again == parsed


@pytest.mark.parametrize("stage", sorted(EXAMPLES))
def test_bad_field_gives_the_named_error(stage):
    bad, message = EXAMPLES[stage]["bad"]
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [bad]})
    assert str(e.value) == message


@pytest.mark.parametrize("stage,task_name,spec", VARIANTS, ids=IDS)
def test_pipeline_contract(task, stage, task_name, spec):
    t = task(task_name)
    before = digest(t.model)
    recipe = ec.Recipe.from_dict({"stages": [spec], "seed": 3, "measure": {"latency": False}})
    a = ec.compress(t, recipe)
    b = ec.compress(t, recipe)
    assert digest(t.model) == before, "the task's model was edited"
    assert digest(a.model) == digest(b.model), "the same seed gave different weights"
    row = a.report.rows[-1].metrics
    fresh = ec.measure(a.model, t, latency=False)
    for key in DETERMINISTIC:
        if key == "stored_bytes" and row.artifact != fresh.artifact:
            continue
        assert getattr(row, key) == getattr(fresh, key), key
