"""Search: the space and its validation, the study in SQLite (resumable), cut and failed trials, the
front files, and a front member replayed by compress with the same numbers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import edgecompress as ec
from edgecompress.devices import NAMES
from edgecompress.search import Space
from edgecompress.search.storage import open_storage, open_study

SPACE = """version: 1
task: digits-lenet300
seed: 0
stages:
  - stage: prune
    sparsity: {range: [0.5, 0.95]}
    finetune: {epochs: {choice: [0, 1]}}
export: [onnx]
measure: {latency: false}
constraints: {max_metric_drop: 0.05}
search: {objectives: [metric, bytes], trials: 3, sampler: random, seed: 0, short_epochs: 0}
"""


def space_dict(**search) -> dict:
    data = yaml.safe_load(SPACE)
    data["search"].update(search)
    return data


DEVICES = ", ".join(NAMES)


def stage(**fields):
    return lambda d: d["stages"][0].update(fields)


def top(**fields):
    return lambda d: d.update(fields)


def search(**fields):
    return lambda d: d["search"].update(fields)


BAD = {
    "lo > hi": (stage(sparsity={"range": [0.9, 0.5]}),
                "r.yaml: stages[0].sparsity.range must have lo <= hi; got [0.9, 0.5]"),
    "empty choice": (stage(sparsity={"choice": []}), "r.yaml: stages[0].sparsity.choice must be a non-empty list; got []"),
    "fixed field": (stage(layers={"choice": [["fc1"], ["fc2"]]}),
                    "r.yaml: stages[0].layers cannot vary in a search (it names what to work on, not how much); "
                    "got {'choice': [['fc1'], ['fc2']]}"),
    "top-level field": (top(device={"choice": ["cortex-m4", "rpi4"]}),
                        "r.yaml: device cannot vary in a search (only stage fields can); "
                        "got {'choice': ['cortex-m4', 'rpi4']}"),
    "value the field refuses": (stage(criterion={"range": [0, 1]}),
                                "r.yaml: stages[0].criterion must be one of magnitude, taylor, activation, random; got 0"),
    "bound the field refuses": (stage(sparsity={"range": [0.5, 1.5]}),
                                "r.yaml: stages[0].sparsity must be < 1.0; got 1.5"),
    "unknown objective": (search(objectives=["metric", "size"]),
                          "r.yaml: search.objectives[1] must be one of metric, bytes, flash, ram, latency, energy, "
                          "macs; got 'size'"),
    "device objective": (search(objectives=["metric", "flash"]),
                         f"r.yaml: search.objectives flash needs a device (device: one of {DEVICES}); got none"),
    "device constraint": (top(constraints={"max_ram": 8192}),
                          f"r.yaml: constraints.max_ram needs a device (device: one of {DEVICES}); got none"),
    "log without positive lo": (stage(sparsity={"range": [0.0, 0.9], "log": True}),
                                "r.yaml: stages[0].sparsity: log: true needs lo > 0 and no step; got range [0.0, 0.9]"),
    "unknown search key": (search(trails=3), "r.yaml: search.trails is not a known key; got 3"),
    "repeated objective": (search(objectives=["metric", "bytes", "metric"]),
                           "r.yaml: search.objectives must not repeat an objective; got metric twice"),
    "unknown pruner": (search(pruner="asha"), "r.yaml: search.pruner must be one of sha, hyperband, median, none; "
                                              "got 'asha'"),
    "pruner without metric": (search(objectives=["bytes", "macs"], pruner="sha", short_epochs=1),
                              "r.yaml: search.pruner sha scores the short run's metric, so objectives must hold "
                              "metric; got [bytes, macs]"),
    "pruner without short run": (search(pruner="median"), "r.yaml: search.pruner median scores the short run, so "
                                                          "short_epochs must be >= 1; got 0"),
    "hyperband without epochs": (search(pruner="hyperband", short_epochs=2),
                                 "r.yaml: search.pruner hyperband needs epochs (its largest budget) above "
                                 "short_epochs 2; got None"),
    "hyperband epochs not above": (search(pruner="hyperband", short_epochs=2, epochs=2),
                                   "r.yaml: search.pruner hyperband needs epochs (its largest budget) above "
                                   "short_epochs 2; got 2"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_space_gives_one_line(case):
    edit, message = BAD[case]
    d = space_dict()
    edit(d)
    with pytest.raises(ec.RecipeError) as e:
        Space.from_dict(d, source="r.yaml")
    assert str(e.value) == message


def test_shipped_search_recipes_load_as_spaces():
    shipped = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    spaces = [Space.from_yaml(p) for p in shipped if "search" in yaml.safe_load(p.read_text())]
    assert [s.source.rsplit("/", 1)[-1] for s in spaces] == ["search-mnist1d-m4.yaml"]
    assert [p.name for p in spaces[0].params] == [
        "stages[0].train.epochs", "stages[1].sparsity", "stages[1].finetune.epochs", "stages[1].finetune.distill.alpha",
        "stages[2].keep_output", "stages[2].sparsity", "stages[2].finetune.epochs", "stages[2].finetune.lr",
        "stages[2].finetune.distill.alpha", "stages[3].bits", "stages[3].finetune.epochs",
        "stages[3].finetune.distill.alpha", "stages[4].bits"]


def test_run_refuses_a_search_recipe(tmp_path):
    from typer.testing import CliRunner

    from edgecompress.cli import app

    p = tmp_path / "r.yaml"
    p.write_text(SPACE)
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert f"{p}: search: this recipe is a search space; run it with `edgecompress search {p}`" in r.output
    assert not (tmp_path / "out").exists()


def test_unreachable_storage_names_host_and_port():
    with pytest.raises(ec.RecipeError) as e:
        open_storage("postgresql://nobody@127.0.0.1:9/edgecompress")
    assert str(e.value).startswith("--storage: cannot reach 127.0.0.1:9: connection to server at \"127.0.0.1\", "
                                   "port 9 failed: Connection refused")
    assert "\n" not in str(e.value)


def test_existing_study_with_another_space_is_refused(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    open_study(Space.from_dict(space_dict(), source="a.yaml"), storage, "s")
    other = space_dict()
    other["stages"][0]["sparsity"] = {"range": [0.5, 0.9]}
    with pytest.raises(ec.RecipeError) as e:
        open_study(Space.from_dict(other, source="b.yaml"), storage, "s")
    assert str(e.value) == ("b.yaml: study 's' already exists with a different search space (ranges, stages or "
                            "objectives); give another --study or output folder")
    open_study(Space.from_dict(space_dict(trials=9), source="c.yaml"), storage, "s")  # trials may change


def test_sample_resolves_every_range_and_optional_stage():
    import optuna

    d = space_dict()
    d["stages"].append({"stage": "quantize", "mode": "dynamic", "optional": True})
    space = Space.from_dict(d)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        data, kept = space.sample(trial)
        r = ec.Recipe.from_dict(data)  # a plain recipe: no range left
        assert 0.5 <= r.stages[0].sparsity <= 0.95 and r.stages[0].finetune.epochs in (0, 1)
        assert [s.stage for s in r.stages] == ["prune", "quantize"][:len(kept)]
        seen.add(len(kept))
    assert seen == {1, 2}


def test_flat_sampling_gives_every_trial_the_same_parameters_so_nsga2_evolves_the_fields():
    import optuna

    d = space_dict()
    d["stages"][0]["optional"] = True
    d["stages"].append({"stage": "cluster", "bits": {"choice": [4, 5, 6]}, "optional": True})
    space = Space.from_dict(d)
    names = {"stages[0].enabled", "stages[0].sparsity", "stages[0].finetune.epochs", "stages[1].enabled",
             "stages[1].bits"}
    for flat in (False, True):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4))
        dropped = 0
        for i in range(12):
            trial = study.ask()
            data, kept = space.sample(trial, flat=flat)
            if kept:  # with none kept the search cuts the trial (it is the baseline)
                r = ec.Recipe.from_dict(data)
                assert [s.stage for s in r.stages] == [["prune", "cluster"][k] for k in kept]
            assert (set(trial.params) == names) if flat else (set(trial.params) <= names)
            dropped += len(kept) < 2
            study.tell(trial, [0.5 + 0.01 * i, 100.0 - i])
        # every field is in the space NSGA-II crosses over only when every trial has it
        evolved = set(optuna.search_space.IntersectionSearchSpace().calculate(study))
        assert evolved == (names if flat else {"stages[0].enabled", "stages[1].enabled"}) and dropped > 0


def test_search_sqlite_front_files_replay_and_resume(tmp_path, task):
    t = task("digits-lenet300")
    out = tmp_path / "out"
    seen = []
    res = ec.search("digits-lenet300", space_dict(trials=2), out=out, study="s",
                    on_trial=lambda rec, _: seen.append(rec.number))
    assert seen == [0, 1] and [r.state for r in res.trials] == ["complete", "complete"]
    assert sorted(p.name for p in out.iterdir()) == ["best.yaml", "pareto", "pareto.png", "search.html",
                                                    "search.json", "search.md", "study.db"]
    summary = json.loads((out / "search.json").read_text())
    assert summary["counts"] == {"trials": 2, "complete": 2, "feasible": len([r for r in res.trials if r.feasible]),
                                 "cut": 0, "failed": 0, "running": 0}
    assert [f["number"] for f in summary["front"]] == [r.number for r in res.front]
    assert res.best is not None and res.best.values["metric"] == max(r.values["metric"] for r in res.trials if r.feasible)
    member = res.front[-1]  # a front member is a plain recipe: run reproduces its numbers
    assert (out / "best.yaml").read_text().split("\n", 1)[1] == \
        (out / "pareto" / f"trial-{res.best.number}.yaml").read_text().split("\n", 2)[2]
    replay = ec.compress(t, ec.Recipe.from_yaml(out / "pareto" / f"trial-{member.number}.yaml")).report.final
    assert replay.metric == member.values["metric"]
    assert replay.stored_bytes == member.values["bytes"]
    first = {r.number: r.values for r in res.trials}
    # the same search again with one more trial: the two finished trials are kept, one new one runs
    res2 = ec.search("digits-lenet300", space_dict(trials=2), out=out, study="s", trials=3)
    assert [r.number for r in res2.trials] == [0, 1, 2]
    assert {r.number: r.values for r in res2.trials[:2]} == first
    assert res2.trials[2].recipe not in [r.recipe for r in res.trials]  # the resumed sampler does not replay
    assert json.loads((out / "search.json").read_text())["counts"]["trials"] == 3


def test_start_maps_a_hand_recipe_onto_the_shipped_space_exactly():
    import optuna

    recipes = Path(ec.__file__).parent / "recipes"
    raw = yaml.safe_load((recipes / "search-mnist1d-m4.yaml").read_text())
    raw["search"]["start"] = ["mnist1d-cortex-m4.yaml", "int8-cortex-m4.yaml"]
    space = Space.from_dict(raw, source=str(recipes / "search-mnist1d-m4.yaml"))
    assert space.start[0] == {
        "stages[0].enabled": False, "stages[1].enabled": False, "stages[2].enabled": True,
        "stages[2].keep_output": False, "stages[2].sparsity": 0.8, "stages[2].finetune.epochs": 40,
        "stages[2].finetune.lr": 0.001, "stages[2].finetune.distill.alpha": 0.9, "stages[3].enabled": True,
        "stages[3].bits": 5, "stages[3].finetune.epochs": 10, "stages[3].finetune.distill.alpha": 0.9,
        "stages[4].enabled": False}
    for params, name in zip(space.start, ["mnist1d-cortex-m4.yaml", "int8-cortex-m4.yaml"]):
        data, _ = space.sample(optuna.trial.FixedTrial(params))  # the trial the study runs first
        ours, hand = ec.Recipe.from_dict(data), ec.Recipe.from_yaml(recipes / name)
        strip = [{k: v for k, v in s.model_dump().items() if k != "name"} for s in hand.stages]
        assert [{k: v for k, v in s.model_dump().items() if k != "name"} for s in ours.stages] == strip


def test_start_refuses_a_recipe_outside_the_space_in_one_line(tmp_path):
    (tmp_path / "hand.yaml").write_text("version: 1\ntask: digits-lenet300\nstages:\n"
                                        "  - {stage: prune, sparsity: 0.3, finetune: {epochs: 1}}\n")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space_dict(start=["hand.yaml"])))
    with pytest.raises(ec.RecipeError) as e:
        Space.from_yaml(tmp_path / "space.yaml")
    assert str(e.value) == (f"{tmp_path / 'space.yaml'}: search.start[0] (hand.yaml): stages[0] (prune) does not "
                            "fit the space's stages[0]: sparsity 0.3 is outside the range [0.5, 0.95]")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space_dict(start=["gone.yaml"])))
    with pytest.raises(ec.RecipeError) as e:
        Space.from_yaml(tmp_path / "space.yaml")
    assert str(e.value) == f"{tmp_path / 'gone.yaml'}: no such recipe file"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space_dict(start=["space.yaml"])))
    with pytest.raises(ec.RecipeError) as e:
        Space.from_yaml(tmp_path / "space.yaml")
    assert str(e.value) == f"{tmp_path / 'space.yaml'}: search.start must name plain recipes; space.yaml is a search space"


def test_search_runs_the_start_recipe_first_and_once(tmp_path, task):
    task("digits-lenet300")
    (tmp_path / "hand.yaml").write_text("version: 1\ntask: digits-lenet300\nseed: 0\nstages:\n"
                                        "  - {stage: prune, sparsity: 0.9, finetune: {epochs: 1}}\nexport: [onnx]\n")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space_dict(trials=2, start=["hand.yaml"])))
    res = ec.search("digits-lenet300", tmp_path / "space.yaml", out=tmp_path / "out", study="s")
    assert [r.number for r in res.trials] == [0, 1]
    assert res.trials[0].recipe["stages"][0]["sparsity"] == 0.9 and res.trials[1].recipe["stages"][0]["sparsity"] != 0.9
    hand = ec.compress("digits-lenet300", ec.Recipe.from_yaml(tmp_path / "hand.yaml")).report.final
    assert res.trials[0].values["metric"] == hand.metric and res.trials[0].values["bytes"] == hand.stored_bytes
    res2 = ec.search("digits-lenet300", tmp_path / "space.yaml", out=tmp_path / "out", study="s", trials=3)
    assert [r.recipe["stages"][0]["sparsity"] for r in res2.trials].count(0.9) == 1  # resumed: not run again


def test_a_recipe_already_run_is_not_run_again_and_counts_only_past_the_trial_budget(tmp_path, task):
    task("digits-lenet300")
    d = space_dict(trials=2)
    d["stages"][0].update(sparsity={"choice": [0.5]}, finetune={"epochs": 0})  # one recipe only
    res = ec.search("digits-lenet300", d, out=tmp_path / "out", study="s")
    assert [(r.state, r.rule, r.reason) for r in res.trials] == [("complete", "", "")] + \
        [("cut", "duplicate", "the same recipe as trial 0")] * 3  # stops after 2 duplicates past the budget
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert summary["cut_by_rule"] == {"duplicate": 3}


def test_failed_trial_is_recorded_with_its_reason_and_the_search_goes_on(tmp_path, monkeypatch, task):
    task("digits-lenet300")
    from edgecompress.techniques import TECHNIQUES

    spec_cls, apply = TECHNIQUES["prune"]
    calls = []

    def flaky(model, spec, ctx):  # the second trial's stage raises
        calls.append(spec.sparsity)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the pruning kernel\nsecond line")
        return apply(model, spec, ctx)

    monkeypatch.setitem(TECHNIQUES, "prune", (spec_cls, flaky))
    d = space_dict(trials=2)
    d["stages"][0]["finetune"] = {"epochs": 0}
    res = ec.search("digits-lenet300", d, out=tmp_path / "out", study="s")
    assert [(r.number, r.state, r.reason) for r in res.trials] == [
        (0, "complete", ""), (1, "failed", "RuntimeError: out of memory in the pruning kernel")]
    assert res.trials[1].recipe["stages"][0]["sparsity"] == calls[1]
    md = (tmp_path / "out" / "search.md").read_text()
    assert "| failed | error | RuntimeError: out of memory in the pruning kernel |" in md


def test_pruner_cuts_only_against_trials_at_least_as_cheap():
    import optuna

    from edgecompress.search.pruners import _CheaperView

    study = optuna.create_study(directions=["maximize", "minimize"])
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)

    def trial(metric: float, bytes_: float) -> bool:
        t = study.ask()
        t.set_user_attr("short_costs", {"bytes": bytes_})
        t.set_user_attr("short_metric", metric)
        view = _CheaperView(study, t.number, {"bytes": bytes_}, 1)
        cut = pruner.prune(view, view.scored(study._storage.get_trial(t._trial_id)))
        study.tell(t, state=optuna.trial.TrialState.PRUNED if cut else None, values=None if cut else [metric, bytes_])
        return cut

    assert trial(0.90, 1000) is False  # nothing to compare with
    assert trial(0.80, 500) is False  # worse but cheaper: on the front's small end, kept
    assert trial(0.85, 2000) is True  # worse than a cheaper trial: cut
    assert trial(0.95, 2000) is False  # better than every cheaper one


def test_tpe_samples_a_multi_objective_study_after_the_pruner_cut_a_trial():
    """Optuna's multi-objective TPE cannot rank a pruned trial that has an intermediate value; the
    short run's metric lives in user attributes, so the trials after a cut are sampled normally."""
    import optuna

    from edgecompress.search.space import SearchSpec
    from edgecompress.search.pruners import short_verdict

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.TPESampler(n_startup_trials=3, seed=0))
    spec = SearchSpec(objectives=["metric", "bytes"], short_epochs=1, epochs=4, pruner="sha")
    for metric in (0.9, 0.92, 0.5, 0.4):
        t = study.ask()
        size = t.suggest_float("sparsity", 0.1, 0.9)
        t.set_user_attr("short_costs", {"bytes": 1000.0})
        why = short_verdict(t, metric, {"bytes": 1000.0}, spec)
        study.tell(t, state=optuna.trial.TrialState.PRUNED if why else None, values=None if why else [metric, size])
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    assert all(not t.intermediate_values for t in study.trials)
    t = study.ask()  # TPE's model-based sampling with pruned trials in the study
    assert 0.1 <= t.suggest_float("sparsity", 0.1, 0.9) <= 0.9


