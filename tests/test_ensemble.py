"""Ensembles of compressed members (techniques/ensemble.py, primitives/ensemble.py, export/c/ensemble.py)
and robustness measurement (robustness.py)."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import edgecompress as ec
from edgecompress.export import c as cexp
from edgecompress.export.c import ensemble as c_ensemble
from edgecompress.export.ir import run_int
from edgecompress.export.onnx import export_onnx, run, session
from edgecompress.robustness import RobustnessSpec, measure_robustness, mnist1d_test, shift
from edgecompress.task import predict
from edgecompress.primitives.ensemble import Ensemble, combine_outputs
from edgecompress.techniques.ensemble import fit_stack, fit_weights

TINY = {"model": "digits-lenet300-tiny", "train": {"epochs": 2, "lr": 0.01, "batch_size": 128, "distill": {"alpha": 0}}}
ROBUST = {"gaussian_noise": [0.3], "shift": [2]}


def five_way() -> nn.Module:
    """A member whose output has 5 classes instead of the task's 10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


def small_task(val: bool = True) -> ec.Task:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(10, (64,), generator=gen)
    return ec.Task(model=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), train_data=(x, y), eval_data=(x, y),
                   val_data=(x, y) if val else None, name="small")


@pytest.fixture(scope="module")
def digits_tiny():
    """The digits splits with an untrained 25,450-parameter MLP as the input model: cheap to measure."""
    from edgecompress.zoo import data
    from edgecompress.zoo.models import lenet300_tiny

    train, val, test = data.digits()
    torch.manual_seed(0)
    return ec.Task(model=lenet300_tiny(), train_data=train, val_data=val, eval_data=test, name="digits-tiny")


@pytest.fixture(scope="module")
def weighted(digits_tiny):
    """One ensemble of three digits-lenet300-tiny members (plain, pruned, clustered), weights fitted."""
    recipe = ec.Recipe.from_dict({
        "stages": [{"stage": "ensemble", "combine": "weighted", "seeds": [0, 1, 2], "members": [
            TINY, {**TINY, "stages": [{"stage": "prune", "sparsity": 0.5}]},
            {**TINY, "stages": [{"stage": "cluster", "bits": 4}]}]}],
        "measure": {"latency": False, "robustness": ROBUST}})
    return ec.compress(digits_tiny, recipe)


# ---- bad input: one line each -----------------------------------------------------------------

@pytest.mark.parametrize("stage,message", [
    ({"stage": "ensemble", "members": [[{"stage": "prune", "sparsity": 0.5}]]},
     "recipe: stages[0].members must list at least 2 members; got 1"),
    ({"stage": "ensemble", "members": [[], [{"stage": "prune", "sparsity": 1.5}]]},
     "recipe: stages[0].members[1][0].sparsity must be < 1.0; got 1.5"),
    ({"stage": "ensemble", "members": [[], {"model": "mnist1d-cnn-tiny", "stages": [{"stage": "cluster", "bits": 9}]}]},
     "recipe: stages[0].members[1].stages[0].bits must be <= 8; got 9"),
    ({"stage": "ensemble", "members": [[], [{"stage": "ensemble"}]]},
     "recipe: stages[0].members[1][0].stage must not be ensemble (ensembles do not nest); got 'ensemble'"),
    ({"stage": "ensemble", "members": [[], []], "seeds": [1]},
     "recipe: stages[0].seeds must give one seed per member (2); got 1"),
    ({"stage": "ensemble", "members": [[], []], "combine": "mean"},
     "recipe: stages[0].combine must be one of average, logits, vote, weighted, stack; got 'mean'"),
])
def test_bad_spec_gives_one_line(stage, message):
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [stage]})
    assert str(e.value) == message


def test_members_with_different_output_shapes_are_refused():
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "ensemble", "members": [
        [], {"model": "tests.test_ensemble:five_way", "train": {"epochs": 0}}]}], "measure": {"latency": False}})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(small_task(), recipe)
    assert str(e.value) == ("stages[0].members[1] outputs shape (1, 5) but members[0] outputs (1, 10); "
                            "every member must output the same shape")


@pytest.mark.parametrize("combine", ["stack", "weighted"])
def test_fitted_combiners_need_validation_data(combine):
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "ensemble", "combine": combine, "members": [[], []]}]})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(small_task(val=False), recipe)
    assert str(e.value) == f"stages[0].combine {combine} is fitted on validation data; got a task without val_data"


