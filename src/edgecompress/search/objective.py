"""One trial, ``study.optimize``'s function: sample a plain recipe, compress it, measure it, record it.

A trial is a plain recipe (every range resolved) run through ``pipeline.compress`` and measured by
the code that measures ``edgecompress run``. Before that, at most two cheaper runs of the same recipe:

1. structure: every fine-tune at 0 epochs. Flash, RAM and estimated latency on the device depend on
   the compressed structure, not on the trained weights, so a trial over ``max_flash``, ``max_ram`` or
   ``max_latency_ms`` is cut here, before any training, and recorded with the reason
   (``structure_violations``).
2. short: every fine-tune at ``short_epochs``, its metric judged by the recipe's pruner (``pruners.py``).

The trial's user attributes hold what ``trial.py`` reads back.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import RecipeError
from ..recipe import Recipe
from ..spec import FineTune
from ..violations import Violation
from .baseline import Baselines
from .pruners import short_verdict
from .samplers import FLAT
from .space import STRUCTURAL, Space


def trainings(recipe: Recipe) -> list[tuple[int, str, FineTune]]:
    """(stage index, key, its training) of every training ``recipe`` runs: each stage's ``finetune`` and a
    distill stage's ``train`` (its default included)."""
    return [(i, key, ft) for i, st in enumerate(recipe.stages) for key in ("finetune", "train")
            if (ft := getattr(st, key, None)) is not None]


def with_epochs(recipe: Recipe, cap: int | None) -> Recipe:
    """A copy of ``recipe`` whose trainings run at most ``cap`` epochs (None: unchanged)."""
    out = recipe.model_copy(deep=True)
    for _, _, ft in trainings(out) if cap is not None else ():
        ft.epochs = min(ft.epochs, cap)
    return out


def max_epochs(recipe: Recipe) -> int:
    return max([ft.epochs for _, _, ft in trainings(recipe)] or [0])


def measured(report, recipe: Recipe) -> dict[str, float]:
    """Every objective's value from a report's last row (the device ones when the recipe names one)."""
    final = report.final
    out = {"metric": final.metric, "bytes": float(final.stored_bytes), "macs": float(final.macs)}
    dev = report.rows[-1].device
    if dev is not None:
        out.update(flash=float(dev.flash_bytes), ram=float(dev.ram_bytes), latency=dev.latency_ms_est,
                   energy=dev.energy_uj_est)
    return out


def constraint_values(report, recipe: Recipe, violations: list[Violation], keys=None) -> dict[str, float]:
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


#: the missed constraints a structure run decides: flash, RAM and estimated latency on the device
STRUCTURE_MISSES = ("max_flash", "device_flash", "max_ram", "device_ram", "max_latency_ms")


def structure_violations(report) -> list[Violation]:
    """The flash, RAM and latency misses among the records ``compress`` filled the report with."""
    return [v for v in report.violations if v.constraint in STRUCTURE_MISSES]


class Objective:
    """``study.optimize``'s function: sample, cut on structure, score short, prune, run, measure."""

    def __init__(self, space: Space, task, progress=None, workdir: Path | None = None):
        self.space, self.task, self.progress, self.workdir = space, task, progress, workdir
        self.baselines = Baselines(task)

    def _compress(self, recipe: Recipe, n: int, label: str, full: bool = True, study=None):
        """Run the recipe; a cheap run (``full`` False: the structure check or the short run) skips latency
        and the C library's instruction count, which no cut depends on."""
        from ..pipeline import compress

        recipe = recipe.model_copy(deep=True)
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
            recipe = Recipe.from_dict(data, source=f"trial {trial.number}")
            if spec.epochs is not None:  # the plain recipe says what runs: each capped training written out
                recipe = with_epochs(recipe, spec.epochs)
                for i, key, ft in trainings(recipe):
                    data["stages"][i][key] = ft.model_dump(mode="json", exclude_defaults=True)
            trial.set_user_attr("recipe", data)
            same = next((t.number for t in trial.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED))
                         if t.user_attrs.get("recipe") == data), None)
            if same is not None:  # a trial is deterministic: running the recipe again would repeat trial `same`
                self._cut(trial, "duplicate", f"the same recipe as trial {same}")
            c = recipe.constraints
            structural = [k for k in STRUCTURAL if getattr(c, k) is not None]
            full = max_epochs(recipe)
            if structural:
                result, _ = self._compress(with_epochs(recipe, 0), trial.number, "structure", full=False,
                                           study=trial.study)
                lines = structure_violations(result.report)
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
                result, _ = self._compress(with_epochs(recipe, spec.short_epochs), trial.number, "short", full=False,
                                           study=trial.study)
                v = measured(result.report, recipe)
                costs = {k: v[k] for k in spec.objectives if k != "metric" and k in v}
                trial.set_user_attr("short_costs", costs)
                why = short_verdict(trial, v["metric"], costs, spec)
                if why:
                    self._cut(trial, spec.pruner, f"{result.report.baseline.metric_name} {v['metric']:.4f} after "
                                                  f"{spec.short_epochs} epoch(s) {why}")
            result, recipe = self._compress(recipe, trial.number, "run", study=trial.study)
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
