"""Knowledge distillation: a loss any stage's fine-tune can add, and a stage training a student.

As a loss (``finetune: {distill: {...}}`` on any stage) the fine-tune minimises
``(1 - alpha) * task loss + alpha * T^2 KL(teacher || student) + feature_weight * hint loss``.
Teachers are the baseline model (default), the Task's own teachers, a built-in task's model, a
``.safetensors`` file (weights for the task's architecture, or ``arch``) or an ``.onnx`` file run by
ONNX Runtime (logits only), alone or as a weighted ensemble. Feature hints (FitNets) pair student and
teacher layers by name; where the widths differ a learned 1x1 projection maps the student's features
to the teacher's width, trained alongside the student and dropped afterwards. With ``mixup`` the
logits term is computed on mixup batches the teachers label (function matching, Beyer et al. 2022).

The ``distill`` stage builds a different, smaller student (``student:`` a zoo student or
``package.module:factory``) and trains it from scratch with that loss.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..context import Context
from ..errors import ArtifactError, RecipeError
from ..finetune import finetune
from ..primitives.kd import feature_loss, kd_loss
from ..spec import Distill, FineTune, StageSpec, TeacherRef
from ..task import Task


class DistillSpec(StageSpec):
    """``{stage: distill, student: mnist1d-cnn-tiny, train: {epochs: 40, distill: {temperature: 4}}}``.

    The stage always distils: ``train.distill`` sets the teachers and weights (the baseline teacher
    with the defaults when absent); ``alpha: 0`` with no ``features`` trains the student alone.
    """

    stage: Literal["distill"] = "distill"
    student: str = Field(description="a zoo student (see zoo.STUDENTS) or package.module:factory")
    train: FineTune = Field(default_factory=lambda: FineTune(epochs=30, lr=3e-3, distill=Distill()),
                            description="how the student is trained from scratch")


# ---- teachers --------------------------------------------------------------------------------

class Teacher:
    """A frozen teacher: a torch module (features available) or an ONNX Runtime session (logits)."""

    def __init__(self, label: str, weight: float, module: nn.Module | None = None, session=None):
        self.label, self.weight, self.module, self.session = label, weight, module, session
        self.features: dict[str, torch.Tensor] = {}
        if module is not None:
            module.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        feed = {self.session.get_inputs()[0].name: x.detach().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def hook(self, names: list[str], where: str) -> None:
        if self.module is None:
            raise RecipeError(f"{where}.features needs torch teachers; got the ONNX file {self.label}")
        mods = dict(self.module.named_modules())
        for n in names:
            if n not in mods:
                raise RecipeError(f"{where}.features: teacher layer {n!r} is not in {self.label}; "
                                  f"got {n!r} (layers: {', '.join(k for k in mods if k)})")
            mods[n].register_forward_hook(lambda m, i, o, n=n: self.features.__setitem__(n, o.detach()))


def build(ref: str, field: str) -> nn.Module:
    """A fresh module from a zoo student, a built-in task's architecture or package.module:factory."""
    from ..zoo import BUILTINS, STUDENTS

    if ref in STUDENTS:
        return STUDENTS[ref].build()
    if ref in BUILTINS:
        return BUILTINS[ref].build()
    if ":" not in ref:
        raise RecipeError(f"{field} must be a zoo student ({', '.join(STUDENTS)}), a built-in task or "
                          f"package.module:factory; got {ref!r}")
    module_name, _, attr = ref.partition(":")
    try:
        made = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"{field} {ref!r} cannot be imported: {e}") from None
    if not isinstance(made, nn.Module):
        raise RecipeError(f"{field} {ref!r} must return a torch.nn.Module; got {type(made).__name__}")
    return made


