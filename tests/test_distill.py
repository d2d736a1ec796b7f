"""Distillation as a fine-tune loss and as the distill stage: teachers of every kind, ensembles,
feature hints with projections, the zoo's students, and the one-line errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import edgecompress as ec
from edgecompress.export.onnx import export_onnx
from edgecompress.spec import Distill
from edgecompress.techniques.distill import Distiller
from edgecompress.zoo import BUILTINS, STUDENTS

FAST = {"latency": False}


def _run(task, stage: dict, seed: int = 0):
    return ec.compress(task, ec.Recipe.from_dict({"stages": [stage], "seed": seed, "measure": FAST}))


def _student(train: dict) -> dict:
    return {"stage": "distill", "student": "digits-lenet300-tiny", "train": {"epochs": 3, "lr": 1e-2, **train}}


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_student_is_at_most_a_tenth_of_its_teacher():
    assert {s.task for s in STUDENTS.values()} >= {"digits-lenet300", "digits-lenet5", "mnist1d-cnn"}
    for name, s in STUDENTS.items():
        assert _params(s.build()) <= _params(BUILTINS[s.task].build()) / 10, name


def test_student_with_distillation_differs_from_without(task):
    t = task("digits-lenet300")
    kd = _run(t, _student({"distill": {"temperature": 4, "alpha": 0.9}}))
    plain = _run(t, _student({"distill": {"alpha": 0}}))
    assert _params(kd.model) == _params(plain.model) == 25_450
    assert not torch.equal(kd.model.fc1.weight, plain.model.fc1.weight)
    for r in (kd, plain):
        assert r.report.final.metric >= 0.90
    assert r.report.rows[-1].touched == {
        "model": "replaced by student digits-lenet300-tiny: 25,450 parameters (0.0955 of the input model's 266,610)"}


def test_distillation_as_a_loss_changes_a_prune_fine_tune(task):
    t = task("digits-lenet300")
    prune = {"stage": "prune", "sparsity": 0.9}
    plain = _run(t, {**prune, "finetune": {"epochs": 1}})
    kd = _run(t, {**prune, "finetune": {"epochs": 1, "distill": {"teacher": "baseline"}}})
    assert not torch.equal(kd.model.fc1.weight, plain.model.fc1.weight)
    assert kd.report.final.nonzero_params == plain.report.final.nonzero_params  # masks still hold
    assert kd.report.rows[-1].notes[0] == ("fine-tune distilled from the baseline (weight 1); alpha 0.9, "
                                           "temperature 4, ensemble of probs")


def test_saved_teacher_equals_the_baseline_teacher(task, tmp_path):
    t = task("digits-lenet300")
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, str(path))
    a = _run(t, _student({"distill": {"teacher": "baseline"}}))
    b = _run(t, _student({"distill": {"teacher": str(path)}}))
    assert torch.equal(a.model.fc1.weight, b.model.fc1.weight)


def test_onnx_teacher_and_a_weighted_ensemble(task, tmp_path):
    t = task("digits-lenet300")
    onnx_path = export_onnx(t.model, t.example_input, tmp_path / "teacher.onnx")
    r = _run(t, _student({"distill": {"teacher": [str(onnx_path), {"model": "digits-lenet5", "weight": 2}]}}))
    assert r.report.final.metric >= 0.90
    assert "teacher.onnx (weight 1), digits-lenet5 (weight 2)" in r.report.rows[-1].notes[0]


def test_feature_hints_learn_a_projection_where_widths_differ(task):
    t = task("mnist1d-cnn")
    loss = Distiller(Distill(features=["conv3"]), t, seed=0)
    student = STUDENTS["mnist1d-cnn-tiny"].build()
    with loss.attach(student):
        assert list(loss.projections) == ["t0_p0"]
        proj = loss.projections["t0_p0"]
        assert (proj.in_channels, proj.out_channels, proj.kernel_size) == (16, 64, (1,))
        x, y = next(iter(t.train_data))
        out = student(x)
        value = loss(student, x, y, out)
        value.backward()
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert not student.conv3._forward_hooks, "hooks are removed after the loop"
    r = _run(t, {"stage": "distill", "student": "mnist1d-cnn-tiny",
                 "train": {"epochs": 1, "distill": {"features": {"conv2": "conv2", "conv3": "conv3"}}}})
    assert "feature hints conv2->conv2, conv3->conv3" in r.report.rows[-1].notes[0]


@pytest.mark.parametrize("stage,message", [
    (_student({"distill": {"teacher": "resnet99"}}),
     "stages[0].train.distill.teacher must be baseline, task, a built-in task (" + ", ".join(BUILTINS)
     + "), a .safetensors or an .onnx file; got 'resnet99'"),
    (_student({"distill": {"teacher": ["baseline", "missing.safetensors"]}}),
     "stages[0].train.distill.teacher[1]: no such file; got 'missing.safetensors'"),
    ({"stage": "distill", "student": "giant"},
     "stages[0].student must be a zoo student (" + ", ".join(STUDENTS) + "), a built-in task or "
     "package.module:factory; got 'giant'"),
    ({"stage": "distill", "student": "mnist1d-cnn-tiny"},
     "stages[0].student 'mnist1d-cnn-tiny' does not accept the task's input of shape (1, 1, 28, 28): "),
    ({"stage": "prune", "sparsity": 0.5, "finetune": {"epochs": 1, "distill": {"teacher": "task"}}},
     "stages[0].finetune.distill.teacher 'task' needs a Task with teachers; got a Task without any"),
])
def test_bad_teachers_and_students(task, stage, message):
    with pytest.raises(ec.RecipeError) as e:
        _run(task("digits-lenet300"), stage)
    assert str(e.value).startswith(message)


def test_onnx_teacher_cannot_give_features(task, tmp_path):
    t = task("digits-lenet300")
    path = export_onnx(t.model, t.example_input, tmp_path / "t.onnx")
    with pytest.raises(ec.RecipeError) as e:
        Distiller(Distill(teacher=str(path), features=["fc1"]), t, seed=0, where="stages[0].finetune.distill")
    assert str(e.value) == f"stages[0].finetune.distill.features needs torch teachers; got the ONNX file {path}"


def test_bad_distill_fields_give_one_line():
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [{"stage": "prune", "sparsity": 0.5,
                                         "finetune": {"distill": {"temperature": 0}}}]})
    assert str(e.value) == "recipe: stages[0].finetune.distill.temperature must be > 0.0; got 0"
    with pytest.raises(ec.RecipeError) as e:
        ec.Recipe.from_dict({"stages": [{"stage": "distill", "student": "x", "train": {"distill": {"alpah": 1}}}]})
    assert str(e.value) == "recipe: stages[0].train.distill.alpah is not a known key; got 1"


def test_mixup_distills_on_a_seeded_mixed_batch(task):
    t = task("digits-lenet300")
    x, y = next(iter(t.train_data))
    student = STUDENTS["digits-lenet300-tiny"].build()
    out = student(x)
    values = []
    for mixup in (0.0, 1.0, 1.0):
        loss = Distiller(Distill(mixup=mixup), t, seed=0)
        with loss.attach(student):
            values.append(loss(student, x, y, out).item())
    assert values[0] != values[1] and values[1] == values[2]