def test_trial_over_the_flash_budget_is_cut_before_any_training(tmp_path, task):
    task("mnist1d-cnn")
    d = {"version": 1, "task": "mnist1d-cnn", "device": "cortex-m4", "seed": 0,
         "stages": [{"stage": "prune", "sparsity": 0.3, "finetune": {"epochs": 1}},
                    {"stage": "quantize", "mode": "static", "bits": {"choice": [4, 8]}, "reduce_range": False,
                     "keep_slow_float": False}],
         "constraints": {"max_flash": 25000}, "measure": {"latency": False}, "export": ["onnx"],
         "search": {"objectives": ["metric", "flash"], "trials": 2, "sampler": "random", "seed": 2, "short_epochs": 0}}
    labels = []
    res = ec.search(None, d, out=tmp_path / "out", study="s", progress=lambda label, done, total: labels.append(label))
    cut, kept = res.trials
    assert cut.recipe["stages"][1]["bits"] == 8 and kept.recipe["stages"][1]["bits"] == 4
    assert (cut.state, cut.rule) == ("cut", "structure")
    m = re.fullmatch(r"flash: ([\d,]+) bytes \(C library for cortex-m4 \(arm-none-eabi-size text\+data\)\) exceed "
                     r"max_flash 25,000 by ([\d,]+) bytes; largest weights: (\w+) ([\d,]+) B, (\w+) ([\d,]+) B, "
                     r"(\w+) ([\d,]+) B", cut.reason)
    assert m, cut.reason  # each layer's bytes follow its format, chosen on the trained weights' zeros
    names, sizes = m.group(3, 5, 7), [int(v.replace(",", "")) for v in m.group(4, 6, 8)]
    assert set(names) <= {"conv1", "conv2", "conv3", "fc"} and len(set(names)) == 3
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) < int(m[1].replace(",", ""))
    flash = int(m[1].replace(",", ""))
    assert flash > 25000 and int(m[2].replace(",", "")) == flash - 25000
    assert not any(label.startswith("trial 0") and "fine-tune" in label for label in labels)  # never trained
    assert any(label.startswith("trial 1 run") and "fine-tune" in label for label in labels)
    assert kept.state == "complete" and kept.values["flash"] <= 25000 and res.front == [kept]
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert summary["cut_by_rule"] == {"structure": 1}


