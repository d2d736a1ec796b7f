"""The search space: an ordinary recipe in which stage fields may be ranges or choices, and whole
stages may be optional, plus the ``search:`` block (objectives, trials, sampler, budget).

    stages:
      - stage: prune
        optional: true                       # the search may leave the stage out
        sparsity: {range: [0.3, 0.9]}        # float; {range: [lo, hi], log: true, step: s}
        finetune: {epochs: {range: [1, 8]}}  # int bounds: an integer field
      - stage: quantize
        bits: {choice: [4, 6, 8]}

Every range is checked before any work: its bounds and every choice are put into the recipe one at a
time and validated as a plain recipe, so a value a field cannot take fails with that field's own message.
``sample(trial)`` resolves every range through an Optuna trial into a plain recipe dict.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from ..devices import NAMES as DEVICES
from ..errors import RecipeError
from ..recipe import Recipe, describe
from ..spec import Strict

OBJECTIVES = ("metric", "bytes", "flash", "ram", "latency", "energy", "macs")
DEVICE_OBJECTIVES = ("flash", "ram", "latency", "energy")
STRUCTURAL = ("max_flash", "max_ram", "max_latency_ms")  # known from the untrained structure
PER_LAYER = {"prune": "sparsity", "cluster": "bits"}  # per_layer: true gives each layer its own value of these
FIXED = ("stage", "name", "layers", "exclude", "per_layer", "layer_bits", "student", "teacher", "features")


class SearchSpec(Strict):
    """The ``search:`` block of a recipe."""

    objectives: list[Literal[OBJECTIVES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["metric", "bytes"], min_length=1,
        description="metric is maximised; bytes, flash, ram, latency, energy, macs are minimised")
    trials: int = Field(default=20, ge=1, le=100000, description="trials in the study (finished ones count on resume)")
    timeout: float | None = Field(default=None, gt=0, description="seconds this run may take; no new trial after")
    sampler: Literal["tpe", "nsga2", "gp", "random", "rl"] = Field(
        default="tpe", description="Optuna's samplers; rl: an AMC-style agent over the per_layer values (rl.py)")
    seed: int = Field(default=0, ge=0, description="seed of the sampler")
    epochs: int | None = Field(default=None, ge=0, le=1000,
                               description="per-trial fine-tune budget: every stage's fine-tune (and a distill "
                                           "stage's training) runs at most this many epochs")
    short_epochs: int = Field(default=1, ge=0, le=1000,
                              description="multi-fidelity: each trial is first scored after this many epochs "
                                          "per stage and the pruner stops weak ones; 0 = no short run")
    pruner: Literal["sha", "hyperband", "median", "none"] = Field(
        default="sha", description="Optuna's pruner on the short run's metric, among the trials at least as cheap: "
                                   "sha (successive halving), hyperband (successive halving in brackets that "
                                   "start later), median; none: every trial runs in full")
    reduction_factor: int = Field(default=3, ge=2, le=100, description="the pruner's eta (sha and hyperband)")
    start: list[str] = Field(default_factory=list, description="plain recipes (paths relative to this recipe's "
                             "folder) whose settings are the first trials: the search starts from what you have")
    references: bool = Field(default=False, description="also run the hand recipes shipped for the task (with this "
                                                        "device) and draw them on pareto.png")

    def check(self, source: str) -> None:
        """The rules between fields, one line each."""
        seen = [o for i, o in enumerate(self.objectives) if o in self.objectives[:i]]
        if seen:
            raise RecipeError(f"{source}: search.objectives must not repeat an objective; got {seen[0]} twice")
        if "pruner" in self.model_fields_set and self.pruner != "none":  # the default stays quiet without a short run
            if "metric" not in self.objectives:
                raise RecipeError(f"{source}: search.pruner {self.pruner} scores the short run's metric, so objectives "
                                  f"must hold metric; got [{', '.join(self.objectives)}]")
            if self.short_epochs == 0:
                raise RecipeError(f"{source}: search.pruner {self.pruner} scores the short run, so short_epochs must "
                                  "be >= 1; got 0")
        if self.pruner == "hyperband" and (self.epochs is None or self.epochs <= self.short_epochs):
            raise RecipeError(f"{source}: search.pruner hyperband needs epochs (its largest budget) above "
                              f"short_epochs {self.short_epochs}; got {self.epochs}")


class Param:
    """One range or choice at ``path`` (a list of keys into the recipe dict)."""

    def __init__(self, path: list, name: str, raw: dict, where: str):
        self.path, self.name = path, name
        extra = set(raw) - {"range", "choice", "log", "step"}
        if ("range" in raw) == ("choice" in raw) or extra:
            raise RecipeError(f"{where}: {name} must be {{range: [lo, hi]}} or {{choice: [a, b, ...]}}; got {raw!r}")
        self.choice: list | None = None
        self.log, self.step = bool(raw.get("log", False)), raw.get("step")
        if "choice" in raw:
            values = raw["choice"]
            if not isinstance(values, list) or not values:
                raise RecipeError(f"{where}: {name}.choice must be a non-empty list; got {values!r}")
            if set(raw) - {"choice"}:
                raise RecipeError(f"{where}: {name}: log and step go with range, not choice; got {raw!r}")
            self.choice = values
            return
        bounds = raw["range"]
        if (not isinstance(bounds, list) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise RecipeError(f"{where}: {name}.range must be [lo, hi] with two numbers; got {bounds!r}")
        self.lo, self.hi = bounds
        if self.lo > self.hi:
            raise RecipeError(f"{where}: {name}.range must have lo <= hi; got [{self.lo}, {self.hi}]")
        self.integer = all(isinstance(b, int) for b in bounds) and isinstance(self.step, (int, type(None)))
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, (int, float))
                                      or self.step <= 0):
            raise RecipeError(f"{where}: {name}.step must be a number > 0; got {self.step!r}")
        if self.log and (self.lo <= 0 or self.step is not None):
            raise RecipeError(f"{where}: {name}: log: true needs lo > 0 and no step; got range [{self.lo}, {self.hi}]"
                              + (f", step {self.step}" if self.step is not None else ""))

    @property
    def indexed(self) -> bool:
        """A choice among lists or mappings, which Optuna holds as the index of the choice."""
        return self.choice is not None and any(isinstance(c, (dict, list)) for c in self.choice)

    def holds(self, v: Any) -> bool:
        if self.choice is not None:
            return any(v == c and type(v) is type(c) or (isinstance(v, float) and isinstance(c, int) and v == c)
                       for c in self.choice)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.lo <= v <= self.hi:
            return False
        return not self.integer or float(v).is_integer()

    def describe(self) -> str:
        return f"the choices {self.choice!r}" if self.choice is not None else f"the range [{self.lo}, {self.hi}]"

    def extremes(self) -> list:
        return list(self.choice) if self.choice is not None else [self.lo, self.hi]

    def suggest(self, trial, name: str | None = None) -> Any:
        name = name or self.name
        if self.choice is not None:
            return self.choice[trial.suggest_categorical(name, list(range(len(self.choice))))] \
                if self.indexed else trial.suggest_categorical(name, self.choice)
        if self.integer:
            return trial.suggest_int(name, self.lo, self.hi, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.lo, self.hi, step=self.step, log=self.log)


def _start_recipe(path: str, source: str) -> dict:
    """A recipe named in search.start, relative to the search recipe's folder."""
    from ..recipe import read_yaml

    where = Path(path) if Path(path).is_absolute() or not os.path.isfile(source) else Path(source).parent / path
    data = read_yaml(where)
    if isinstance(data, dict) and "search" in data:
        raise RecipeError(f"{source}: search.start must name plain recipes; {path} is a search space")
    return data


