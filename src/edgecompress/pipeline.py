"""``compress(task, recipe) -> Result``: run the stages in order, fine-tune, measure each."""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import args
from .context import Context
from .deploy import check as check_budgets, evaluate, time_runtimes
from .devices import NAMES, Device, load_device, require_runtimes
from .errors import RecipeError
from .export.onnx import export_onnx
from .finetune import Progress
from .measure import Metrics, compare_latency, measure
from .recipe import Recipe
from .report import Report, Row
from .task import Task
from .techniques import TECHNIQUES
from .techniques.distill import distill_loss
from .violations import Violation


@dataclass
class Result:
    """The compressed model and the report that measured it."""

    model: nn.Module
    report: Report
    recipe: Recipe
    task: Task
    device: Device | None = None  # the recipe's device profile, loaded once for the whole run

    def export_onnx(self, path: str | os.PathLike) -> Path:
        """Write the compressed model as ONNX (atomically); returns the path."""
        args.path("Result.export_onnx", path)
        return export_onnx(self.model, self.task.example_input, path)

    def export_tflite(self, path: str | os.PathLike, *, int8: bool = True) -> Path:
        """Write a full-integer int8 (or fp32) .tflite; scales come from the quantize stage's specs."""
        args.path("Result.export_tflite", path)
        from .export.tflite import export_model

        return export_model(self.model, self.task, path, int8=int8)

    def export_c(self, out_dir: str | os.PathLike, *, name: str = "model",
                 weight_format: str | dict[str, str] | None = None) -> Path:
        """Write the C99 library (``name``.c/.h, kernels, test harness) into ``out_dir``; the weight
        format per layer is ``weight_format``, else the recipe's ``c.format`` (``auto``)."""
        args.path("Result.export_c", out_dir, "out_dir")
        from .export.c import export_model

        if weight_format is None:
            weight_format = self.recipe.c.format if self.recipe is not None else "auto"
        return export_model(self.model, self.task, out_dir, name=name, weight_format=weight_format).dir

    def export_tensorrt(self, path: str | os.PathLike) -> Path:
        """Write the TensorRT-ready int8 ONNX (symmetric int8 Q/DQ from the quantize stage's specs)."""
        args.path("Result.export_tensorrt", path)
        from .export.tensorrt import export_tensorrt

        return export_tensorrt(self.model, self.task.example_input, path)

    def export_tvm(self, out_dir: str | os.PathLike) -> list[Path]:
        """Compile the exported ONNX with Apache TVM: a host (llvm) library, and for ``device: rpi4`` an
        aarch64 one; returns the files written into ``out_dir``."""
        args.path("Result.export_tvm", out_dir, "out_dir")
        from .export.tvm import export_model

        device = self.device
        if device is None and self.recipe is not None and self.recipe.device is not None:
            device = load_device(self.recipe.device)
        return export_model(self.model, self.task.example_input, out_dir,
                            target=device.tvm_target if device is not None else None)

    def export_pte(self, path: str | os.PathLike, *, int8: bool = True) -> Path:
        """Write an ExecuTorch .pte lowered to XNNPACK; int8 uses the quantize stage's scales."""
        args.path("Result.export_pte", path)
        from .export.pte import export_pte

        return export_pte(self.model, self.task.example_input, path, int8=int8)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compressed model as a packed ``.ecz`` file (atomically); returns the path."""
        args.path("Result.save", path)
        from .export.ecz import pack

        with tempfile.TemporaryDirectory() as tmp:
            pack(self.export_onnx(Path(tmp) / "model.onnx"), path)
        return Path(path)


def _measure(model: nn.Module, task: Task, recipe: Recipe, onnx_path: Path) -> Metrics:
    """Everything but latency, which is measured for all rows together at the end."""
    return measure(model, task, onnx_path=onnx_path, artifact=onnx_path.with_suffix(".ecz"),
                   threads=recipe.measure.threads, latency=False, robustness=recipe.measure.robustness)


def _latency(report: Report, paths: list[Path], task: Task, recipe: Recipe) -> None:
    m = recipe.measure
    if not m.latency:
        return
    for row, lat in zip(report.rows, compare_latency(paths, task.example_input, tuple(m.batches), m.threads,
                                                     m.repeats)):
        row.metrics.latency_ms = lat
        sparse = row.metrics.nonzero_params < 0.9 * row.metrics.params  # pruned, not a few zero codes
        if sparse and row.metrics.macs == report.baseline.macs and row is not report.rows[0]:
            row.notes.append("zeros run through dense ONNX Runtime kernels: no speed-up is claimed for them")
    time_runtimes([r.device for r in report.rows], paths, task.example_input, m.threads, m.repeats)


def run_stage(model: nn.Module, spec, ctx: Context) -> nn.Module:
    """One stage: its technique, then its recovery fine-tune unless the technique ran it."""
    ctx.extra_loss = distill_loss(spec.finetune, ctx)
    model = TECHNIQUES[spec.stage][1](model, spec, ctx)
    if spec.finetune is not None and not ctx.finetuned:
        ctx.finetune(model, spec.finetune)
    return model.eval()


def resolve(task: Task | str | None, recipe: Recipe, progress: Progress | None = None,
            fn: str = "compress") -> Task:
    """``task``, the task it names, or (None) the recipe's task."""
    args.check(fn, "task", task, (Task, str, type(None)), args.TASK_OR_NONE)
    args.check(fn, "recipe", recipe, Recipe,
               "an edgecompress.Recipe (Recipe.from_yaml(path) or Recipe.from_dict(d))")
    ref = task if task is not None else recipe.task
    if ref is None:
        raise RecipeError("task is required: name it in the recipe (task: digits-lenet300) or pass one")
    return args.task(fn, ref, progress)


