"""``search(task, recipe) -> SearchResult``: automated compression under device budgets.

A recipe with a ``search:`` block is a space (``space.py``); an Optuna study (``storage.py``) samples
plain recipes from it (``samplers.py``), runs each through ``compress`` and keeps its measured values
(``objective.py``), cutting weak trials early (``pruners.py``), in this process or in workers
(``runner.py``); ``front.py`` turns the study into the Pareto front and the files a user acts on.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import args
from ..errors import RecipeError
from ..task import Task
from .front import best_trial, pareto_front, write
from .space import Space, SearchSpec
from .baseline import Baselines
from .pruners import cut_rules
from .runner import counted, run_trials, run_workers
from .storage import open_storage, open_study, storage_url
from .trial import TrialRecord, record

__all__ = ["SearchResult", "Space", "SearchSpec", "TrialRecord", "search"]


@dataclass
class SearchResult:
    """The study's trials, its Pareto front (feasible trials only) and the best trial."""

    front: list[TrialRecord]
    best: TrialRecord | None
    study: Any  # optuna.Study
    trials: list[TrialRecord] = field(default_factory=list)
    objectives: list[str] = field(default_factory=list)
    task_name: str = ""
    study_name: str = ""
    storage: str = ""
    files: list[Path] = field(default_factory=list)
    references: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # the rules that may cut a trial in this search


def references(space: Space, task: Task, study=None) -> list[tuple[str, dict[str, float]]]:
    """The hand recipes shipped for ``task``, run through compress with the search's device, measured alike
    (against the study's baseline row where their settings match the search's)."""
    import yaml

    from ..pipeline import compress
    from ..recipe import Recipe
    from .objective import measured

    baselines = Baselines(task)

    out = []
    for p in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        if "search" in d or d.get("task") != task.name:
            continue
        d.update(device=space.template.get("device"), constraints={}, measure={"latency": False}, export=["onnx"])
        recipe = Recipe.from_dict(d, source=p.name)
        out.append((p.stem, measured(compress(task, recipe, baseline=baselines.get(study, recipe)).report, recipe)))
    return out


def _space(recipe: Space | dict | str | os.PathLike) -> tuple[Space, dict]:
    import copy

    if isinstance(recipe, Space):
        raw = copy.deepcopy(recipe.template)
        raw["search"] = recipe.spec.model_dump(exclude_none=True, exclude_unset=True)  # read back as written
        return recipe, raw
    if isinstance(recipe, dict):
        return Space.from_dict(recipe), recipe
    import yaml

    space = Space.from_yaml(recipe)
    return space, yaml.safe_load(Path(recipe).read_text())


def collect(study, space: Space, task_name: str, url: str) -> SearchResult:
    """The SearchResult of a study as it stands (any number of workers may have written it)."""
    recs = [record(t) for t in study.get_trials(deepcopy=False)]
    objectives = list(space.spec.objectives)
    front = pareto_front(recs, objectives)
    return SearchResult(front, best_trial(recs, objectives), study, recs, objectives, task_name, study.study_name,
                        url if not url.startswith("sqlite") else url.rsplit("/", 1)[-1], rules=cut_rules(space))


def search(task: Task | str | None, recipe: Space | dict | str | os.PathLike, *, out: str | os.PathLike | None = None,
           storage: str | None = None, study: str | None = None, trials: int | None = None, workers: int = 1,
           progress: Callable[[str, int, int], None] | None = None,
           on_trial: Callable[[TrialRecord, SearchResult], None] | None = None) -> SearchResult:
    """Search the recipe's space for the best compressions of ``task`` and write the result files.

    The study lives in ``out/study.db`` (SQLite) unless ``storage`` names a database URL; running the
    same search again resumes it: finished trials are kept and count towards ``trials``. ``workers``
    local processes (one torch thread each) share the study. ``out`` defaults to ``edgecompress-search``.
    """
    from ..pipeline import resolve

    args.check("search", "task", task, (Task, str, type(None)), args.TASK_OR_NONE)
    args.check("search", "recipe", recipe, (Space, dict, str, os.PathLike),
               "a recipe file's path, its dict or a search.Space")
    args.path("search", out, "out", optional=True)
    space, raw = _space(recipe)
    if workers < 1:
        raise RecipeError(f"--workers must be >= 1; got {workers}")
    if workers > 1 and isinstance(task, Task):
        raise RecipeError("--workers above 1 needs the task by name (each worker process loads it); got a Task object")
    if trials is not None and trials < 1:
        raise RecipeError(f"--trials must be >= 1; got {trials}")
    n = trials if trials is not None else space.spec.trials
    out = Path(out if out is not None else "edgecompress-search")
    name = study or (Path(str(recipe)).stem if isinstance(recipe, (str, os.PathLike)) else "edgecompress")
    url = storage_url(storage, out)
    storage_obj = open_storage(url)  # unreachable storage or a different space: refused before any work
    opened = open_study(space, storage_obj, name)
    for params in space.start:  # the recipes the user has, run first (once: a resumed study has them)
        if counted(opened, n) < n:
            opened.enqueue_trial(params, skip_if_exists=True)
    first = space.plain({p.name: p.extremes()[0] for p in space.params})
    task_ref = task if isinstance(task, str) or task is None else None
    try:
        task_name = _run(space, raw, task, task_ref, first, url, name, opened, n, workers, progress, on_trial)
    except KeyboardInterrupt:  # what finished is in the study; the files say so, and a rerun resumes
        write(collect(opened, space, task.name if isinstance(task, Task) else task_ref or first.task or "", url), out)
        raise
    result = collect(opened, space, task_name, url)
    if space.spec.references:
        result.references = references(space, resolve(task, first), opened)
    result.files = write(result, out, result.references)
    return result


def _run(space, raw, task, task_ref, first, url, name, opened, n, workers, progress, on_trial) -> str:
    """Run the trials in this process or in ``workers`` processes; the task's name."""
    from ..pipeline import resolve

    if workers == 1:
        t = resolve(task, first, progress)

        def each(rec: TrialRecord, _=None) -> None:
            if on_trial is not None:
                on_trial(rec, collect(opened, space, t.name, url))

        run_trials(space, t, url, name, trials=n, timeout=space.spec.timeout, progress=progress, on_trial=each,
                   workdir=None)
        task_name = t.name
    else:
        task_name = task_ref or first.task or ""
        Baselines(resolve(task_ref, first, progress)).get(opened, first)  # measured here once, not per worker
        seen: set[int] = set()

        def poll() -> None:
            if on_trial is None:
                return
            res = collect(opened, space, task_name, url)
            for rec in res.trials:
                if rec.state != "running" and rec.number not in seen:
                    seen.add(rec.number)
                    on_trial(rec, res)

        run_workers(space, raw, task_ref, url, name, trials=n, timeout=space.spec.timeout, workers=workers,
                    on_poll=poll)
        poll()
    return task_name