def _teacher(ref: TeacherRef, task: Task, field: str) -> list[Teacher]:
    from ..export.onnx import session
    from ..zoo import BUILTINS, baseline

    name, w = ref.model, ref.weight
    if name == "baseline":
        return [Teacher("the baseline", w, copy.deepcopy(task.model))]
    if name == "task":
        if not task.teachers:
            raise RecipeError(f"{field} 'task' needs a Task with teachers; got a Task without any")
        return [Teacher(f"task teacher {i}", w, copy.deepcopy(m)) for i, m in enumerate(task.teachers)]
    if name in BUILTINS:
        return [Teacher(name, w, baseline(name))]
    path = Path(name)
    if path.suffix not in (".safetensors", ".onnx"):
        raise RecipeError(f"{field} must be baseline, task, a built-in task ({', '.join(BUILTINS)}), a .safetensors "
                          f"or an .onnx file; got {name!r}")
    if not path.is_file():
        raise RecipeError(f"{field}: no such file; got {name!r}")
    if path.suffix == ".onnx":
        return [Teacher(str(path), w, session=session(path))]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    module = copy.deepcopy(task.model) if ref.arch is None else build(ref.arch, f"{field}.arch")
    try:
        module.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file: {e}") from None
    except RuntimeError as e:
        raise ArtifactError(f"{path}: its weights do not fit the architecture "
                            f"({ref.arch or 'the task model'}): {str(e).splitlines()[0][:200]}") from None
    return [Teacher(str(path), w, module.eval())]


def load_teachers(spec: Distill, task: Task, where: str) -> list[Teacher]:
    refs = spec.teacher if isinstance(spec.teacher, list) else [spec.teacher]
    teachers: list[Teacher] = []
    for i, r in enumerate(refs):
        ref = TeacherRef(model=r) if isinstance(r, str) else r
        field = f"{where}.teacher" + (f"[{i}]" if isinstance(spec.teacher, list) else "")
        teachers += _teacher(ref, task, field)
    if not teachers:
        raise RecipeError(f"{where}.teacher must name at least one teacher; got []")
    return teachers


# ---- the loss --------------------------------------------------------------------------------

def _projection(student: torch.Tensor, width: int) -> nn.Module:
    cs = student.shape[1]
    if student.dim() == 2:
        return nn.Linear(cs, width)
    return (nn.Conv1d if student.dim() == 3 else nn.Conv2d)(cs, width, 1)


