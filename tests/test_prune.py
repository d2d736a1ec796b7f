import copy
import json

import pytest
import torch
from torch import nn

import edgecompress as ec
from edgecompress.context import Context
from edgecompress.errors import RecipeError
from edgecompress.layers import weighted_layers
from edgecompress.primitives import saliency
from edgecompress.task import evaluate
from edgecompress.techniques.prune import depgraph as tpw
from edgecompress.techniques import prune
from edgecompress.techniques.prune.channels import prune_channels
from edgecompress.techniques.prune.unstructured import prune_unstructured

FAST = {"latency": False}


def run(task, workdir=None, **spec):
    """Prune every layer, the classifier too (its default exclusion is tested in test_user_input.py)."""
    spec.setdefault("keep_output", False)
    ctx = Context(task=task, seed=0, where="stages[0]", workdir=workdir)
    model = prune.apply(task.fresh_model(), prune.PruneSpec(**spec), ctx)
    return model, ctx


def zeros(model, name):
    return int((weighted_layers(model)[name].weight == 0).sum())


def numel(model, name):
    return weighted_layers(model)[name].weight.numel()


def refuse(stage: dict) -> str:
    with pytest.raises(RecipeError) as e:
        ec.Recipe.from_dict({"stages": [stage]})
    return str(e.value)


# ---- exact sparsity --------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "random"])
def test_global_sparsity_is_exact(task, criterion):
    t = task("digits-lenet300")
    model, ctx = run(t, sparsity=0.9, criterion=criterion, norm=2)
    total = sum(numel(model, n) for n in ("fc1", "fc2", "fc3"))
    assert sum(zeros(model, n) for n in ("fc1", "fc2", "fc3")) == round(0.9 * total)
    assert set(ctx.log.touched) == {"fc1", "fc2", "fc3"}


def test_layer_and_explicit_sparsity_exact_per_tensor(task):
    t = task("digits-lenet5")
    model, ctx = run(t, sparsity=0.5, scope="layer", per_layer={"fc1": 0.95, "re:conv.*": 0.3}, exclude=["fc2"])
    assert zeros(model, "fc1") == round(0.95 * numel(model, "fc1"))
    assert zeros(model, "conv1") == round(0.3 * numel(model, "conv1"))
    assert zeros(model, "conv2") == round(0.3 * numel(model, "conv2"))
    assert zeros(model, "fc2") == 0
    assert ctx.log.skipped == {"fc2": "excluded by the recipe"}


def test_balanced_rows_have_the_same_count(task):
    t = task("digits-lenet5")
    model, _ = run(t, sparsity=0.8, granularity="balanced", scope="layer")
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = weighted_layers(model)[name].weight.reshape(numel(model, name) // weighted_layers(model)[name].weight.shape[0], -1)
        kept = (weighted_layers(model)[name].weight != 0).reshape(weighted_layers(model)[name].weight.shape[0], -1).sum(1)
        assert kept.unique().numel() == 1, name
        assert int(kept[0]) == w.shape[0] - round(0.8 * w.shape[0])


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group(task, pattern):
    n, m = map(int, pattern.split(":"))
    t = task("digits-lenet5")
    model, ctx = run(t, granularity="nm", pattern=pattern)
    skipped = {"conv1": 1} if m == 4 else {"conv1": 1, "conv2": 20, "fc2": 500}
    assert ctx.log.skipped == {k: f"input size {v} is not a multiple of {m} ({pattern} needs whole groups)"
                               for k, v in skipped.items()}
    for name in {"conv2", "fc1", "fc2"} - set(skipped):
        w = weighted_layers(model)[name].weight
        assert saliency.nm_holds(w != 0, n, m), name
        assert int((w != 0).sum()) == w.numel() * n // m


def test_recurrent_weights_are_pruned_and_stay_zero_through_the_fine_tune(task):
    """GRU input and hidden matrices are masked like any weight; the classifier is left whole."""
    t = task("digits-gru")
    r = ec.compress(t, ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.6,
                                                        "finetune": {"epochs": 1}}], "measure": FAST}))
    rnn = r.model.rnn
    weights = [rnn.weight_ih_l0, rnn.weight_hh_l0]  # 192x28 and 192x64
    assert sum(int((w == 0).sum()) for w in weights) == round(0.6 * (192 * 28 + 192 * 64))
    row = r.report.rows[-1]
    assert set(row.touched) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} and "fc" in row.skipped
    assert r.report.final.metric >= r.report.baseline.metric - 0.03
    model, ctx = run(t, granularity="nm", pattern="2:4", layers=["rnn"])
    assert saliency.nm_holds(model.rnn.weight_hh_l0 != 0, 2, 4) and saliency.nm_holds(model.rnn.weight_ih_l0 != 0, 2, 4)
    assert set(ctx.log.touched) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}


