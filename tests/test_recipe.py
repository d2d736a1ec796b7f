from pathlib import Path

import pytest
import yaml

import edgecompress as ec
from edgecompress.recipe import Recipe, schema

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")
                 if "search" not in yaml.safe_load(p.read_text()))  # search spaces: tests/test_search.py


def error(data, source="r.yaml") -> str:
    with pytest.raises(ec.RecipeError) as e:
        Recipe.from_dict(data, source)
    return str(e.value)


def stage(**kw):
    return {"stages": [{"stage": "prune", "sparsity": 0.5, **kw}]}


def test_unknown_stage_names_the_known_ones():
    msg = error({"stages": [{"stage": "prun", "sparsity": 0.5}]})
    assert msg.startswith("r.yaml: stages[0].stage must be one of prune")
    assert msg.endswith("; got 'prun'")


def test_out_of_range_and_wrong_type():
    assert error(stage(sparsity=1.5)) == "r.yaml: stages[0].sparsity must be < 1.0; got 1.5"
    assert error(stage(sparsity=-0.1)) == "r.yaml: stages[0].sparsity must be >= 0.0; got -0.1"
    assert error(stage(sparsity="lots")) == "r.yaml: stages[0].sparsity must be a number; got 'lots'"
    assert error(stage(scope="everywhere")) == "r.yaml: stages[0].scope must be one of global, layer, sensitivity; got 'everywhere'"
    assert error(stage(finetune={"epochs": -1})) == "r.yaml: stages[0].finetune.epochs must be >= 0; got -1"


def test_unknown_key_in_a_stage_is_refused():
    msg = error(stage(sparsty=0.9))
    assert msg.startswith("r.yaml: stages[0].sparsty is not a known key (a prune stage takes: stage, name, finetune,")
    assert msg.endswith("; got 0.9")
    assert error({**stage(), "stagez": []}) == "r.yaml: stagez is not a known key; got []"


def test_missing_pieces():
    assert error({"stages": []}) == "r.yaml: stages must have at least 1 item(s); got []"
    assert error({"task": "digits-lenet300"}) == "r.yaml: stages is required"
    assert error([1, 2]) == "r.yaml: a recipe must be a mapping of keys to values; got list"
    assert error({**stage(), "version": 2}) == "r.yaml: version must be one of 1; got 2"


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ec.RecipeError, match=r"^nope\.yaml: no such recipe file$"):
        Recipe.from_yaml("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: prune\n   sparsity: 0.5\n")
    with pytest.raises(ec.RecipeError) as e:
        Recipe.from_yaml(bad)
    assert str(e.value) == f"{bad}: malformed YAML at line 3, column 4: expected <block end>, but found '<block mapping start>'"


def test_unknown_task_name():
    with pytest.raises(ec.RecipeError) as e:
        ec.compress("digits-lenet400", Recipe.from_dict(stage()))
    assert str(e.value) == ("task must be a built-in task (digits-lenet300, digits-lenet5, mnist1d-cnn"
                            + "".join(", " + n for n in _extra_builtins()) + ") or package.module:factory; got 'digits-lenet400'")


def _extra_builtins():
    from edgecompress.zoo import BUILTINS
    return [n for n in BUILTINS if n not in ("digits-lenet300", "digits-lenet5", "mnist1d-cnn")]


def test_layer_pattern_matching_nothing(task):
    recipe = Recipe.from_dict(stage(layers=["fc1", "re:conv.*"]) | {"measure": {"latency": False}})
    with pytest.raises(ec.RecipeError) as e:
        ec.compress(task("digits-lenet300"), recipe)
    assert str(e.value) == "stages[0].layers[1] matches no layer; got 're:conv.*' (layers: fc1, fc2, fc3)"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_dumps_and_reloads_equal(path):
    recipe = Recipe.from_yaml(path)
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_schema_file_is_current():
    import json
    shipped = json.loads((Path(__file__).parents[1] / "recipe.schema.json").read_text())
    assert shipped == json.loads(json.dumps(schema())), "run `make schema` to regenerate recipe.schema.json"