def test_nsga2_sees_a_trial_cut_on_structure_as_complete_and_infeasible_and_the_user_sees_it_cut(tmp_path, task):
    import optuna
    from optuna.study._constrained_optimization import _get_constraints_from_system_attrs as constraints

    task("mnist1d-cnn")
    d = {"version": 1, "task": "mnist1d-cnn", "device": "cortex-m4", "seed": 0,
         "stages": [{"stage": "prune", "sparsity": {"range": [0.2, 0.4]}, "finetune": {"epochs": 0}},
                    {"stage": "quantize", "mode": "static", "bits": {"choice": [4, 8]}, "reduce_range": False,
                     "keep_slow_float": False}],
         "constraints": {"max_flash": 25000}, "measure": {"latency": False}, "export": ["onnx"],
         "search": {"objectives": ["metric", "flash"], "trials": 4, "sampler": "nsga2", "seed": 1, "short_epochs": 0}}
    res = ec.search(None, d, out=tmp_path / "out", study="s")
    frozen = {t.number: t for t in res.study.get_trials()}
    cut = [r for r in res.trials if r.state == "cut"]
    assert cut and all(r.recipe["stages"][1]["bits"] == 8 and r.rule == "structure" for r in cut)
    for r in cut:  # NSGA-II ranks it by its violation, below every feasible trial
        t = frozen[r.number]
        assert t.state == optuna.trial.TrialState.COMPLETE and max(constraints(t.system_attrs).values()) > 0
        assert t.values[1] > 25000 and r.reason.startswith("flash: ")
    assert res.front and all(r.recipe["stages"][1]["bits"] == 4 and r.state == "complete" for r in res.front)
    assert json.loads((tmp_path / "out" / "search.json").read_text())["cut_by_rule"] == {"structure": len(cut)}