def test_one_importance_ranks_single_weights_and_channels():
    """A criterion written once, as an Importance, serves the unstructured and the channel path."""
    class Smallest:  # keeps the smallest weights: magnitude reversed
        reads = "weights"

        def __call__(self, model, params, step=0):
            return {n: -p.detach().abs() for n, p in params.items()}

    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(4, 8))
    m.add_module("act", nn.ReLU())
    m.add_module("fc2", nn.Linear(8, 2))
    t = ec.Task(model=m, train_data=(torch.rand(8, 4), torch.zeros(8, dtype=torch.long)),
                eval_data=(torch.rand(8, 4), torch.zeros(8, dtype=torch.long)))
    ctx = Context(task=t, seed=0, where="stages[0]")
    single = prune_unstructured(copy.deepcopy(m), prune.PruneSpec(sparsity=0.5, keep_output=False), ctx, Smallest())
    before = torch.cat([m.fc1.weight.flatten(), m.fc2.weight.flatten()]).abs()
    after = torch.cat([single.fc1.weight.flatten(), single.fc2.weight.flatten()])
    assert int((after == 0).sum()) == 24  # half of 32 + 16, under one global threshold
    assert before[after == 0].min() > before[after != 0].max()
    spec = prune.PruneSpec(granularity="channel", sparsity=0.5, scope="layer", keep_output=False)
    channels = prune_channels(copy.deepcopy(m), spec, ctx, Smallest())
    # fc1's outputs and fc2's inputs are one group: a channel's score sums fc1's row and fc2's column
    kept = (m.fc1.weight.abs().sum(1) + m.fc2.weight.abs().sum(0)).argsort()[:4].sort().values
    assert torch.equal(channels.fc1.weight, m.fc1.weight[kept])
    assert torch.equal(channels.fc2.weight, m.fc2.weight[:, kept])


# ---- accuracy after fine-tune (issue 3 item 6) -----------------------------------------------


def test_lenet300_90_percent_global_loses_at_most_one_point(task):
    t = task("digits-lenet300")
    r = ec.compress(t, ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.9,
                                                         "finetune": {"epochs": 10}}], "measure": FAST}))
    base, final = r.report.baseline, r.report.final
    assert base.metric - final.metric <= 0.01
    assert final.nonzero_params == 266610 - round(0.9 * (266200 - 1000))  # fc3 (the classifier) left whole


def test_mnist1d_70_percent_loses_at_most_two_points(task):
    t = task("mnist1d-cnn")
    r = ec.compress(t, ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.7,
                                                         "finetune": {"epochs": 3}}], "measure": FAST}))
    assert r.report.baseline.metric - r.report.final.metric <= 0.02


def test_lenet300_95_percent_iterative_loses_at_most_half_a_point(task):
    """Issue 4's unstructured target: three prune steps with 10 epochs of fine-tune after each."""
    t = task("digits-lenet300")
    spec = {"stage": "prune", "sparsity": 0.95, "schedule": "iterative", "steps": 3, "finetune": {"epochs": 10}}
    r = ec.compress(t, ec.Recipe.from_dict({"stages": [spec], "measure": FAST}))
    assert r.report.baseline.metric - r.report.final.metric <= 0.005
    assert r.report.final.nonzero_params == 266610 - round(0.95 * (266200 - 1000))  # fc3 left whole


def test_mnist1d_90_percent_gradual_recipe_loses_at_most_two_points(task):
    """recipes/prune-90-mnist1d.yaml: where methods separate, gradual pruning over 40 epochs. From the
    converged baseline it loses 1.3 points (AVX2 kernels); the recipe allows 2."""
    from pathlib import Path

    recipe = ec.Recipe.from_yaml(Path(__file__).parents[1] / "recipes" / "prune-90-mnist1d.yaml")
    recipe.measure.latency = False
    r = ec.compress(task("mnist1d-cnn"), recipe)
    assert r.report.baseline.metric - r.report.final.metric <= 0.02
    assert r.report.violations == []
    assert r.report.final.nonzero_params < 0.11 * r.report.final.params


