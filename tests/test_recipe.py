import pytest

from tunelab.recipe import RecipeError, parse_override
from tunelab.validate import load_validated_recipe


def test_defaults_validate_and_resolve():
    r = load_validated_recipe(None)
    assert r.method.name == "lora" and r.objective.name == "sft"
    assert r.model.name_or_path == "smollm2-135m-instruct"
    assert r.data.loss_mask == "completion"


def test_unknown_key_names_the_field(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(RecipeError, match=r"recipe field 'train.lrr': unknown field"):
        load_validated_recipe(p)


def test_bad_value_names_field_and_value():
    with pytest.raises(RecipeError, match=r"'train.batch_size'.*got 'many'"):
        load_validated_recipe(None, ["train.batch_size=many"])


def test_method_options_validated_by_the_method_config():
    with pytest.raises(RecipeError, match=r"recipe field 'method.rank': unknown field"):
        load_validated_recipe(None, ["method.rank=8"])
    with pytest.raises(RecipeError, match=r"'method.r'"):
        load_validated_recipe(None, ["method.r=0"])
    assert load_validated_recipe(None, ["method.r=8"]).method_options()["r"] == 8


def test_unknown_method_lists_known_ones():
    with pytest.raises(RecipeError, match=r"method.name.*unknown method 'nope'.*lora"):
        load_validated_recipe(None, ["method.name=nope"])


@pytest.mark.parametrize("item,keys,value", [
    ("train.lr=1e-4", ["train", "lr"], 1e-4),
    ("train.max_steps=10", ["train", "max_steps"], 10),
    ("eval.before=false", ["eval", "before"], False),
    ("method.target_modules=[q_proj, v_proj]", ["method", "target_modules"], ["q_proj", "v_proj"]),
    ("name=my-run", ["name"], "my-run"),
])
def test_parse_override(item, keys, value):
    assert parse_override(item) == (keys, value)


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="a.b.c=value"):
        load_validated_recipe(None, ["train.lr"])


def test_non_mapping_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_validated_recipe(p)


def test_dataset_needs_exactly_one_source():
    with pytest.raises(RecipeError, match="exactly one of"):
        load_validated_recipe(None, ["data.train.path=x.jsonl", "data.train.builtin=date_format"])


def test_shipped_quickstart_recipe_validates():
    from tunelab.commands._common import builtin_recipe_path

    r = load_validated_recipe(builtin_recipe_path("quickstart"))
    assert r.name == "quickstart" and r.data.train.builtin == "date_format"


def test_recipe_docs_are_current():
    from pathlib import Path

    from tunelab.recipe import fields_markdown

    doc = (Path(__file__).parents[1] / "docs" / "recipe.md").read_text()
    assert fields_markdown() in doc, "docs/recipe.md is stale: regenerate it from `tunelab recipe`"


def test_tensorboard_tracking_writes_events(tiny_model_dir, tmp_path):
    from tiny import tiny_recipe_dict

    from tunelab.recipe import Recipe
    from tunelab.runner import open_workspace, train_workspace

    r = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tmp_path, train={"max_steps": 2},
                                               tracking={"tensorboard": True}))
    ws = open_workspace(r)
    train_workspace(ws)
    ws.accelerator.end_training()
    assert list(ws.run_dir.rglob("events.out.tfevents.*"))



def test_run_argument_with_equals_is_an_override_of_the_quickstart():
    from tunelab.commands._common import resolve_recipe, split_recipe_arg
    from tunelab.runner import resolve_recipe_arg

    path, overrides = split_recipe_arg("train.lr=0.5", ["method.r=4"])
    recipe, run_dir = resolve_recipe_arg(resolve_recipe(path), overrides)
    assert recipe.name == "quickstart" and run_dir is None
    assert recipe.train.lr == 0.5 and recipe.method_options()["r"] == 4
