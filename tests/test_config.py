import pytest

from mpq.config import Recipe, apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
from mpq.errors import UsageError


def test_defaults_round_trip_exactly():
    recipe = Recipe()
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_shipped_recipes_load():
    from conftest import ROOT
    from mpq.qat import QATRecipe
    from mpq.search import SearchRecipe

    paths = sorted((ROOT / "recipes").glob("*.yaml"))
    assert paths
    for path in paths:
        cls = {"qat": QATRecipe, "fp32": Recipe}.get(path.stem.rsplit("_", 1)[-1], SearchRecipe)
        load_recipe(path, cls=cls)


@pytest.mark.parametrize("data, expected", [
    ({"train": {"epoch": 3}}, "did you mean 'train.epochs'"),
    ({"epochs": 3}, "did you mean 'train.epochs'"),
    ({"data": {"cutuot": 8}}, "did you mean 'data.cutout'"),
])
def test_unknown_key_suggests_nearest(data, expected):
    with pytest.raises(UsageError, match=expected):
        recipe_from_dict(data)


@pytest.mark.parametrize("data, expected", [
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected int"),
    ({"train": {"nesterov": "yes"}}, "train.nesterov: expected bool"),
    ({"data": {"mean": [0.5, "x", 0.5]}}, r"data.mean\[1\]"),
    ({"train": 3}, "train: expected a mapping"),
])
def test_wrong_type_is_named(data, expected):
    with pytest.raises(UsageError, match=expected):
        recipe_from_dict(data)


def test_int_widens_to_float_and_bool_is_not_int():
    assert recipe_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(UsageError):
        recipe_from_dict({"train": {"epochs": True}})


def test_value_checks_in_post_init():
    with pytest.raises(UsageError, match="schedule"):
        recipe_from_dict({"train": {"schedule": "linear"}})
    with pytest.raises(UsageError, match="dataset"):
        recipe_from_dict({"data": {"dataset": "mnist"}})


def test_overrides_parse_yaml_values(tmp_path):
    data = apply_overrides({"train": {"epochs": 5}}, ["train.epochs=3", "data.flip=false",
                                                      "data.mean=[0.1, 0.2, 0.3]"])
    assert data == {"train": {"epochs": 3}, "data": {"flip": False, "mean": [0.1, 0.2, 0.3]}}
    with pytest.raises(UsageError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
