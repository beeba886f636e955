"""Recipe validation and the score_fn-driven procedures (greedy soup, WiSE-FT sweep)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tunelab.merging.recipe import Recipe, load_recipe
from tunelab.merging.soup import greedy_soup, map_state_dicts, uniform_soup, wise_ft_sweep

YAML = """
merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 0.5, density: 0.3}
  - model: ./b
parameters: {lambda: 0.8, density: 0.6}
dtype: bfloat16
"""


def test_recipe_from_yaml_text_and_file(tmp_path):
    r = load_recipe(YAML)
    assert r.merge_method == "ties" and r.torch_dtype == torch.bfloat16
    assert r.weights() == [0.5, 1.0]
    assert r.densities() == [0.3, 0.6]
    assert r.param("lambda", 1.0) == 0.8
    f = tmp_path / "r.yaml"
    f.write_text(YAML)
    assert load_recipe(f) == r == load_recipe(str(f))
    assert load_recipe(r.to_yaml()) == r  # round trip keeps the "lambda" spelling
    with pytest.raises(FileNotFoundError):
        load_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"slice": []}, "slice"),  # a misspelt key (mergekit's slices are accepted: test_mergekit.py)
        ({"parameters": {"lambda": 1.0, "bogus": 1}}, "parameters.bogus"),
        ({"models": [{"model": "a", "parameters": {"wieght": 1.0}}]}, "models.0.parameters.wieght"),
        ({"models": [{"model": "a", "extra": 1}]}, "models.0.extra"),
    ],
)
def test_extra_keys_rejected_naming_field(patch, field):
    data = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}], **patch}
    with pytest.raises(ValidationError) as err:
        Recipe.model_validate(data)
    assert field in str(err.value) and "Extra inputs are not permitted" in str(err.value)


def test_method_specific_checks():
    with pytest.raises(ValidationError, match=r"parameters.density is not used by merge_method 'linear'"):
        Recipe.model_validate({"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"density": 0.5}})
    with pytest.raises(ValidationError, match=r"models\[0\].parameters.density is not used"):
        Recipe.model_validate({"merge_method": "linear", "models": [{"model": "a", "parameters": {"density": 0.5}}]})
    with pytest.raises(ValidationError, match="needs base_model"):
        Recipe.model_validate({"merge_method": "ties", "models": [{"model": "a"}]})
    with pytest.raises(ValidationError, match="source_base"):
        Recipe.model_validate({"merge_method": "transfer", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(ValidationError, match="at least two"):
        Recipe.model_validate({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        Recipe.model_validate(
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "parameters": {"density": 2}})
    with pytest.raises(ValidationError, match="merge_method"):
        Recipe.model_validate({"merge_method": "frankenmerge", "models": [{"model": "a"}]})


def test_greedy_soup_hand():
    cands = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([10.0])}]
    calls = []

    def score(sd):
        calls.append(sd["w"].item())
        return -abs(sd["w"].item() - 1.2)

    # individual scores -1.2, -0.8, -8.8 -> order 1, 0, 2; soup {2.0}: -0.8; + 0.0 -> mean 1.0: -0.2 (kept);
    # + 10.0 -> mean 4.0: -2.8 (rejected)
    res = greedy_soup([lambda c=c: c for c in cands], score)
    assert res.selected == [1, 0]
    assert res.state_dict["w"].item() == pytest.approx(1.0)
    assert res.soup_score == pytest.approx(-0.2)
    assert res.individual_scores == pytest.approx([-1.2, -0.8, -8.8])
    assert [(i, acc) for i, _, acc in res.history] == [(0, True), (2, False)]
    assert calls == pytest.approx([0.0, 2.0, 10.0, 1.0, 4.0])
    # strict improvement: an equal score is rejected
    res = greedy_soup([{"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}], lambda sd: 0.0)
    assert res.selected == [0]


def test_wise_ft_sweep_hand():
    base, ft = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 2.0])}
    res = wise_ft_sweep(base, ft, [0.0, 0.25, 0.5, 1.0],
                        lambda sd: -float((sd["w"] - torch.tensor([0.5, 1.0])).abs().sum()))
    assert res.alpha == 0.5
    assert res.state_dict["w"].tolist() == [0.5, 1.0]
    assert res.scores == pytest.approx({0.0: -1.5, 0.25: -0.75, 0.5: 0.0, 1.0: -1.5})


def test_state_dict_helpers():
    a = {"w": torch.tensor([1.0, 3.0]), "step": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 5.0]), "step": torch.tensor([9])}
    out = uniform_soup([a, b])
    assert out["w"].tolist() == [2.0, 4.0] and out["step"].tolist() == [7]  # integers copied from the first
    with pytest.raises(ValueError, match="'w'"):
        map_state_dicts(lambda n, x, y: x, a, {"w": torch.zeros(3), "step": torch.tensor([1])})
    with pytest.raises(ValueError, match="'extra'"):
        uniform_soup([a, {**b, "extra": torch.zeros(1)}])
