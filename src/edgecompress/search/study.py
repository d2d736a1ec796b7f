"""The Optuna study around ``compress``: storage, samplers, constraints, the pruner and workers.

A trial is a plain recipe (every range resolved) run through ``pipeline.compress`` and measured by
the code that measures ``edgecompress run``. Before that, at most two cheaper runs of the same recipe:

1. structure: every fine-tune at 0 epochs. Flash, RAM and estimated latency on the device depend on
   the compressed structure, not on the trained weights, so a trial over ``max_flash``, ``max_ram`` or
   ``max_latency_ms`` is cut here, before any training, and recorded with the reason.
2. short: every fine-tune at ``short_epochs``. Its metric is reported to the recipe's Optuna pruner
   (``sha``: successive halving, cut when not in the top 1/eta; ``hyperband``: the same within the
   trial's Hyperband bracket, where only bracket 0 checks at the short run and the others run in full;
   ``median``: cut below the median), which compares it with the trials at least as cheap as it (on
   every cost objective, from the same short run) only: a cheap trial is never cut for losing to a
   bigger one, so the Pareto front keeps its small end.

The baseline row every report starts with is measured once per study (``Baselines``) and kept in the
study's user attributes, so the trials, their cheaper runs, every worker and a resumed run reuse it.

Each trial's user attributes hold its plain recipe, its measured values, its constraint lines, and
for a cut or failed trial the one-line reason; ``front.py`` turns them into the result files.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, RecipeError
from ..recipe import Recipe
from .space import DEVICE_OBJECTIVES, STRUCTURAL, Space

log = logging.getLogger(__name__)

DIRECTIONS = {"metric": "maximize"}  # every other objective is a cost, minimised
FLAT = ("nsga2", "gp")  # samplers that evolve or model only the parameters every trial has (Space.sample)
SPACE_ATTR = "edgecompress:space"
BASELINE_ATTR = "edgecompress:baseline:"
OnTrial = Callable[["TrialRecord", "TrialRecord | None"], None]


@dataclass
class TrialRecord:
    """One trial as a user reads it: what ran, what it measured, and why it stopped if it did."""

    number: int
    state: str  # complete | cut | failed | running
    recipe: dict[str, Any] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    baseline_metric: float | None = None
    metric_name: str = "metric"
    violations: list[str] = field(default_factory=list)
    reason: str = ""  # why a trial was cut or failed
    rule: str = ""  # structure | sha | hyperband | median (cut), or error (failed)
    seconds: float | None = None

    @property
    def feasible(self) -> bool:
        return self.state == "complete" and not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "feasible": self.feasible, "values": self.values,
                "baseline_metric": self.baseline_metric, "metric_name": self.metric_name,
                "violations": self.violations, "reason": self.reason, "rule": self.rule,
                "seconds": self.seconds, "recipe": self.recipe}


def record(t) -> TrialRecord:
    """A TrialRecord from an Optuna FrozenTrial."""
    import optuna

    a = t.user_attrs
    state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "cut",
             optuna.trial.TrialState.FAIL: "failed"}.get(t.state, "running")
    if state == "complete" and "cut" in a:  # cut on structure, complete for NSGA-II and GP (Objective)
        state = "cut"
    if state == "failed" and "error" not in a:
        reason = "interrupted (the worker stopped before the trial finished)"
    else:
        reason = a.get("error") or a.get("cut", "")
    secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    return TrialRecord(t.number, state, a.get("recipe", {}), a.get("values", {}), a.get("baseline_metric"),
                       a.get("metric_name", "metric"), a.get("violations", []), reason,
                       "error" if state == "failed" else a.get("rule", ""), secs)


# ---- storage -----------------------------------------------------------------------------------

def storage_url(storage: str | None, out: Path) -> str:
    if storage:
        return storage
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str):
    """Optuna's RDB storage with heartbeats (a killed worker's trial is marked failed); an unreachable
    server gives one line naming host and port."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise RecipeError(f"--storage must be a database URL (sqlite:///study.db, postgresql://user@host:5432/db); "
                          f"got {url!r}") from None
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 means psycopg 3 by it; psycopg2 is what is installed
        try:
            import psycopg  # noqa: F401
        except ImportError:
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 120}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with _quiet_optuna():
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=40)
    except Exception as e:  # sqlalchemy OperationalError, a missing driver, ...
        where = f"{parsed.host or 'localhost'}:{parsed.port or _default_port(parsed.get_backend_name())}" \
            if parsed.get_backend_name() != "sqlite" else (parsed.database or "memory")
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise RecipeError(f"--storage: cannot reach {where}: {first}") from None