def test_per_layer_gives_each_layer_its_own_ratio(task):
    import optuna

    from edgecompress.search.objective import layer_names

    d = space_dict()
    d["stages"][0]["per_layer"] = True
    d["stages"].append({"stage": "cluster", "bits": {"choice": [3, 4, 5]}, "per_layer": True})
    space = Space.from_dict(d)
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    data, _ = space.sample(trial, layer_names(task("digits-lenet300")))
    prune, cluster = data["stages"]
    assert sorted(prune["per_layer"]) == ["fc1", "fc2"]  # the classifier fc3 is left whole
    assert all(0.5 <= v <= 0.95 for v in prune["per_layer"].values())
    assert sorted(cluster["layer_bits"]) == ["fc1", "fc2", "fc3"] and cluster["bits"] == max(cluster["layer_bits"].values())
    assert sorted(trial.params) == ["stages[0].finetune.epochs", "stages[0].per_layer.fc1", "stages[0].per_layer.fc2",
                                    "stages[1].layer_bits.fc1", "stages[1].layer_bits.fc2", "stages[1].layer_bits.fc3"]
    ec.Recipe.from_dict(data)  # a plain recipe
    d["stages"][0]["per_layer"] = True
    d["stages"][0]["criterion"] = "taylor"
    d["stages"].append({"stage": "quantize", "per_layer": True})
    with pytest.raises(ec.RecipeError) as e:
        Space.from_dict(d, source="r.yaml")
    assert str(e.value) == ("r.yaml: stages[2].per_layer: true needs a prune stage with a sparsity range or a cluster "
                            "stage with a bits range or choice; got stage 'quantize'")