# ---- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["iterative", "gradual", "lottery"])
def test_schedules_reach_the_exact_sparsity(task, schedule):
    t = task("digits-lenet300")
    model, ctx = run(t, sparsity=0.8, schedule=schedule, steps=2, frequency=5,
                     finetune={"epochs": 1, "lr": 1e-3})
    total = sum(numel(model, n) for n in ("fc1", "fc2", "fc3"))
    assert sum(zeros(model, n) for n in ("fc1", "fc2", "fc3")) == round(0.8 * total)
    assert ctx.finetuned
    assert evaluate(model, t) > (0.75 if schedule == "lottery" else 0.85)  # lottery retrains from initialisation


def test_lottery_rewinds_survivors_to_the_baseline_initialisation(task):
    from edgecompress.zoo import BUILTINS

    t = task("digits-lenet300")
    model, ctx = run(t, sparsity=0.5, schedule="lottery", steps=1, finetune={"epochs": 0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTINS["digits-lenet300"].seed)
        init = BUILTINS["digits-lenet300"].build()
    w, w0 = model.fc1.weight, init.fc1.weight
    assert torch.equal(w[w != 0], w0[w != 0])
    assert ctx.log.notes == ["lottery ticket: survivors rewound to the baseline's initialisation (seed 0)"]


# ---- structured ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,spec", [
    ("digits-resnet8", {"sparsity": 0.5, "scope": "layer"}),
    ("digits-mobilenet", {"sparsity": 0.5, "criterion": "taylor"}),
    ("digits-lenet5", {"sparsity": 0.5, "criterion": "activation", "activation": "apoz", "scope": "layer"}),
])
def test_structured_shrinks_modules_and_runs_in_ort(task, name, spec):
    t = task(name)
    model, ctx = run(t, granularity="channel", **spec)
    base = ec.measure(t.model, t, latency=False)
    after = ec.measure(model, t, latency=False)
    assert after.params < 0.5 * base.params
    assert after.macs < 0.5 * base.macs
    assert after.stored_bytes < 0.6 * base.stored_bytes
    assert after.max_abs_diff <= 1e-4
    assert ctx.log.touched and all("->" in v for v in ctx.log.touched.values())


def test_structured_residual_groups_stay_consistent(task):
    t = task("digits-resnet8")
    model, ctx = run(t, granularity="channel", sparsity=0.5, scope="layer")
    m = model
    # the stem, block1's body and the identity shortcut share channels: all pruned alike
    assert m.stem.conv.out_channels == m.block1.body.conv2.out_channels == m.block2.body.conv1.in_channels == 8
    assert m.fc.out_features == 10
    assert "fc" in ctx.log.touched  # its inputs shrank; its outputs are the model's


def test_block_removal_replaces_by_identity(task):
    t = task("digits-resnet8")
    model, ctx = run(t, granularity="block", sparsity=0.34)  # 1 of the 3 shape-preserving candidates
    candidates = {"block1", "block2.body.conv2", "block3.body.conv2"}
    assert set(ctx.log.touched) | set(ctx.log.skipped) == candidates
    (removed,) = ctx.log.touched
    assert isinstance(model.get_submodule(removed), nn.Identity)
    assert all(v.startswith("kept: more important") for v in ctx.log.skipped.values())
    assert ec.measure(model, t, latency=False).max_abs_diff <= 1e-4