def _default_port(backend: str) -> int | str:
    return {"postgresql": 5432, "mysql": 3306}.get(backend, "?")


@contextlib.contextmanager
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials' outcomes are recorded, not logged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)


# ---- samplers, constraints, pruner -------------------------------------------------------------

def make_sampler(space: Space, worker: int = 0, done: int = 0, task=None):
    """The recipe's sampler; ``rl`` describes the layers of ``task``'s model to its agent (``rl.py``)."""
    import optuna

    spec = space.spec
    # workers of one study, and a resumed study, must not replay the sequence already proposed
    seed = spec.seed + 1009 * worker + 7919 * done
    if spec.sampler == "rl":
        from .rl import RLSampler, layer_features

        layers = layer_features(task.model, task.example_input) if task is not None else None
        return RLSampler(layers, spec.objectives, seed=seed, n_startup_trials=max(4, min(10, spec.trials // 4)),
                         horizon=spec.trials)
    if spec.sampler == "random":
        from .numbered import NumberedRandomSampler

        return NumberedRandomSampler(spec.seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, spec.trials // 5)))
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=max(4, min(10, spec.trials // 4)))


class _CheaperView:
    """The study as Optuna's single-objective pruner sees it: the metric maximised, and only the trials
    at least as cheap as ``trial`` on every cost objective (from their short runs) competing; ``keep``
    narrows them further (Hyperband: the trial's own bracket). Each short metric is kept in the trial's
    user attributes, not stored as an intermediate value (Optuna's multi-objective TPE sampler fails on
    a pruned trial that has one), and handed to the pruner here as the intermediate value at step
    ``short``."""

    def __init__(self, study, trial_number: int, costs: dict[str, float], short: int,
                 keep: Callable[[int], bool] | None = None):
        import optuna

        self._study, self._n, self._costs, self._short, self._keep = study, trial_number, costs, short, keep
        self._storage = study._storage
        self.direction = optuna.study.StudyDirection.MAXIMIZE

    def get_trials(self, deepcopy: bool = False, states=None):
        out = []
        for t in self._study.get_trials(deepcopy=deepcopy, states=states):
            theirs = t.user_attrs.get("short_costs")
            if t.number == self._n or theirs is None or (self._keep is not None and not self._keep(t.number)):
                continue
            if all(theirs.get(k, math.inf) <= v for k, v in self._costs.items()):
                out.append(self.scored(t))
        return out

    def scored(self, t):
        """``t`` (a frozen trial) with its short metric as the intermediate value at the short step."""
        t = copy.copy(t)
        t.intermediate_values = {**t.intermediate_values, self._short: t.user_attrs["short_metric"]}
        return t


def hyperband_bracket(study_name: str, number: int, short: int, epochs: int, eta: int) -> int:
    """The Hyperband bracket of a trial, as Optuna's HyperbandPruner assigns it: brackets
    floor(log_eta(epochs / short)) + 1, bracket b's first check at short * eta^b epochs, each bracket
    given ceil(n * eta^s / (s + 1)) shares (s = n - 1 - b) and a trial its share by crc32 of its name."""
    import binascii

    n = math.floor(math.log(epochs / short, eta)) + 1
    shares = [math.ceil(n * eta ** (n - 1 - b) / (n - b)) for b in range(n)]
    pick = binascii.crc32(f"{study_name}_{number}".encode()) % sum(shares)
    for b, share in enumerate(shares):
        pick -= share
        if pick < 0:
            return b
    return n - 1


def cut_rules(space: Space) -> list[str]:
    """The rules that may cut a trial of this space: structure (a flash, RAM or latency budget) and the
    pruner (when a short run is scored)."""
    spec, c = space.spec, space.template.get("constraints") or {}
    rules = ["structure"] if any(c.get(k) is not None for k in STRUCTURAL) else []
    if spec.pruner != "none" and "metric" in spec.objectives and spec.short_epochs > 0:
        rules.append(spec.pruner)
    return rules


def short_verdict(trial, metric: float, costs: dict[str, float], spec) -> str:
    """Report the short run's metric to the study and ask the recipe's pruner; why the trial is cut, or ""."""
    import optuna

    study, eta, short = trial.study, spec.reduction_factor, spec.short_epochs
    trial.set_user_attr("short_metric", metric)

    def view(keep=None) -> tuple[_CheaperView, Any]:
        v = _CheaperView(study, trial.number, costs, short, keep)
        return v, v.scored(study._storage.get_trial(trial._trial_id))

    if spec.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        cut = pruner.prune(*view())
        return "is below the median of the complete trials at least as cheap" if cut else ""
    bracket, keep = 0, None
    if spec.pruner == "hyperband":  # only bracket 0 is checked at the short run; the others run in full
        def of(n: int) -> int:
            return hyperband_bracket(study.study_name, n, short, spec.epochs, eta)

        bracket = of(trial.number)
        trial.set_user_attr("hyperband_bracket", bracket)
        keep = lambda n: of(n) == bracket  # noqa: E731
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=short, reduction_factor=eta,
                                                    min_early_stopping_rate=bracket)
    cut = pruner.prune(*view(keep))
    where = " in its Hyperband bracket" if spec.pruner == "hyperband" else ""
    return f"is not in the top 1/{eta} of the trials at least as cheap{where}" if cut else ""


# ---- one trial ---------------------------------------------------------------------------------

def with_epochs(recipe: dict, cap: int | None) -> dict:
    """The recipe with every fine-tune (and a distill stage's training) at most ``cap`` epochs."""
    out = copy.deepcopy(recipe)
    if cap is None:
        return out
    for st in out.get("stages", []):
        for key in ("finetune", "train"):
            ft = st.get(key)
            if isinstance(ft, dict):
                ft["epochs"] = min(int(ft.get("epochs", 5)), cap)
        if st.get("stage") == "distill" and "train" not in st:  # DistillSpec's default training, capped
            st["train"] = {"epochs": min(30, cap), "lr": 3e-3, "distill": {}}
    return out


def _epochs(recipe: dict) -> int:
    return max([int((st.get(k) or {}).get("epochs", 5)) for st in recipe.get("stages", [])
                for k in ("finetune", "train") if isinstance(st.get(k), dict)] or [0])


def measured(report, recipe: Recipe) -> dict[str, float]:
    """Every objective's value from a report's last row (the device ones when the recipe names one)."""
    final = report.final
    out = {"metric": final.metric, "bytes": float(final.stored_bytes), "macs": float(final.macs)}
    dev = report.rows[-1].device
    if dev is not None:
        out.update(flash=float(dev.flash_bytes), ram=float(dev.ram_bytes), latency=dev.latency_ms_est,
                   energy=dev.energy_uj_est)
    return out


def constraint_values(report, recipe: Recipe, violations: list[str], keys=None) -> dict[str, float]:
    """One number per constraint, <= 0 when met (Optuna's convention; costs relative to their limit),
    and ``other`` for a miss no number covers (the device's own flash or RAM)."""
    c, v = recipe.constraints, measured(report, recipe)
    out = {}
    if c.max_metric_drop is not None:
        out["max_metric_drop"] = report.baseline.metric - v["metric"] - c.max_metric_drop
    for key, name in (("max_flash", "flash"), ("max_ram", "ram"), ("max_latency_ms", "latency"),
                      ("max_bytes", "bytes")):
        limit = getattr(c, key)
        if limit is not None and name in v:
            out[key] = (v[name] - limit) / limit
    out["other"] = 1.0 if violations and not any(x > 0 for x in out.values()) else 0.0
    return {k: x for k, x in out.items() if keys is None or k in keys}


def layer_names(task) -> Callable[[dict], list[str]]:
    """The layers a per-layer stage gives one value each: the task model's Linear/Conv layers that the
    stage's ``layers`` and ``exclude`` choose, without the output layer where prune leaves it whole."""
    from ..layers import leave_output_alone, select, weighted_layers

    def names(stage: dict) -> list[str]:
        chosen = select(list(weighted_layers(task.model)), stage.get("layers"), stage.get("exclude"))
        if stage["stage"] == "prune":
            chosen, _ = leave_output_alone(task.model, task.example_input, chosen, stage.get("layers"),
                                           stage.get("keep_output", True))
        return chosen

    return names


# ---- the baseline, measured once per study --------------------------------------------------

def _digest(h, value) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().flatten().contiguous()
        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest(h, v)
    else:
        h.update(repr(value).encode())


def weights_digest(task) -> str:
    """sha256 of the task model's state dict and its held-out data."""
    import hashlib

    h = hashlib.sha256()
    for name, t in task.model.state_dict().items():
        h.update(name.encode())
        _digest(h, t)
    for batch in task.eval_data:
        _digest(h, batch)
    return h.hexdigest()


def baseline_key(task, recipe: Recipe, weights: str | None = None) -> str:
    """The study attribute holding the baseline row: a digest of the task's weights and held-out data,
    its metric, and the recipe's device, C weight format and measuring threads and robustness (what
    the baseline row depends on; not the stages, not latency timing, which every run does anew)."""
    import hashlib
    import json

    from ..version import __version__

    weights = weights or weights_digest(task)
    rob = recipe.measure.robustness
    settings = {"edgecompress": __version__, "task": task.name, "metric": task.metric_name, "device": recipe.device,
                "c": recipe.c.model_dump(mode="json"), "threads": recipe.measure.threads,
                "robustness": rob.model_dump(mode="json") if hasattr(rob, "model_dump") else rob}
    text = weights + json.dumps(settings, sort_keys=True, default=str)
    return BASELINE_ATTR + hashlib.sha256(text.encode()).hexdigest()[:32]


class Baselines:
    """The baseline row of a trial's recipe, measured once per study: kept in this process and in the
    study's user attributes, so every worker (on any machine) and a resumed run reuse it."""

    def __init__(self, task):
        self.task, self._weights, self._rows = task, None, {}

    def get(self, study, recipe: Recipe):
        from ..pipeline import measure_baseline
        from ..report import Report

        if self._weights is None:
            self._weights = weights_digest(self.task)
        key = baseline_key(self.task, recipe, self._weights)
        if key in self._rows:
            return self._rows[key]
        row = None
        stored = study.user_attrs.get(key) if study is not None else None
        if stored is not None:
            with contextlib.suppress(ArtifactError):  # another report schema: measured again below
                row = Report.from_dict(stored, where=f"study attribute {key}").rows[0]
        if row is None:
            row = measure_baseline(self.task, recipe)
            if study is not None:
                study.set_user_attr(key, Report(self.task.name, [row]).to_dict())
        self._rows[key] = row
        return row


class Objective:
    """``study.optimize``'s function: sample, cut on structure, score short, prune, run, measure."""

    def __init__(self, space: Space, task, progress=None, workdir: Path | None = None):
        self.space, self.task, self.progress, self.workdir = space, task, progress, workdir
        self.baselines = Baselines(task)

    def _compress(self, data: dict, n: int, label: str, full: bool = True, study=None):
        """Run the recipe; a cheap run (``full`` False: the structure check or the short run) skips latency
        and the C library's instruction count, which no cut depends on."""
        from ..pipeline import compress

        recipe = Recipe.from_dict(data, source=f"trial {n}")
        baseline = self.baselines.get(study, recipe)
        if not full:
            recipe.measure.latency = recipe.measure.instructions = False
        prog = (lambda what, done, total: self.progress(f"trial {n} {label}: {what}", done, total)) \
            if self.progress else None
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            return compress(self.task, recipe, progress=prog, workdir=tmp, baseline=baseline), recipe

    def __call__(self, trial) -> tuple[float, ...]:
        import optuna

        S = optuna.trial.TrialState
        spec = self.space.spec
        try:
            data, kept = self.space.sample(trial, layer_names(self.task), flat=spec.sampler in FLAT)
            if not kept:
                self._cut(trial, "structure", "every optional stage was left out (that is the baseline)")
            data = with_epochs(data, spec.epochs)
            trial.set_user_attr("recipe", data)
            same = next((t.number for t in trial.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED))
                         if t.user_attrs.get("recipe") == data), None)
            if same is not None:  # a trial is deterministic: running the recipe again would repeat trial `same`
                self._cut(trial, "duplicate", f"the same recipe as trial {same}")
            recipe = Recipe.from_dict(data, source=f"trial {trial.number}")
            c = recipe.constraints
            structural = [k for k in STRUCTURAL if getattr(c, k) is not None]
            full = _epochs(data)
            if structural:
                result, _ = self._compress(with_epochs(data, 0), trial.number, "structure", full=False,
                                           study=trial.study)
                from ..pipeline import check

                lines = [line for line in check(result.report, recipe)
                         if line.split(":")[0] in ("flash", "RAM", "latency")]
                if lines:
                    for key, value in constraint_values(result.report, recipe, lines, structural).items():
                        trial.set_constraint(key, value)
                    v = measured(result.report, recipe)
                    if spec.sampler in FLAT and all(o in v for o in spec.objectives):
                        # NSGA-II and GP learn only from complete trials: a pruned one is invisible to them, and
                        # they would keep proposing structures over the budget. Complete, with its violated
                        # constraints and the untrained structure's numbers, it ranks below every feasible
                        # trial; to the user it is cut on structure, as with the other samplers.
                        trial.set_user_attr("rule", "structure")
                        trial.set_user_attr("cut", lines[0])
                        return tuple(v[o] for o in spec.objectives)
                    self._cut(trial, "structure", lines[0])
            metric_on = "metric" in spec.objectives
            if spec.pruner != "none" and metric_on and 0 < spec.short_epochs < full:
                result, _ = self._compress(with_epochs(data, spec.short_epochs), trial.number, "short", full=False,
                                           study=trial.study)
                v = measured(result.report, recipe)
                costs = {k: v[k] for k in spec.objectives if k != "metric" and k in v}
                trial.set_user_attr("short_costs", costs)
                why = short_verdict(trial, v["metric"], costs, spec)
                if why:
                    self._cut(trial, spec.pruner, f"{result.report.baseline.metric_name} {v['metric']:.4f} after "
                                                  f"{spec.short_epochs} epoch(s) {why}")
            result, recipe = self._compress(data, trial.number, "run", study=trial.study)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # the trial fails with its one-line reason; the search goes on
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            trial.set_user_attr("error", f"{type(e).__name__}: {reason}" if not isinstance(e, RecipeError) else reason)
            raise
        report = result.report
        values = measured(report, recipe)
        trial.set_user_attr("values", values)
        trial.set_user_attr("baseline_metric", report.baseline.metric)
        trial.set_user_attr("metric_name", report.baseline.metric_name)
        trial.set_user_attr("violations", report.violations)
        for key, value in constraint_values(report, recipe, report.violations).items():
            trial.set_constraint(key, value)
        return tuple(values[o] for o in spec.objectives)

    @staticmethod
    def _cut(trial, rule: str, reason: str) -> None:
        import optuna

        trial.set_user_attr("rule", rule)
        trial.set_user_attr("cut", reason)
        raise optuna.TrialPruned(reason)


# ---- the study ---------------------------------------------------------------------------------

def open_study(space: Space, storage, name: str, worker: int = 0, task=None):
    """Create or load the study; an existing one built from a different space is refused."""
    import optuna

    directions = [DIRECTIONS.get(o, "minimize") for o in space.spec.objectives]
    with _quiet_optuna():
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=make_sampler(space, worker, task=task), load_if_exists=True)
        known = study.user_attrs.get(SPACE_ATTR)
        if known is None:
            study.set_user_attr(SPACE_ATTR, space.fingerprint())
        elif known != space.fingerprint():
            raise RecipeError(f"{space.source}: study {name!r} already exists with a different search space "
                              "(ranges, stages or objectives); give another --study or output folder")
        done = len(study.get_trials(deepcopy=False))
        if done:
            study.sampler = make_sampler(space, worker, done, task)
    return study


def counted(study, trials: int) -> int:
    """Trials that count towards ``trials``: finished (complete, cut, or failed with a reason) or running.
    A duplicate (a recipe already run, not run again) counts only past ``trials`` of them, so that a
    sampler that proposes a recipe twice still gets its trials, and one that proposes nothing new stops."""
    import optuna

    S = optuna.trial.TrialState
    alive = [t for t in study.get_trials(deepcopy=False) if t.state in (S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING)
             or (t.state == S.FAIL and "error" in t.user_attrs)]
    dup = sum(t.user_attrs.get("rule") == "duplicate" for t in alive)
    return len(alive) - dup + max(0, dup - trials)


def run_trials(space: Space, task, storage_url_: str, name: str, *, trials: int, timeout: float | None,
               worker: int = 0, progress=None, on_trial: OnTrial | None = None, workdir: Path | None = None) -> None:
    """Run trials of the study until it holds ``trials`` counted trials or ``timeout`` seconds pass."""
    storage = open_storage(storage_url_)
    study = open_study(space, storage, name, worker, task)
    objective = Objective(space, task, progress, workdir)
    start = time.monotonic()
    with _quiet_optuna():
        while counted(study, trials) < trials and (timeout is None or time.monotonic() - start < timeout):
            study.optimize(objective, n_trials=1, catch=(Exception,))
            if on_trial is not None:
                last = max((t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
                           key=lambda t: t.datetime_complete or t.datetime_start, default=None)
                if last is not None:
                    on_trial(record(last), None)


def _worker_main(source: dict, space_source: str, url: str, name: str, trials: int, timeout: float | None,
                 worker: int, task_ref: str | None) -> None:
    """A worker process: one torch thread, its own task, the shared study."""
    import torch

    torch.set_num_threads(1)
    from ..pipeline import resolve

    space = Space.from_dict(source, source=space_source)
    task = resolve(task_ref, space.plain({p.name: p.extremes()[0] for p in space.params}))
    run_trials(space, task, url, name, trials=trials, timeout=timeout, worker=worker)


def run_workers(space: Space, raw: dict, task_ref: str | None, url: str, name: str, *, trials: int,
                timeout: float | None, workers: int, on_poll: Callable[[], None] | None = None) -> None:
    """``workers`` local processes (spawned, one torch thread each) joining one study."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(raw, space.source, url, name, trials, timeout, w, task_ref),
                         daemon=False) for w in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=2.0)
            if on_poll is not None:
                on_poll()
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        raise
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        log.warning("%d worker(s) exited with a non-zero code: %s", len(bad), bad)