def test_tflite_export_of_an_ensemble_is_refused_before_any_work():
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "ensemble", "members": [[], []]}],
                                  "export": ["onnx", "tflite"]})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(small_task(), recipe)
    assert str(e.value) == ("export tflite cannot take the ensemble of stages[0] (the tflite export lowers one "
                            "sequential model); export onnx, ecz or c; got export: [onnx, tflite]")


# ---- one model, one graph ---------------------------------------------------------------------

def test_ensemble_is_one_model_and_one_graph(weighted, digits_tiny, tmp_path):
    t = digits_tiny
    model, row = weighted.model, weighted.report.rows[-1]
    assert isinstance(model, Ensemble) and len(model.members) == 3
    m = row.metrics
    assert m.params == 3 * 25_450 and m.macs == 3 * 25_408  # the three members side by side
    assert m.max_abs_diff < 1e-4  # ONNX Runtime runs the one graph as torch does
    assert m.metric >= 0.85
    path = export_onnx(model, t.example_input, tmp_path / "e.onnx")
    assert sum(n.op_type == "Gemm" for n in onnx.load(str(path)).graph.node) == 6
    members = [line for line in row.notes if line.startswith("member ")]
    assert len(members) == 3
    own = [int(re.search(r"([\d,]+) bytes \.ecz", line).group(1).replace(",", "")) for line in members]
    assert m.artifact == "ecz" and m.stored_bytes < sum(own)  # one header and graph instead of three
    accs = [float(re.search(r"accuracy (\d\.\d+)", line).group(1)) for line in members]
    assert all(0.5 < a <= 1 for a in accs)
    assert row.touched["members.1.fc1"].startswith("sparsity")


def test_weights_are_fitted_on_the_validation_split(weighted, digits_tiny):
    t = digits_tiny
    model = weighted.model
    outs = [predict(m, t.val_data)[0] for m in model.members]
    y = torch.cat([y for _, y in t.val_data])
    expect = fit_weights(outs, y, F.cross_entropy)
    assert torch.equal(model.weights, expect)
    assert abs(float(model.weights.sum()) - 1) < 1e-6 and bool((model.weights >= 0).all())
    uniform = F.cross_entropy(combine_outputs(outs, "average"), y)
    assert F.cross_entropy(combine_outputs(outs, "weighted", expect), y) <= uniform


@pytest.mark.parametrize("combine", ["average", "logits", "vote", "stack"])
def test_every_combine_runs_in_onnx_runtime(weighted, digits_tiny, tmp_path, combine):
    t = digits_tiny
    members = list(weighted.model.members)
    val = [predict(m, t.val_data)[0] for m in members]
    y = torch.cat([y for _, y in t.val_data])
    combiner = fit_stack(val, y, F.cross_entropy, l2=0.01) if combine == "stack" else None
    model = Ensemble(members, combine, combiner=combiner).eval()
    xs = torch.cat([x for x, _ in t.eval_data])
    with torch.no_grad():
        out = model(xs)
        outs = [m(xs) for m in members]
    got = run(session(export_onnx(model, t.example_input, tmp_path / f"{combine}.onnx")), xs)
    assert (got - out).abs().max() < 1e-4
    if combine == "vote":
        votes = torch.stack([o.argmax(1) for o in outs])
        majority = torch.mode(votes, 0).values
        clear = (votes == majority).sum(0) >= 2
        assert torch.equal(out.argmax(1)[clear], majority[clear])
    if combine == "average":
        assert torch.allclose(out.exp(), torch.stack([F.softmax(o, 1) for o in outs]).mean(0), atol=1e-6)
    if combine == "stack":  # started at the average of log-probabilities: the fit can only lower the val loss
        plain = F.cross_entropy(torch.stack([F.log_softmax(o, 1) for o in val]).mean(0), y)
        assert F.cross_entropy(combiner(torch.cat([F.log_softmax(o, 1) for o in val], 1)), y) <= plain


# ---- robustness -------------------------------------------------------------------------------

def test_report_gives_robustness_and_its_change(weighted):
    rep = weighted.report
    base, final = rep.rows[0].metrics, rep.rows[-1].metrics
    assert list(base.robustness) == ["gaussian_noise=0.3", "shift=2"] == list(final.robustness)
    row = rep.to_dict()["rows"][1]
    assert row["metrics"]["robustness"] == final.robustness
    assert row["robustness_change"] == {k: final.robustness[k] - base.robustness[k] for k in base.robustness}
    lines = rep.robustness_lines()
    assert lines[0].startswith("baseline: accuracy under gaussian_noise=0.3 ")
    assert re.fullmatch(r"1\. ensemble: accuracy under gaussian_noise=0\.3 0\.\d{4} \([+-]\d+\.\d\d pt\), "
                        r"shift=2 0\.\d{4} \([+-]\d+\.\d\d pt\)", lines[1])
    assert lines[1] in rep.to_markdown()