def test_two_pruners_in_a_row_share_no_state(task):
    grouped = nn.Sequential()
    grouped.add_module("conv1", nn.Conv2d(1, 8, 3))
    grouped.add_module("conv2", nn.Conv2d(8, 8, 3, groups=2))
    grouped.add_module("conv3", nn.Conv2d(8, 4, 1))
    a = tpw.Pruner(grouped, torch.rand(1, 1, 8, 8), ["conv1", "conv2", "conv3"])
    a.prune(tpw.GroupScores(params={id(m.weight): m.weight.abs() for m in grouped}), ratio=0.5)
    lenet = copy.deepcopy(task("digits-lenet5").model)
    b = tpw.Pruner(lenet, torch.rand(1, 1, 28, 28), ["conv1", "conv2", "fc1", "fc2"])
    b.prune(tpw.GroupScores(params={id(m.weight): m.weight.abs() for m in weighted_layers(lenet).values()}), ratio=0.5)
    assert a.meta.in_channel_groups is not b.meta.in_channel_groups
    assert a.meta.out_channel_groups is not b.meta.out_channel_groups
    lenet_modules = set(lenet.modules())
    for d in (b.meta.in_channel_groups, b.meta.out_channel_groups, b.meta.num_heads):
        assert set(d) <= lenet_modules
    assert grouped.conv2.groups == 2 and grouped.conv2.out_channels == 4
    assert lenet.conv1.out_channels == 10 and lenet.fc1.out_features == 250


def test_untraceable_model_is_one_line_naming_the_layer(task):
    class Detached(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                return x * 2

    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(4, 8))
    m.add_module("odd", Detached())
    m.add_module("fc2", nn.Linear(8, 2))
    t = ec.Task(model=m, train_data=(torch.rand(8, 4), torch.zeros(8, dtype=torch.long)),
                eval_data=(torch.rand(8, 4), torch.zeros(8, dtype=torch.long)))
    with pytest.raises(RecipeError) as e:
        run(t, granularity="channel", sparsity=0.5)
    assert str(e.value) == ("stages[0]: the dependency graph cannot trace the model at layer 'odd': its output is "
                            "cut off from autograd (no_grad or a non-torch round trip)")


# ---- sensitivity -----------------------------------------------------------------------------


def test_sensitivity_scan_is_saved_and_reused(task, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path / "cache"))
    t = task("digits-lenet300")
    spec = dict(sparsity=0.9, scope="sensitivity", scan_ratios=[0.5, 0.9, 0.98])
    model, ctx = run(t, workdir=tmp_path, **spec)
    assert ctx.log.notes[0].startswith("sensitivity scan saved to ")
    scan = json.loads((tmp_path / "sensitivity-stages0.json").read_text())
    assert set(scan["drops"]) == {"fc1", "fc2", "fc3"} and scan["ratios"] == [0.5, 0.9, 0.98]
    assert (tmp_path / "sensitivity-stages0.png").read_bytes()[:4] == b"\x89PNG"
    total = sum(numel(model, n) for n in ("fc1", "fc2", "fc3"))
    assert abs(sum(zeros(model, n) for n in ("fc1", "fc2", "fc3")) - round(0.9 * total)) <= 3
    again, ctx2 = run(t, **spec)
    assert ctx2.log.notes[0].startswith("sensitivity scan reused from ")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ---- errors ----------------------------------------------------------------------------------


def test_pinned_errors(task):
    assert refuse({"stage": "prune", "granularity": "nm"}) == \
        'recipe: stages[0].pattern is required for granularity nm (e.g. "2:4")'
    assert refuse({"stage": "prune", "granularity": "nm", "pattern": "4:2"}) == \
        "recipe: stages[0].pattern must be N:M with 0 < N < M <= 64; got '4:2'"
    assert refuse({"stage": "prune"}) == "recipe: stages[0].sparsity is required"
    assert refuse({"stage": "prune", "sparsity": 0.5, "criterion": "activation"}) == \
        "recipe: stages[0].criterion activation needs granularity channel; got 'unstructured'"
    assert refuse({"stage": "prune", "sparsity": 0.5, "schedule": "gradual"}) == \
        "recipe: stages[0].finetune is required for schedule gradual"
    assert refuse({"stage": "prune", "sparsity": 0.5, "target": "macs"}) == \
        "recipe: stages[0].target macs needs scope sensitivity; got scope 'global'"
    assert refuse({"stage": "prune", "sparsity": 0.5, "granularity": "rows"}) == \
        "recipe: stages[0].granularity must be one of unstructured, balanced, nm, channel, block; got 'rows'"
    with pytest.raises(RecipeError) as e:
        run(task("digits-lenet300"), sparsity=0.5, per_layer={"fc9": 0.5})
    assert str(e.value) == "stages[0].per_layer[0] matches no layer; got 'fc9' (layers: fc1, fc2, fc3)"
