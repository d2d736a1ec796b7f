"""sampler: rl, the AMC-style agent over per-layer values: validation, values inside their ranges, the
same proposals for a seed, memory rebuilt from the study, learning a synthetic reward, and a search."""
from __future__ import annotations

import json

import optuna
import pytest
import yaml

import edgecompress as ec
from edgecompress.search import Space
from edgecompress.search.rl import RLSampler, layer_features, to_action, to_value

# raw layer features as layer_features gives them: conv?, in, out, kernel, MACs, params
LAYERS = {"c1": [1, 1, 8, 5, 4000, 40], "c2": [1, 8, 16, 5, 12000, 640], "c3": [1, 16, 16, 3, 6000, 768],
          "fc": [0, 64, 10, 1, 640, 640]}
TARGET = {"c1": 0.2, "c2": 0.7, "c3": 0.6, "fc": 0.3}


def quiet():
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def synthetic(trial) -> float:
    """A reward with its best at TARGET's ratio for each layer (1.0 there)."""
    x = {n: trial.suggest_float(f"stages[0].per_layer.{n}", 0.1, 0.9) for n in LAYERS}
    return 1 - sum((x[n] - TARGET[n]) ** 2 for n in LAYERS)


def mixed(trial) -> float:
    """Every kind of per-layer parameter, and one that is not per-layer (delegated to TPE)."""
    s = [trial.suggest_float(f"stages[0].per_layer.{n}", 0.3, 0.8) for n in ("c1", "c2")]
    b = [trial.suggest_categorical(f"stages[1].layer_bits.{n}", [8, 3, 5]) for n in ("c1", "fc")]
    k = trial.suggest_int("stages[1].layer_bits.c3", 2, 6)
    e = trial.suggest_int("stages[0].finetune.epochs", 0, 3)
    return sum(s) - 0.1 * sum(b) - 0.01 * k + 0.001 * e


def run(sampler, objective, n: int, storage=None, name: str = "s") -> optuna.Study:
    quiet()
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage, study_name=name,
                                load_if_exists=True)
    study.optimize(objective, n_trials=n)
    return study


def test_rl_without_a_per_layer_stage_is_one_line():
    d = {"version": 1, "task": "digits-lenet300", "stages": [{"stage": "prune", "sparsity": {"range": [0.5, 0.9]}}],
         "search": {"sampler": "rl"}}
    with pytest.raises(ec.RecipeError) as e:
        Space.from_dict(d, source="r.yaml")
    assert str(e.value) == ("r.yaml: search.sampler rl chooses one value per layer, so a stage needs per_layer: true "
                            "(a prune stage with a sparsity range or a cluster stage with a bits range or choice); "
                            "got none")
    d["stages"][0]["per_layer"] = True
    assert Space.from_dict(d).spec.sampler == "rl"


def test_actions_map_to_values_inside_each_range_and_back():
    f = optuna.distributions.FloatDistribution(0.3, 0.8)
    assert [to_value(a, f) for a in (0.0, 0.5, 1.0, -1.0, 2.0)] == [0.3, 0.55, 0.8, 0.3, 0.8]
    assert to_action(0.55, f) == pytest.approx(0.5)
    c = optuna.distributions.CategoricalDistribution([8, 3, 5])  # in increasing order: 3, 5, 8
    assert [to_value(a, c) for a in (0.0, 0.34, 0.67, 1.0)] == [3, 5, 8, 8]
    assert [to_action(v, c) for v in (3, 5, 8)] == [pytest.approx(1 / 6), 0.5, pytest.approx(5 / 6)]
    i = optuna.distributions.IntDistribution(2, 6)
    assert [to_value(a, i) for a in (0.0, 0.5, 0.99)] == [2, 4, 6]


def test_proposals_are_inside_the_ranges_and_the_same_for_a_seed():
    studies = [run(RLSampler(LAYERS, seed=s, steps=60), mixed, 7) for s in (0, 0, 1)]
    params = [[t.params for t in st.trials] for st in studies]
    assert params[0] == params[1] and params[0] != params[2]
    for p in params[0] + params[2]:
        assert all(0.3 <= p[f"stages[0].per_layer.{n}"] <= 0.8 for n in ("c1", "c2"))
        assert all(p[f"stages[1].layer_bits.{n}"] in (8, 3, 5) for n in ("c1", "fc"))
        assert p["stages[1].layer_bits.c3"] in range(2, 7) and p["stages[0].finetune.epochs"] in range(4)