def _name(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _is_param(v: Any) -> bool:
    return isinstance(v, dict) and ("range" in v or "choice" in v)


def _set(data: Any, path: list, value: Any) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


class Space:
    """A recipe template with ranges, which stages are optional, and the search block."""

    def __init__(self, template: dict, params: list[Param], optional: list[int], spec: SearchSpec, source: str,
                 per_layer: dict[int, str] | None = None):
        self.template, self.params, self.optional, self.spec, self.source = template, params, optional, spec, source
        self.per_layer = per_layer or {}  # stage index -> the field that gets one value per layer
        self.start: list[dict[str, Any]] = []  # trial parameters of the recipes in search.start

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Space:
        from ..recipe import read_yaml

        return cls.from_dict(read_yaml(path), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Space:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping of keys to values; got {type(data).__name__}")
        data = copy.deepcopy(data)
        block = data.pop("search", None)
        if block is None:
            raise RecipeError(f"{source}: search is required to search (objectives, trials, sampler); got none")
        try:
            spec = SearchSpec.model_validate(block)
        except ValidationError as e:
            raise RecipeError(f"{source}: search.{describe(e.errors()[0])}") from None
        spec.check(source)
        for key, value in data.items():
            if key != "stages" and (_is_param(value) or (isinstance(value, dict) and any(map(_is_param, value.values())))):
                raise RecipeError(f"{source}: {key} cannot vary in a search (only stage fields can); got {value!r}")
        params: list[Param] = []
        optional: list[int] = []
        per_layer: dict[int, str] = {}
        stages = data.get("stages")
        if isinstance(stages, list):
            for i, st in enumerate(stages):
                if not isinstance(st, dict):
                    continue
                opt = st.pop("optional", False)
                if not isinstance(opt, bool):
                    raise RecipeError(f"{source}: stages[{i}].optional must be true or false; got {opt!r}")
                if opt:
                    optional.append(i)
                if st.get("per_layer") is True:  # a search mode, not prune's per_layer mapping
                    del st["per_layer"]
                    key = PER_LAYER.get(st.get("stage"))
                    if key is None or not _is_param(st.get(key)):
                        raise RecipeError(f"{source}: stages[{i}].per_layer: true needs a prune stage with a "
                                          "sparsity range or a cluster stage with a bits range or choice; got "
                                          f"stage {st.get('stage')!r}")
                    per_layer[i] = key
                cls._collect(st, ["stages", i], params, source)
        if spec.sampler == "rl" and not per_layer:
            raise RecipeError(f"{source}: search.sampler rl chooses one value per layer, so a stage needs per_layer: "
                              "true (a prune stage with a sparsity range or a cluster stage with a bits range or "
                              "choice); got none")
        space = cls(data, params, optional, spec, source, per_layer)
        space._validate()
        space.start = [space.params_of(_start_recipe(path, source), f"{source}: search.start[{k}] ({path})")
                       for k, path in enumerate(spec.start)]
        return space

    @classmethod
    def _collect(cls, node: dict, path: list, params: list[Param], source: str) -> None:
        for key, value in node.items():
            here = path + [key]
            if _is_param(value):
                if key in FIXED:
                    raise RecipeError(f"{source}: {_name(here)} cannot vary in a search (it names what to work "
                                      f"on, not how much); got {value!r}")
                params.append(Param(here, _name(here), value, source))
            elif isinstance(value, dict):
                cls._collect(value, here, params, source)

    def _validate(self) -> None:
        """Each bound and choice of each range, the others at their first value, must make a valid recipe."""
        first = {p.name: p.extremes()[0] for p in self.params}
        self.plain(first)
        for p in self.params:
            for value in p.extremes()[1:]:
                self.plain({**first, p.name: value})
        recipe = self.plain(first)
        dev = [o for o in self.spec.objectives if o in DEVICE_OBJECTIVES]
        if recipe.device is None and dev:
            raise RecipeError(f"{self.source}: search.objectives {dev[0]} needs a device (device: one of "
                              f"{', '.join(DEVICES)}); got none")
        for key in STRUCTURAL:
            if recipe.device is None and getattr(recipe.constraints, key) is not None:
                raise RecipeError(f"{self.source}: constraints.{key} needs a device (device: one of "
                                  f"{', '.join(DEVICES)}); got none")

    def params_of(self, plain: dict, where: str) -> dict[str, Any]:
        """The trial parameters under which this space runs the plain recipe ``plain`` (for Optuna's
        ``enqueue_trial``): its stages, in order, each matched to the first stage of the space left that
        has the same kind and fixed fields and whose ranges hold its values; the optional stages between
        them left out. The recipe's own name, constraints, device and export do not matter."""
        if self.per_layer:
            raise RecipeError(f"{where}: a search with per_layer: true stages cannot start from a recipe; got "
                              f"stages[{min(self.per_layer)}].per_layer: true")
        want = Recipe.from_dict(plain, source=where).stages
        first = {p.name: p.extremes()[0] for p in self.params}
        params: dict[str, Any] = {}
        j, why = 0, []  # why: the stages of the space that stages[j] did not fit, and why not
        for i, st in enumerate(self.template["stages"]):
            fit, reason = (None, "") if j >= len(want) else self._fit(i, want[j], first)
            if fit is not None:
                params.update({f"stages[{i}].enabled": True} if i in self.optional else {}, **fit)
                j, why = j + 1, []
                continue
            if reason:
                why.append(f"stages[{i}]: {reason}")
            if i not in self.optional:
                raise RecipeError(f"{where}: " + (f"stages[{j}] ({want[j].stage}) does not fit the space's "
                                                  f"{'; '.join(why)}" if why else
                                                  f"it has no stage for the space's stages[{i}] ({st.get('stage')}), "
                                                  "which is not optional"))
            params[f"stages[{i}].enabled"] = False
        if j < len(want):
            raise RecipeError(f"{where}: stages[{j}] ({want[j].stage}) fits no stage of the space left"
                              + (f" ({'; '.join(why)})" if why else ""))
        return params

    def _fit(self, i: int, stage, first: dict) -> tuple[dict | None, str]:
        """The trial parameters of stage ``i`` that make it ``stage`` (a parsed plain stage), or None and why not."""
        if stage.stage != self.template["stages"][i].get("stage"):
            return None, ""
        have = stage.model_dump()
        values, params = {}, {}
        for p in (p for p in self.params if p.path[1] == i):
            v = have
            for key in p.path[2:]:
                v = v.get(key) if isinstance(v, dict) else None
            if not p.holds(v):
                return None, f"{_name(p.path[2:])} {v!r} is outside {p.describe()}"
            values[p.name] = v
            params[p.name] = p.choice.index(v) if p.indexed else v
        ours = self.plain({**first, **values}, {i}).stages[0].model_dump()
        ours["name"] = have["name"]
        if ours != have:
            key = next(k for k in have if ours.get(k) != have[k])
            return None, f"{key} is {have[key]!r}, the space's is {ours.get(key)!r}"
        return params, ""

    def plain(self, values: dict[str, Any], keep: set[int] | None = None, source: str | None = None) -> Recipe:
        """The plain recipe with each range at ``values[name]`` and only the stages in ``keep``."""
        return Recipe.from_dict(self.plain_dict(values, keep), source=source or self.source)

    def plain_dict(self, values: dict[str, Any], keep: set[int] | None = None) -> dict:
        data = copy.deepcopy(self.template)
        for p in self.params:
            _set(data, p.path, values[p.name])
        if keep is not None and isinstance(data.get("stages"), list):
            data["stages"] = [s for i, s in enumerate(data["stages"]) if i in keep]
        return data

    def sample(self, trial, layers: Callable[[dict], list[str]] | None = None,
               flat: bool = False) -> tuple[dict, list[int]]:
        """A plain recipe dict (ranges resolved through ``trial``) and the indices of the stages kept.
        ``layers(stage)`` names the layers a per-layer stage gives one value each. ``flat`` suggests
        every field of every stage, kept or not, so that each trial has the same parameters: samplers
        that work on the intersection of the trials' spaces (NSGA-II, GP) otherwise evolve only the
        stages' on/off switches and draw every field of an optional stage at random."""
        keep = {i for i in range(len(self.template["stages"]))
                if i not in self.optional or trial.suggest_categorical(f"stages[{i}].enabled", [True, False])}
        sampled = set(range(len(self.template["stages"]))) if flat else keep
        mode = {p.name: self.per_layer[p.path[1]] for p in self.params
                if p.path[1] in self.per_layer and p.path[2:] == [self.per_layer[p.path[1]]]}
        drawn = {p.name: (p.path[1], p.suggest(trial)) for p in self.params
                 if p.path[1] in sampled and p.name not in mode}
        values = {name: v for name, (i, v) in drawn.items() if i in keep}  # a stage left out takes no value
        values.update({p.name: p.extremes()[0] for p in self.params if p.name not in values})
        data = self.plain_dict(values, None)
        for p in self.params:
            i = p.path[1]
            if p.name not in mode or i not in sampled:
                continue
            if layers is None:
                raise RecipeError(f"{self.source}: stages[{i}].per_layer: true needs the task's model to name layers")
            st = data["stages"][i]
            field = "per_layer" if st["stage"] == "prune" else "layer_bits"
            chosen = {n: p.suggest(trial, f"stages[{i}].{field}.{n}") for n in layers(st)}
            if i not in keep:
                continue
            st[field] = chosen
            if chosen and st["stage"] == "prune":  # layers not named (none here) would take the mean
                st["sparsity"] = round(sum(chosen.values()) / len(chosen), 6)
            elif chosen:
                st["bits"] = max(chosen.values())
        data["stages"] = [s for j, s in enumerate(data["stages"]) if j in keep]
        return data, sorted(keep)

    def fingerprint(self) -> str:
        """What makes two searches the same study: the template, the ranges, the objectives and the epoch
        budget (what a trial runs and how it is scored), not how trials are proposed or how many."""
        spec = self.spec.model_dump(include={"objectives", "epochs"})
        return json.dumps({"template": self.template, "params": {p.name: p.extremes() if p.choice is not None else
                                                                 [p.lo, p.hi, p.log, p.step] for p in self.params},
                           "optional": self.optional, "per_layer": self.per_layer, "search": spec},
                          sort_keys=True, default=str)