class Distiller(nn.Module):
    """The ``extra_loss`` of a fine-tune. Its parameters are the feature projections (trained with
    the student by the fine-tune loop); ``attach(model)`` hooks the student layers for one loop."""

    def __init__(self, spec: Distill, task: Task, seed: int, where: str = "distill"):
        super().__init__()
        self.spec, self.seed, self.where = spec, seed, where
        self.task_loss: Callable = task.loss
        self.example = task.example_input
        self.teachers = load_teachers(spec, task, where)  # a plain list: teachers are never trained
        feats = spec.features or []
        self.pairs = list(feats.items()) if isinstance(feats, dict) else [(n, n) for n in feats]
        for t in self.teachers:
            if self.pairs:
                t.hook(sorted({tn for _, tn in self.pairs}), where)
        self.projections = nn.ModuleDict()
        self.student_features: dict[str, torch.Tensor] = {}
        self.rng = np.random.default_rng(seed)

    def describe(self) -> str:
        teachers = ", ".join(f"{t.label} (weight {t.weight:g})" for t in self.teachers)
        what = f"alpha {self.spec.alpha:g}, temperature {self.spec.temperature:g}, ensemble of {self.spec.ensemble}"
        if self.spec.mixup:
            what += f", mixup {self.spec.mixup:g}"
        if self.pairs:
            what += f", feature hints {', '.join(f'{s}->{t}' for s, t in self.pairs)}"
        return f"{teachers}; {what}"

    def _key(self, ti: int, pi: int) -> str:
        return f"t{ti}_p{pi}"

    def attach(self, model: nn.Module) -> contextlib.ExitStack:
        """Hook the student's hint layers (removed when the returned context exits) and build the
        projections where the student's width differs from a teacher's (seeded)."""
        stack = contextlib.ExitStack()
        self.rng = np.random.default_rng(self.seed)  # mixup draws, the same sequence every loop
        if not self.pairs:
            return stack
        mods = dict(model.named_modules())
        for sn, _ in self.pairs:
            if sn not in mods:
                raise RecipeError(f"{self.where}.features: student layer {sn!r} is not in the model; got {sn!r} "
                                  f"(layers: {', '.join(k for k in mods if k)})")
            h = mods[sn].register_forward_hook(lambda m, i, o, sn=sn: self.student_features.__setitem__(sn, o))
            stack.callback(h.remove)
        was = model.training
        with torch.no_grad():
            model.eval()(self.example)
            for t in self.teachers:
                t(self.example)
        model.train(was)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for ti, t in enumerate(self.teachers):
                for pi, (sn, tn) in enumerate(self.pairs):
                    s, f = self.student_features[sn], t.features[tn]
                    key = self._key(ti, pi)
                    if s.shape[1] != f.shape[1] and key not in self.projections:
                        self.projections[key] = _projection(s, f.shape[1])
        self.student_features.clear()
        return stack

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        loss = out.new_zeros(())
        if spec.alpha == 0 and not self.pairs and not spec.mixup:
            return loss
        weights = [t.weight for t in self.teachers]
        logits = [t(x) for t in self.teachers] if self.pairs or (spec.alpha > 0 and not spec.mixup) else []
        hint = self._hint(out) if self.pairs and spec.feature_weight > 0 else None
        if spec.mixup > 0:
            # the whole objective moves to a mixup batch, labelled by the teachers and by the mixed
            # labels; the loop's task loss on the clean batch is cancelled
            lam = float(self.rng.beta(spec.mixup, spec.mixup))
            perm = torch.from_numpy(self.rng.permutation(len(x)))
            mixed = lam * x + (1 - lam) * x[perm]
            student = model(mixed)
            task = lam * self.task_loss(student, y) + (1 - lam) * self.task_loss(student, y[perm])
            loss = loss + (1 - spec.alpha) * task - self.task_loss(out, y)
            if spec.alpha > 0:
                loss = loss + spec.alpha * kd_loss(student, [t(mixed) for t in self.teachers],
                                                   temperature=spec.temperature, weights=weights,
                                                   ensemble=spec.ensemble)
        elif spec.alpha > 0:
            kd = kd_loss(out, logits, temperature=spec.temperature, weights=weights, ensemble=spec.ensemble)
            loss = loss + spec.alpha * (kd - self.task_loss(out, y))
        return loss if hint is None else loss + spec.feature_weight * hint

    def _hint(self, out: torch.Tensor) -> torch.Tensor:
        """The FitNets loss of the pairs captured in this step's forward passes, teacher-weighted."""
        hint = out.new_zeros(())
        total_w = sum(t.weight for t in self.teachers)
        for ti, t in enumerate(self.teachers):
            for pi, (sn, tn) in enumerate(self.pairs):
                s = self.student_features[sn]
                proj = self.projections[self._key(ti, pi)] if self._key(ti, pi) in self.projections else None
                hint = hint + t.weight / total_w * feature_loss(proj(s) if proj else s, t.features[tn])
        return hint / len(self.pairs)


def distill_loss(ft: FineTune | None, ctx: Context) -> Distiller | None:
    """The extra loss a stage's fine-tune spec asks for (None without a ``distill`` section)."""
    if ft is None or ft.distill is None:
        return None
    loss = Distiller(ft.distill, ctx.task, ctx.seed, where=f"{ctx.where}.finetune.distill")
    ctx.log.notes.append(f"fine-tune distilled from {loss.describe()}")
    return loss


# ---- the stage -------------------------------------------------------------------------------

def apply(model: nn.Module, spec: DistillSpec, ctx: Context) -> nn.Module:
    task = ctx.task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        student = build(spec.student, f"{ctx.where}.student")
    try:
        with torch.no_grad():
            student.eval()(task.example_input)
    except Exception as e:  # a user's architecture that does not fit the task's input
        raise RecipeError(f"{ctx.where}.student {spec.student!r} does not accept the task's input of shape "
                          f"{tuple(task.example_input.shape)}: {str(e).splitlines()[0][:160]}") from None
    setup = spec.train.distill or Distill()
    loss = Distiller(setup, task, ctx.seed, where=f"{ctx.where}.train.distill")
    finetune(student, task.train_data, spec.train, loss=task.loss, seed=ctx.seed, extra_loss=loss,
             progress=ctx.progress, label=f"{ctx.where} train {spec.student}")
    n_student = sum(p.numel() for p in student.parameters())
    n_input = sum(p.numel() for p in model.parameters())
    ctx.log.touched["model"] = (f"replaced by student {spec.student}: {n_student:,} parameters "
                                f"({n_student / max(n_input, 1):.4f} of the input model's {n_input:,})")
    ctx.log.notes.append(f"student trained {spec.train.epochs} epochs from {loss.describe()}")
    return student.eval()