def test_robustness_is_seeded_and_the_same_from_onnx(task, tmp_path):
    t = task("digits-lenet300")
    spec = {"gaussian_noise": [0.3], "shift": [1, 2], "seed": 5}
    first = measure_robustness(t.model, t, spec)
    clean = ec.task.evaluate(t.model, t)
    assert first["shift=2"] < first["shift=1"] < clean - 0.01  # a pixel or two hurts LeNet-300
    assert first["gaussian_noise=0.3"] < clean
    assert first == measure_robustness(t.model, t, RobustnessSpec(**spec))
    onnx_path = export_onnx(t.model, t.example_input, tmp_path / "b.onnx")
    from_onnx = ec.measure(onnx_path, t, latency=False, robustness=spec).robustness
    # the same corrupted inputs scored by ONNX Runtime instead of torch: on any machine's weights a near-tie
    # may flip one argmax, so each within one test sample
    n = sum(len(y) for _, y in t.eval_data)
    assert list(from_onnx) == list(first)
    assert all(abs(from_onnx[k] - first[k]) <= 1 / n + 1e-9 for k in first), (from_onnx, first)


def test_shift_moves_each_input_and_fills_zeros():
    x = torch.arange(1.0, 6.0).reshape(1, 1, 5).repeat(50, 1, 1)
    out = shift(x, 2, torch.Generator().manual_seed(0))
    right, left = torch.tensor([0.0, 0, 1, 2, 3]), torch.tensor([3.0, 4, 5, 0, 0])
    is_right = (out[:, 0] == right).all(1)
    assert bool((is_right | (out[:, 0] == left).all(1)).all()) and 0 < int(is_right.sum()) < 50
    img = torch.ones(8, 1, 4, 4)
    moved = shift(img, 1, torch.Generator().manual_seed(0))
    assert bool((moved.sum((1, 2, 3)) == 12).all())  # one row or column of 4 zeroed in each


def test_mnist1d_variants_keep_the_test_digits():
    from edgecompress.zoo import data

    x, y = data.mnist1d()[2]
    sheared_x, sheared_y = mnist1d_test("shear_scale", 1.5)  # the default is 0.75
    assert torch.equal(sheared_y, y) and sheared_x.shape == x.shape and not torch.allclose(sheared_x, x)
    assert float((sheared_x - x).pow(2).mean()) < float(x.pow(2).mean())  # the same digits, more sheared


def test_robustness_refuses_corruptions_the_task_cannot_take(task):
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}],
                                  "measure": {"robustness": {"mnist1d": {"shear_scale": [1.5]}}}})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(small_task(), recipe)
    assert str(e.value) == "measure.robustness.mnist1d applies to MNIST-1D tasks (mnist1d-cnn); got task small"
    flat = small_task()
    flat.example_input = flat.example_input.flatten(1)
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5}],
                                  "measure": {"robustness": {"shift": [1]}}})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(flat, recipe)
    assert str(e.value) == ("measure.robustness.shift needs image (N, C, H, W) or sequence (N, C, L) inputs; "
                            "task small has inputs of shape (1, 784)")


# ---- C export: the members one after another in one arena, then the combiner -------------------

needs_arm = pytest.mark.skipif(not cexp.have_toolchain(), reason="arm-none-eabi-gcc / qemu-system-arm missing "
                                                                 "(make toolchain installs them)")