def test_cli_search_json(tmp_path, task):
    from typer.testing import CliRunner

    from edgecompress.cli import app

    task("digits-lenet300")
    p = tmp_path / "r.yaml"
    p.write_text(SPACE.replace("finetune: {epochs: {choice: [0, 1]}}", "finetune: {epochs: 0}"))
    r = CliRunner().invoke(app, ["search", str(p), "-o", str(tmp_path / "out"), "--trials", "1", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["study"] == "r" and summary["counts"]["trials"] == 1 and summary["objectives"] == ["metric", "bytes"]
    assert summary == json.loads((tmp_path / "out" / "search.json").read_text())


def test_search_html_shows_the_front_and_the_trials_over_time(tmp_path):
    """search.html: one self-contained page; a front and trials over time drawn, or a line in their place."""
    from types import SimpleNamespace

    from edgecompress.search import front
    from edgecompress.search.trial import TrialRecord

    recs = [TrialRecord(0, "complete", values={"metric": 0.90, "flash": 9000.0}, metric_name="accuracy"),
            TrialRecord(1, "cut", reason="flash: 40,000 bytes exceed max_flash 32,768", rule="structure"),
            TrialRecord(2, "complete", values={"metric": 0.93, "flash": 20000.0}, metric_name="accuracy"),
            TrialRecord(3, "complete", values={"metric": 0.89, "flash": 15000.0}, metric_name="accuracy")]
    result = SimpleNamespace(task_name="mnist1d-cnn", study_name="s", storage="sqlite", objectives=["metric", "flash"],
                             trials=recs, references=[])
    result.front = front.pareto_front(recs, result.objectives)
    result.best = front.best_trial(recs, result.objectives)
    assert [r.number for r in result.front] == [2, 0]
    page = front.to_html(result)
    assert page.count("<svg") == 2 and "<script" not in page and "http" not in page.replace("http://www.w3.org", "")
    assert "4 trials, 3 complete (3 feasible), 1 cut, 0 failed" in page
    assert "pareto/trial-2.yaml" in page and "flash: 40,000 bytes exceed max_flash 32,768" in page
    empty = SimpleNamespace(**{**vars(result), "trials": recs[1:2], "front": [], "best": None})
    page = front.to_html(empty)
    assert page.count("<svg") == 0 and "No complete trial yet." in page


def test_compress_with_a_measured_baseline_reports_what_run_reports(task):
    from edgecompress.pipeline import measure_baseline

    t = task("digits-lenet300")
    recipe = ec.Recipe.from_dict({"version": 1, "seed": 0, "stages": [{"stage": "prune", "sparsity": 0.8,
                                                                       "finetune": {"epochs": 1}}],
                                  "constraints": {"max_metric_drop": 0.05}, "measure": {"latency": False},
                                  "export": ["onnx"]})
    row = measure_baseline(t, recipe)
    plain = ec.compress(t, recipe).report
    given = ec.compress(t, recipe, baseline=row).report
    assert given.to_dict() == plain.to_dict()
    assert given.rows[0] is not row and row.metrics.metric == plain.baseline.metric


def test_a_study_measures_the_baseline_once_across_trials_and_resumes(tmp_path, monkeypatch, task):
    from edgecompress import pipeline

    t = task("digits-lenet300")
    calls, real = [], pipeline._baseline
    monkeypatch.setattr(pipeline, "_baseline", lambda *a: calls.append(1) or real(*a))
    # a short run and a full run per trial: before, each of them measured the baseline again
    d = space_dict(trials=2, short_epochs=1)
    d["stages"][0]["finetune"] = {"epochs": 2}
    res = ec.search(t, d, out=tmp_path / "out", study="s")
    assert len(calls) == 1 and len(res.trials) == 2
    res = ec.search(t, d, out=tmp_path / "out", study="s", trials=3)  # resumed: read from the study
    assert len(calls) == 1 and len(res.trials) == 3
    # whether the pruner cuts a later trial after its short run follows the short runs' metrics (one test
    # sample apart, measured on one machine), so the machine's weights; the first trial has nothing to
    # compare with and always runs in full
    assert res.trials[0].state == "complete" and {r.state for r in res.trials} <= {"complete", "cut"}
    assert all(r.rule == "sha" for r in res.trials if r.state == "cut")
    base = pipeline.measure_baseline(t, ec.Recipe.from_dict(res.trials[0].recipe))
    assert {r.baseline_metric for r in res.trials if r.state == "complete"} == {base.metrics.metric}
    stored = [k for k in res.study.user_attrs if k.startswith("edgecompress:baseline:")]
    assert len(stored) == 1
    assert res.study.user_attrs[stored[0]]["rows"][0]["metrics"]["stored_bytes"] == base.metrics.stored_bytes
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert summary["cut_by_rule"] == {"sha": sum(r.state == "cut" for r in res.trials)}  # listed when 0 too


def _short_trials(pruner: str, **spec):
    """tell(metric, bytes) -> cut?: each trial reports its short-run metric to ``short_verdict``."""
    import optuna

    from edgecompress.search.space import SearchSpec
    from edgecompress.search.pruners import short_verdict

    s = SearchSpec(objectives=["metric", "bytes"], pruner=pruner, short_epochs=1, **spec)
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="s")

    def tell(metric: float, bytes_: float) -> str:
        t = study.ask()
        t.set_user_attr("short_costs", {"bytes": bytes_})
        why = short_verdict(t, metric, {"bytes": bytes_}, s)
        study.tell(t, state=optuna.trial.TrialState.PRUNED if why else None, values=None if why else [metric, bytes_])
        return why

    return tell


def test_median_pruner_cuts_below_the_median_of_cheaper_complete_trials():
    tell = _short_trials("median")
    assert tell(0.90, 1000) == "" and tell(0.80, 1000) == ""  # fewer than 2 complete trials: none cut
    assert tell(0.84, 1000) == "is below the median of the complete trials at least as cheap"  # median 0.85
    assert tell(0.86, 1000) == "" and tell(0.50, 500) == ""  # above it; cheaper than all: nothing to compare


def test_hyperband_checks_only_its_first_bracket_at_the_short_run():
    from edgecompress.search.pruners import hyperband_bracket

    # epochs 9, short run 1, eta 3: brackets checking at 1, 3 and 9 epochs, shares 9, 5 and 3 (Optuna's)
    brackets = [hyperband_bracket("s", n, 1, 9, 3) for n in range(200)]
    assert sorted(set(brackets)) == [0, 1, 2] and abs(brackets.count(0) / 200 - 9 / 17) < 0.1
    tell = _short_trials("hyperband", epochs=9)
    cut = [tell(0.9 - 0.01 * n, 1000) for n in range(12)]  # each trial worse than every earlier one
    for n, why in enumerate(cut):
        if brackets[n] > 0:
            assert why == "", n  # later brackets run in full
        elif n > brackets.index(0):
            assert why == "is not in the top 1/3 of the trials at least as cheap in its Hyperband bracket", n
    assert any(cut)


def test_baseline_key_follows_weights_device_and_measuring_not_stages(task):
    import copy

    import torch

    from edgecompress.search.baseline import baseline_key

    t = task("mnist1d-cnn")
    base = {"version": 1, "seed": 0, "stages": [{"stage": "prune", "sparsity": 0.5}], "measure": {"latency": True}}

    def key(**edit):
        return baseline_key(t, ec.Recipe.from_dict({**copy.deepcopy(base), **edit}))

    k = key()
    assert k.startswith("edgecompress:baseline:") and key() == k
    assert key(stages=[{"stage": "quantize", "mode": "dynamic"}], seed=3, measure={"latency": False}) == k
    assert len({k, key(device="cortex-m4"), key(device="rpi4"), key(measure={"threads": 2}),
                key(device="cortex-m4", c={"format": "dense"})}) == 5
    other = copy.copy(t)
    other.model = copy.deepcopy(t.model)
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1e-3
    assert baseline_key(other, ec.Recipe.from_dict(base)) != k


def test_a_space_read_back_for_worker_processes_is_the_same_space():
    from edgecompress.search import _space

    space = Space.from_dict(space_dict(), source="r.yaml")  # short_epochs 0 with the default pruner: quiet
    again = Space.from_dict(_space(space)[1], source="r.yaml")
    assert again.fingerprint() == space.fingerprint() and again.spec == space.spec


def test_random_sampling_gives_a_trial_the_same_values_whichever_worker_samples_it():
    import optuna

    from edgecompress.search.numbered import NumberedRandomSampler

    def sample(study, sampler) -> tuple:
        t = optuna.Trial(study, study._storage.create_new_trial(study._study_id))
        study.sampler = sampler
        values = (t.suggest_float("sparsity", 0.1, 0.9), t.suggest_int("epochs", 4, 16),
                  t.suggest_categorical("bits", [4, 5, 6, 8]))
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.COMPLETE, [0.0])
        return values

    one = optuna.create_study()
    alone = [sample(one, NumberedRandomSampler(3)) for _ in range(6)]
    two = optuna.create_study()
    workers = [NumberedRandomSampler(3), NumberedRandomSampler(3)]
    shared = [sample(two, workers[i % 2]) for i in range(6)]  # two workers taking turns on one study
    assert shared == alone and len(set(alone)) == 6
    other = optuna.create_study()
    assert [sample(other, NumberedRandomSampler(4)) for _ in range(6)] != alone