def compress(task: Task | str | None, recipe: Recipe, *, progress: Progress | None = None,
             workdir: str | os.PathLike | None = None, baseline: Row | None = None) -> Result:
    """Apply ``recipe`` to ``task``'s model and return a new model and its report.

    ``task.model`` is never edited. The same ``recipe.seed`` gives bit-identical weights.
    ONNX files of each row are written to ``workdir`` (a temporary folder when None).
    ``baseline``: the row ``measure_baseline(task, recipe)`` measured (same task, device, ``measure``
    and ``c`` settings), used as this report's first row instead of measuring it again; latency, when
    on, is still timed with every row in one loop.
    """
    args.path("compress", workdir, "workdir", optional=True)
    task = resolve(task, recipe, progress)
    device = _device(recipe)
    if recipe.measure.robustness is not None:
        from .robustness import check as check_robustness
        check_robustness(recipe.measure.robustness, task)
    from .techniques.ensemble import check_exports
    check_exports(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = Report(task=task.name, constraints=recipe.constraints.model_dump(exclude_none=True))
        base = copy.deepcopy(task.model).eval()
        paths = [out / "baseline.onnx"]
        if baseline is None:
            report.rows.append(_baseline(base, task, recipe, device, out))
        else:
            report.rows.append(copy.deepcopy(baseline))
            if recipe.measure.latency:
                export_onnx(base, task.example_input, paths[0])
        model = base
        for i, spec in enumerate(recipe.stages):
            ctx = Context(task=task, seed=recipe.seed + 1000 * i, where=f"stages[{i}]", progress=progress,
                          workdir=out, run_stage=run_stage, device=device)
            model = run_stage(model, spec, ctx)
            label = spec.name or f"{i + 1}. {spec.stage}"
            paths.append(out / f"stage{i + 1}.onnx")
            metrics = _measure(model, task, recipe, paths[-1])
            report.rows.append(Row(label, spec.stage, metrics, ctx.log.touched, ctx.log.skipped,
                                   ctx.log.notes + metrics.notes,
                                   _device_metrics(model, task, device, out, i + 1, paths[-1], recipe)))
        _latency(report, paths, task, recipe)
        report.violations = missed_constraints(report, recipe, device)
    return Result(model=model, report=report, recipe=recipe, task=task, device=device)


def measure_baseline(task: Task | str | None, recipe: Recipe, *, progress: Progress | None = None) -> Row:
    """The baseline row ``compress(task, recipe)`` measures first (the task's model with the recipe's
    ``measure``, ``device`` and ``c`` settings); pass it as ``compress(..., baseline=row)`` to measure it
    once for many recipes."""
    task = resolve(task, recipe, progress, "measure_baseline")
    with tempfile.TemporaryDirectory() as tmp:
        return _baseline(copy.deepcopy(task.model).eval(), task, recipe, _device(recipe), Path(tmp))


def _baseline(base: nn.Module, task: Task, recipe: Recipe, device, out: Path) -> Row:
    row = Row("baseline", "baseline", _measure(base, task, recipe, out / "baseline.onnx"))
    row.device = _device_metrics(base, task, device, out, 0, out / "baseline.onnx", recipe)
    return row


def _device(recipe: Recipe):
    """The recipe's device profile; device constraints without a device, or a device whose runtime is
    not installed, are refused before any work."""
    if recipe.device is None:
        for key in ("max_flash", "max_ram", "max_latency_ms"):
            if getattr(recipe.constraints, key) is not None:
                raise RecipeError(f"constraints.{key} needs a device (device: one of {', '.join(NAMES)}); got none")
        return None
    device = load_device(recipe.device)
    require_runtimes(device)
    return device


def _device_metrics(model: nn.Module, task: Task, device, out: Path, i: int, onnx_path: Path, recipe: Recipe):
    """Flash and RAM (measured), latency and energy (estimated) of a row's model on the device."""
    if device is None:
        return None
    return evaluate(model, task, device, out / f"device-{i}", onnx_path, weight_format=recipe.c.format,
                    count=recipe.measure.instructions)


def missed_constraints(report: Report, recipe: Recipe, device: Device | None) -> list[Violation]:
    """The recipe's constraints the final row misses, one record each (the device's budgets through
    ``deploy.check``)."""
    c, base, final = recipe.constraints, report.baseline, report.final
    missed = []
    if c.max_metric_drop is not None and base.metric - final.metric > c.max_metric_drop + 1e-12:
        missed.append(Violation(f"{base.metric_name} dropped {base.metric - final.metric:.4f} "
                                f"({base.metric:.4f} -> {final.metric:.4f}); max_metric_drop is {c.max_metric_drop}",
                                "max_metric_drop", base.metric - final.metric, c.max_metric_drop))
    if c.max_bytes is not None and final.stored_bytes > c.max_bytes:
        missed.append(Violation(f"bytes: {final.stored_bytes:,} ({final.artifact}) exceed max_bytes {c.max_bytes:,} "
                                f"by {final.stored_bytes - c.max_bytes:,}", "max_bytes", final.stored_bytes,
                                c.max_bytes))
    if device is not None and report.rows[-1].device is not None:
        missed += check_budgets(report.rows[-1].device, device, c.max_flash, c.max_ram, c.max_latency_ms)
    return missed