def wide() -> nn.Module:
    """A 784-64-10 member for ``small_task``: its arena (848 B) is larger than the input model's (796 B)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


@needs_arm
def test_c_ensemble_takes_the_largest_members_ram_and_the_sum_of_their_flash(tmp_path):
    recipe = ec.Recipe.from_dict({"stages": [{"stage": "ensemble", "combine": "average", "members": [
        [], {"model": "tests.test_ensemble:wide", "train": {"epochs": 0}}]}], "device": "cortex-m4",
        "measure": {"latency": False}})
    result = ec.compress(small_task(), recipe)
    d = result.report.rows[-1].device
    assert json.loads(result.report.to_json())["rows"][-1]["device"]["members"] == d.members
    assert [m["ram_bytes"] for m in d.members] == [796, 848]  # each member's own arena
    assert d.ram_bytes == 848  # one arena, the largest member's, not 796 + 848
    alone, objects = sum(m["flash_bytes"] for m in d.members), sum(m["object_flash_bytes"] for m in d.members)
    assert objects < d.flash_bytes and abs(d.flash_bytes - alone) < 1024  # the members, kernels once, the combiner
    assert d.instructions > sum(m["instructions"] for m in d.members)  # measured: the members and the combiner
    assert d.macs == 784 * 10 + 784 * 64 + 64 * 10
    out = result.export_c(tmp_path / "c")  # result.export_c writes the ensemble's library
    assert {"model.c", "model_m0.c", "model_m1.c", "ec_kernels.c"} <= {p.name for p in out.iterdir()}
    assert "#define MODEL_ARENA_SIZE 848" in (out / "model.h").read_text()


@pytest.fixture(scope="module")
def mnist1d_pair(task):
    """Two int8 members: the mnist1d-cnn baseline and a copy with 80% of each layer's weights zeroed."""
    t = task("mnist1d-cnn")
    pruned = copy.deepcopy(t.model)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                m.weight[m.weight.abs() <= m.weight.abs().flatten().quantile(0.8)] = 0
    members = [copy.deepcopy(t.model).eval(), pruned.eval()]
    graphs = c_ensemble.lower_members(Ensemble(members, "logits"), t)
    q = graphs[0].quantize_input(torch.cat([xb for xb, _ in t.eval_data]))
    return members, graphs, q, np.stack([run_int(g, q) for g in graphs], 1)


@needs_arm
@pytest.mark.parametrize("combine,qemu", [("logits", True), ("stack", True), ("weighted", False), ("vote", False)])
def test_c_ensemble_is_exact_with_the_integer_reference(mnist1d_pair, task, tmp_path, combine, qemu):
    t = task("mnist1d-cnn")
    members, graphs, q, ref = mnist1d_pair
    n = 4 if qemu else len(q)  # every test input on the host, a few under QEMU
    torch.manual_seed(0)  # any weights and combiner: the C library must compute what torch does with them
    model = Ensemble(members, combine, torch.tensor([0.3, 0.7]) if combine == "weighted" else None,
                     nn.Linear(20, 10).requires_grad_(False) if combine == "stack" else None)
    exp = c_ensemble.export_ensemble(model, t, tmp_path, name="ens", graphs=graphs)
    got_members, got = c_ensemble.run(exp, q[:n], "cortex-m4" if qemu else None)
    want_members, want = c_ensemble.reference(exp, q[:n], model, ref[:n])
    assert np.array_equal(got_members, want_members)  # every member's int8 output, bit for bit
    assert np.array_equal(got.argmax(1), want.argmax(1))
    if combine == "logits":  # float32 sums in the same order: bit-exact
        assert np.array_equal(got, want)
    else:  # expf and logf of the C library against torch's
        np.testing.assert_allclose(got, want, rtol=c_ensemble.RTOL, atol=c_ensemble.ATOL)


def test_c_ensemble_requantizes_the_input_of_a_member_with_its_own_input_scale(tmp_path):
    from edgecompress.context import Context
    from edgecompress.techniques import quantize as QZ

    t = small_task()
    spec = QZ.QuantizeSpec(mode="static", observer="percentile", percentile=90)  # clips the input range
    members = [copy.deepcopy(t.model).eval(), QZ.apply(copy.deepcopy(t.model), spec, Context(task=t, seed=0)).eval()]
    exp = c_ensemble.export_ensemble(Ensemble(members, "logits"), t, tmp_path, name="ens")
    q0, q1 = (m.graph.tensors[m.graph.input].q for m in exp.members)
    assert q1.scale < q0.scale  # member 1 takes its input on a finer grid: the C library requantizes it
    assert "ec_requant(input[j]" in (tmp_path / "ens.c").read_text()
    q = exp.graph.quantize_input(torch.cat([x for x, _ in t.eval_data]))
    assert not np.array_equal(c_ensemble.member_input(exp, 1, q), q)
    got_members, got = c_ensemble.run(exp, q)
    want_members, want = c_ensemble.reference(exp, q, Ensemble(members, "logits"))
    assert np.array_equal(got_members, want_members) and np.array_equal(got, want)


def test_an_ensemble_applied_without_the_pipelines_run_stage_says_so():
    from edgecompress.context import Context
    from edgecompress.techniques import ensemble
    from edgecompress.zoo import load_task

    t = load_task("digits-lenet300")
    spec = ensemble.EnsembleSpec.model_validate({"stage": "ensemble", "members": [[], []], "combine": "logits"})
    with pytest.raises(TypeError) as e:
        ensemble.apply(copy.deepcopy(t.model), spec, Context(task=t, seed=0))
    assert str(e.value) == ("ensemble.apply(): ctx.run_stage must run a member's stages (compress passes "
                            "pipeline.run_stage); got None")
