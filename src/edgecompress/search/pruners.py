"""Cutting a trial on its short run: every fine-tune at ``short_epochs``, its metric reported to the
recipe's Optuna pruner (``sha``: successive halving, cut when not in the top 1/eta; ``hyperband``: the
same within the trial's Hyperband bracket, where only bracket 0 checks at the short run and the others
run in full; ``median``: cut below the median), which compares it with the trials at least as cheap as
it (on every cost objective, from the same short run) only: a cheap trial is never cut for losing to a
bigger one, so the Pareto front keeps its small end."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from .space import STRUCTURAL, Space


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
