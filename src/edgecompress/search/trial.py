"""A trial as a user reads it, read back from the Optuna trial.

Each trial's user attributes hold its plain recipe, its measured values, its constraint lines, and
for a cut or failed trial the one-line reason (``objective.py`` writes them); ``front.py`` turns the
records into the result files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

