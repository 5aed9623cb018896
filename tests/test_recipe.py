"""``QuantizationRecipe``: one set of defaults for ``plan_quantization`` and ``QuantizationCallback``, validated."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
from torch import nn

from qat_lightning import QuantizationCallback, QuantizationRecipe, plan_quantization


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2)
    )


def summary(plan) -> list[tuple]:
    """Per layer: name, weight bits, input bits, weight LSQ, input LSQ, per-channel weights, input observer."""
    return [
        (
            p.name,
            p.weight.bits,
            p.activation.bits if p.activation else None,
            p.weight.learned_scale,
            p.activation.learned_scale if p.activation else None,
            p.weight.per_channel,
            p.activation.observer if p.activation else None,
        )
        for p in plan
    ]


def test_the_product_defaults():
    """First and last layer at 8 bits (weights and inputs) with observed ranges, the others at 4 bits with LSQ."""
    assert summary(plan_quantization(net())) == [
        ("0", 8, 8, False, False, True, "moving_average"),
        ("2", 4, 4, True, True, True, "moving_average"),
        ("3", 4, 4, True, True, True, "moving_average"),
        ("5", 8, 8, False, False, True, "moving_average"),
    ]
    for p in plan_quantization(net()):
        assert p.weight.symmetric and p.weight.observer == "moving_average" and p.weight.averaging_constant == 1.0
        assert not p.activation.symmetric and not p.activation.per_channel


def test_callback_and_plan_quantization_share_one_recipe():
    callback = QuantizationCallback()
    assert callback.recipe == QuantizationRecipe() and callback.bits == 4
    assert plan_quantization(net()) == plan_quantization(net(), recipe=QuantizationRecipe())
    model = net()
    callback.setup(pl.Trainer(logger=False, enable_progress_bar=False), model, "fit")
    assert callback.plan == plan_quantization(net())


ARGUMENTS = [
    {"bits": 2},
    {"activation_bits": 0},
    {"activation_bits": 6},
    {"first_last_bits": None},
    {"layer_bits": {"[23]": 3}},
    {"exclude": ["3"]},
    {"learned_scale": False},
    {"learned_scale": True},
    {"per_channel_weights": False},
    {"activation_observer": "minmax"},
    {"reduce_range": True},
]


@pytest.mark.parametrize("arguments", ARGUMENTS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_keyword_arguments_build_the_recipe(arguments):
    recipe = QuantizationRecipe(**arguments)
    assert QuantizationCallback(**arguments).recipe == recipe
    assert plan_quantization(net(), **arguments) == plan_quantization(net(), recipe=recipe)
    assert recipe != QuantizationRecipe()  # each argument changes the recipe ...
    assert plan_quantization(net(), recipe=recipe) != plan_quantization(net())  # ... and the plan


def test_reduce_range_puts_every_8_bit_input_grid_on_7_bits():
    assert summary(plan_quantization(net(), reduce_range=True))[0][:3] == ("0", 8, 7)
    assert [p.activation.bits for p in plan_quantization(net(), reduce_range=True)] == [7, 4, 4, 7]
    assert [p.activation.bits for p in plan_quantization(net(), 8, reduce_range=True)] == [7, 7, 7, 7]
    assert [p.activation.bits for p in plan_quantization(net(), 4, 8, reduce_range=True)] == [7, 7, 7, 7]
    assert [p.activation.bits for p in plan_quantization(net(), 6, reduce_range=True)] == [7, 6, 6, 7]
    assert [p.weight.bits for p in plan_quantization(net(), 8, reduce_range=True)] == [8, 8, 8, 8]  # inputs only
    with pytest.raises(ValueError, match=r"`reduce_range` must be True or False, got 'yes'"):
        QuantizationRecipe(reduce_range="yes")


def test_a_recipe_resolves_per_layer():
    recipe = QuantizationRecipe(bits=2, layer_bits={"2": 3}, exclude=("3",), learned_scale=False)
    assert summary(plan_quantization(net(), recipe=recipe)) == [
        ("0", 8, 8, False, False, True, "moving_average"),
        ("2", 3, 3, False, False, True, "moving_average"),
        ("5", 8, 8, False, False, True, "moving_average"),
    ]
    callback = QuantizationCallback(recipe=recipe)
    assert callback.recipe is recipe and callback.bits == 2


def test_recipe_and_keyword_arguments_together_is_an_error_naming_them():
    recipe = QuantizationRecipe(bits=2)
    with pytest.raises(ValueError, match=r"not both: `bits`=3, `first_last_bits`=None would be ignored"):
        QuantizationCallback(bits=3, first_last_bits=None, recipe=recipe)
    with pytest.raises(ValueError, match=r"not both: `exclude`=\('0',\) would be ignored"):
        plan_quantization(net(), exclude=["0"], recipe=recipe)
    with pytest.raises(ValueError, match="`recipe` must be a QuantizationRecipe or None, got dict"):
        QuantizationCallback(recipe={"bits": 2})


INVALID = [
    ("bits", 1, r"`bits` must be an integer in 2\.\.16, got 1\."),
    ("bits", 4.0, r"`bits` must be an integer in 2\.\.16, got 4\.0\."),
    ("activation_bits", 1, r"`activation_bits` must be an integer in 2\.\.16, 0 \(inputs stay float\) or None, got 1"),
    ("activation_bits", False, r"`activation_bits` must be an integer in 2\.\.16, 0 .* or None, got False"),
    ("first_last_bits", 17, r"`first_last_bits` must be an integer in 2\.\.16 or None, got 17\."),
    ("layer_bits", {"fc": 1}, r"`layer_bits\['fc'\]` must be an integer in 2\.\.16, got 1\."),
    ("layer_bits", [("fc", 4)], r"`layer_bits` must be a mapping \{glob pattern: bits\}, got \[\('fc', 4\)\]"),
    ("layer_bits", {3: 4}, r"`layer_bits` keys must be glob patterns of layer names \(str\), got 3\."),
    ("exclude", "head.*", r"`exclude` must be a sequence of glob patterns of layer names, e.g\. \('head\.\*',\)"),
    ("exclude", [None], r"`exclude` must be a sequence of glob patterns .*, got \[None\]\."),
    ("learned_scale", "yes", r"`learned_scale` must be True, False or None, got 'yes'\."),
    ("per_channel_weights", None, r"`per_channel_weights` must be True or False, got None\."),
    ("weight_observer", "max", r"`weight_observer` must be one of 'minmax', 'moving_average', 'mse', got 'max'\."),
    ("activation_observer", "hist", r"`activation_observer` must be one of 'minmax', .*'mse' or None, got 'hist'\."),
]


@pytest.mark.parametrize(("name", "value", "message"), INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_values_are_errors_naming_the_argument_and_what_it_allows(name, value, message):
    with pytest.raises(ValueError, match=message):
        QuantizationRecipe(**{name: value})
    with pytest.raises(ValueError, match=message):
        plan_quantization(net(), **{name: value})
    if name != "weight_observer":  # not an argument of the callback: give it through `recipe`
        with pytest.raises(ValueError, match=message):
            QuantizationCallback(**{name: value})


def test_the_recipe_keeps_its_own_copies():
    layer_bits, exclude = {"2": 3}, ["3"]
    recipe = QuantizationRecipe(layer_bits=layer_bits, exclude=exclude)
    layer_bits["2"], exclude[0] = 8, "0"
    assert recipe.layer_bits == {"2": 3} and recipe.exclude == ("3",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.bits = 2  # type: ignore[misc]


def test_ptq_calibrates_observed_ranges_with_mse_inputs_unless_told_otherwise():
    ptq = QuantizationCallback(mode="ptq", bits=8)
    assert ptq.recipe == QuantizationRecipe(bits=8, learned_scale=False, activation_observer="mse")
    plan = plan_quantization(net(), recipe=QuantizationCallback(mode="ptq", bits=2).recipe)
    assert not any(p.weight.learned_scale or p.activation.learned_scale for p in plan)
    assert {p.activation.observer for p in plan} == {"mse"}
    assert QuantizationCallback(mode="ptq", activation_observer="minmax").recipe.activation_observer == "minmax"
    with pytest.raises(ValueError, match=r"`learned_scale`=True needs training, but mode='ptq' only calibrates"):
        QuantizationCallback(mode="ptq", learned_scale=True)
