"""The ``edgecompress`` command. Bad input gives one line on stderr and exit code 2; a missed
recipe constraint gives exit code 1 with the report still written."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import ArtifactError, RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make trained PyTorch models small and fast for edge devices, with measured reports.")
err = Console(stderr=True)
RECIPES = Path(__file__).parent / "recipes"
DEMO_RECIPE = RECIPES / "deep-compression.yaml"

OutDir = Annotated[Path, typer.Option("--out", "-o", help="folder for the model and report files")]
Json = Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout and nothing else")]
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="built-in task name or package.module:factory")]


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    try:
        yield
    except (RecipeError, ArtifactError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)


@contextmanager
def progress_bars(enabled: bool):
    """A progress callback drawing one rich bar per label on stderr."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as p:
        def update(label: str, done: int, total: int) -> None:
            if label not in bars:
                bars[label] = p.add_task(label, total=total)
            p.update(bars[label], completed=done, total=total)
        yield update


def _write_outputs(result, out: Path) -> None:
    """Every file the recipe exports, plus the report, written into a staging folder beside ``out``
    and moved in only when all succeeded: a failing export leaves nothing partial behind."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writers = {  # each export's files, in this order
            "onnx": lambda: result.export_onnx(stage / "model.onnx"),
            "ecz": lambda: result.save(stage / "model.ecz"),
            "tflite": lambda: (result.export_tflite(stage / "model.tflite", int8=True),
                               result.export_tflite(stage / "model-fp32.tflite", int8=False)),
            "c": lambda: result.export_c(stage / "c"),
            "onnx-tensorrt": lambda: result.export_tensorrt(stage / "model-tensorrt.onnx"),
            "tvm": lambda: result.export_tvm(stage / "tvm"),
            "pte": lambda: (result.export_pte(stage / "model.pte", int8=True),
                            result.export_pte(stage / "model-fp32.pte", int8=False)),
        }
        for fmt, write in writers.items():
            if fmt in result.recipe.export:
                write()
        (stage / "report.json").write_text(result.report.to_json())
        (stage / "report.md").write_text(result.report.to_markdown())
        (stage / "report.html").write_text(result.report.to_html(), encoding="utf-8")
        out.mkdir(exist_ok=True)
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_out_dir(out: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot be one before any work starts."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{option} must name a folder; {str(out)!r} is an existing file")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RecipeError(f"{option} must name a folder; {str(parent)!r} in {str(out)!r} is an existing file")
    if not os.access(parent, os.W_OK):
        raise RecipeError(f"{option} must name a folder that can be written; {str(parent)!r} is read-only")


def _run(recipe_path: Path, out: Path, task: str | None, as_json: bool) -> None:
    from .pipeline import compress
    from .recipe import Recipe

    check_out_dir(out)
    recipe = Recipe.from_yaml(recipe_path)
    if task is not None:
        recipe.task = task
    with progress_bars(not as_json) as progress:
        result = compress(None, recipe, progress=progress)
    report = result.report
    _write_outputs(result, out)
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        console = Console()
        console.print(report.to_rich(console.width))
        for line in report.layer_lines() + report.device_lines():
            console.print(f"  {line}", highlight=False)
        console.print(f"files in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())), highlight=False)
    if report.violations:
        for v in report.violations:
            err.print(f"[bold yellow]constraint missed:[/] {v}", highlight=False)
        raise typer.Exit(1)


@app.command()
def demo(out: OutDir = Path("edgecompress-out"), task: TaskOpt = None, as_json: Json = False) -> None:
    """Compress a built-in task with the default recipe and print the measured report."""
    with user_errors():
        _run(DEMO_RECIPE, out, task, as_json)


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
        out: OutDir = Path("edgecompress-out"), task: TaskOpt = None, as_json: Json = False) -> None:
    """Run a recipe: compress, measure every stage, write the model and the report."""
    with user_errors():
        _run(recipe, out, task, as_json)


def _search(recipe_path: Path, out: Path, trials: int | None, storage: str | None, study: str | None,
            workers: int, task: str | None, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .search import Space, search as run_search
    from .search.front import summary, to_markdown

    check_out_dir(out)
    space = Space.from_yaml(recipe_path)
    bars: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=as_json) as p:
        def progress(label: str, done: int, total: int) -> None:
            if label not in bars:
                bars[label] = p.add_task(label, total=total)
            p.update(bars[label], completed=done, total=total)

        def on_trial(rec, res) -> None:
            for label in [k for k in bars if k.startswith(f"trial {rec.number} ")]:
                p.remove_task(bars.pop(label))
            if as_json:
                return
            what = ", ".join(f"{k} {v:,.4f}" if k == "metric" else f"{k} {v:,.0f}" if v >= 100 else f"{k} {v:.3f}"
                             for k, v in rec.values.items() if k in res.objectives)
            line = f"trial {rec.number} {rec.state}" + (f": {what}" if what else "") + \
                (f" ({rec.reason})" if rec.reason else "") + (" [misses a constraint]" if rec.violations else "")
            best = res.best
            line += f" | best feasible: trial {best.number}, metric {best.values['metric']:.4f}" if best else \
                " | no feasible trial yet"
            p.console.print(line, highlight=False, soft_wrap=True)

        result = run_search(task, space if task is None else _with_task(space, task), out=out, storage=storage,
                            study=study or recipe_path.stem, trials=trials, workers=workers,
                            progress=None if as_json else progress, on_trial=on_trial)
    if as_json:
        sys.stdout.write(json.dumps(summary(result), indent=2) + "\n")
    else:
        Console().print(to_markdown(result), highlight=False, markup=False, soft_wrap=True)
        err.print(f"files in {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())), highlight=False)
    if result.best is None:
        fail("no trial met every constraint (search.md lists why each was cut or missed)", 1)


def _with_task(space, task: str):
    space.template["task"] = task
    return space


@app.command()
def search(recipe: Annotated[Path, typer.Argument(help="recipe YAML file with a search: block")],
           out: Annotated[Path, typer.Option("--out", "-o", help="folder for the study and the result files")]
           = Path("edgecompress-search"),
           trials: Annotated[Optional[int], typer.Option("--trials", help="trials in the study (default: "
                                                         "search.trials); finished ones count on resume")] = None,
           storage: Annotated[Optional[str], typer.Option("--storage", help="database URL, e.g. postgresql://"
                                                          "user@host:5432/db (default: OUT/study.db)")] = None,
           study: Annotated[Optional[str], typer.Option("--study", help="study name (default: the recipe's "
                                                        "file name)")] = None,
           workers: Annotated[int, typer.Option("--workers", help="local worker processes, one torch thread "
                                                "each")] = 1,
           task: TaskOpt = None, as_json: Json = False) -> None:
    """Search a recipe's ranges for the best compressions under its constraints: an Optuna study
    (resumable), the Pareto front as recipes `run` reproduces, best.yaml, search.md, pareto.png."""
    with user_errors():
        _search(recipe, out, trials, storage, study, workers, task, as_json)


@app.command("eval")
def evaluate(model: Annotated[Path, typer.Argument(help="an ONNX model file or a packed .ecz file")],
             task: Annotated[str, typer.Option("--task", help="built-in task name or package.module:factory")],
             as_json: Json = False) -> None:
    """Measure a model file on a task's held-out data: metric, size, MACs, latency."""
    from .measure import measure
    from .zoo import load_task

    with user_errors():
        if not model.is_file():
            raise ArtifactError(f"{model}: no such file")
        t = load_task(task, field="--task")
        m = measure(model, t)
    if as_json:
        sys.stdout.write(json.dumps(m.to_dict(), indent=2) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"{model} on {t.name}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in m.to_dict().items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


@app.command()
def unpack(artifact: Annotated[Path, typer.Argument(help="a packed .ecz file")],
           out: Annotated[Path, typer.Option("--out", "-o", help="the ONNX file to write")]) -> None:
    """Write the ONNX model inside a packed .ecz file (weights decoded bit-exactly)."""
    from .export.ecz import unpack as unpack_ecz

    with user_errors():
        unpack_ecz(artifact, out)
    err.print(f"wrote {out} ({out.stat().st_size:,} bytes) from {artifact} ({artifact.stat().st_size:,} bytes)",
              highlight=False)


@app.command("report")
def render_report(path: Annotated[Path, typer.Argument(help="an output folder holding report.json, or a report.json")],
                  out: Annotated[Optional[Path], typer.Option("--out", "-o", help="the HTML file to write "
                                                              "(default: report.html beside the JSON)")] = None) -> None:
    """Render a report.json again: the table on the terminal, report.html with its plots beside it."""
    from .report import Report
    from .report.html import write_html

    with user_errors():
        source = path / "report.json" if path.is_dir() else path
        if not source.is_file():
            raise ArtifactError(f"{path}: no report.json in this folder (edgecompress run writes one)"
                                if path.is_dir() else f"{path}: no such file")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ArtifactError(f"{source}: not a report.json ({str(e).splitlines()[0]})") from None
        rep = Report.from_dict(data, str(source))
        page = write_html(rep, out or source.with_name("report.html"), folder=source.parent)
    console = Console()
    console.print(rep.to_rich(console.width))
    for line in rep.layer_lines() + rep.device_lines():
        console.print(f"  {line}", highlight=False)
    console.print(f"wrote {page} ({page.stat().st_size:,} bytes)", highlight=False)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