def test_memory_is_rebuilt_from_the_study_so_another_process_continues(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    run(RLSampler(LAYERS, seed=3, steps=60), synthetic, 6, url)
    # a fresh sampler (another worker, a resumed run) on the same study learns from its 6 trials
    two = run(RLSampler(LAYERS, seed=3, steps=60), synthetic, 1, url)
    cont = run(RLSampler(LAYERS, seed=3, steps=60), synthetic, 7, None, "alone")  # one sampler, 7 trials
    assert len(two.trials) == 7 and [t.params for t in two.trials] == [t.params for t in cont.trials]


def test_infeasible_trials_are_penalised_below_every_feasible_one():
    quiet()
    s = RLSampler(LAYERS, ["metric", "flash"], seed=0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=s)
    for metric, excess in ((0.9, 0.0), (0.8, 0.0), (0.95, 0.5), (None, 0.25)):
        t = study.ask()
        t.suggest_float("stages[0].per_layer.c1", 0.1, 0.9)
        t.set_constraint("max_flash", excess if excess else -0.1)
        if metric is None:  # cut on structure: no values
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, [metric, 1000.0])
    assert [r for *_, r in s.episodes(study)] == [0.9, 0.8, pytest.approx(0.3), pytest.approx(0.55)]


def test_the_agent_learns_a_synthetic_reward_better_than_random_sampling():
    """The mean of the last 6 of 16 trials (the agent acts from trial 4 on), averaged over five seeds.
    The agent trains a small network, so its proposals differ from one CPU's kernels to another's; on
    one seed it can fall below random sampling (seed 3: 0.569 against 0.774), on average it has not.
    Measured: 0.728 (AVX2) and 0.759 (SSE4.1 kernels) against random sampling's 0.676, which is pure
    Python and numpy's seeded generator, the same on every machine."""
    n, seeds = 16, range(5)
    last = lambda v: sum(v[-6:]) / 6  # noqa: E731
    rl = [last([t.value for t in run(RLSampler(LAYERS, seed=s, steps=150), synthetic, n).trials]) for s in seeds]
    rnd = [last([t.value for t in run(optuna.samplers.RandomSampler(seed=s), synthetic, n).trials]) for s in seeds]
    assert sum(rl) / 5 >= sum(rnd) / 5 + 0.02, (rl, rnd)


def test_layer_features_describe_the_model(task):
    t = task("digits-lenet300")  # conv?, in, out, kernel, MACs of one 28x28 image, parameters (weights)
    assert layer_features(t.model, t.example_input) == {"fc1": [0, 784, 300, 1, 235200, 235200],
                                                        "fc2": [0, 300, 100, 1, 30000, 30000],
                                                        "fc3": [0, 100, 10, 1, 1000, 1000]}


def test_search_with_sampler_rl_completes_and_writes_its_files(tmp_path, task):
    task("digits-lenet300")
    d = yaml.safe_load("""version: 1
task: digits-lenet300
seed: 0
stages:
  - stage: prune
    per_layer: true
    sparsity: {range: [0.5, 0.95]}
    finetune: {epochs: 0}
export: [onnx]
measure: {latency: false}
constraints: {max_metric_drop: 0.05}
search: {objectives: [metric, bytes], trials: 5, sampler: rl, seed: 0, short_epochs: 0}
""")
    res = ec.search("digits-lenet300", d, out=tmp_path / "out", study="s")
    assert [r.state for r in res.trials] == ["complete"] * 5
    for r in res.trials:
        per = r.recipe["stages"][0]["per_layer"]
        assert sorted(per) == ["fc1", "fc2"] and all(0.5 <= v <= 0.95 for v in per.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best.yaml", "pareto", "pareto.png",
                                                                  "search.html", "search.json", "search.md",
                                                                  "study.db"]
    assert json.loads((tmp_path / "out" / "search.json").read_text())["counts"]["trials"] == 5
