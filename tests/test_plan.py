"""Per-layer bit widths: first/last layer, overrides by pattern, the printed plan and bad input."""

import pytest
from torch import nn

from qat_lightning import QuantizationCallback, plan_quantization
from qat_lightning.nn import format_plan


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2)
    )


def bits_of(plan):
    return {p.name: (p.weight.bits, p.activation.bits if p.activation else None) for p in plan}


def test_first_and_last_layers_get_their_own_bits():
    plan = plan_quantization(net(), 2, first_last_bits=8)
    assert bits_of(plan) == {"0": (8, 8), "2": (2, 2), "3": (2, 2), "5": (8, 8)}  # 8-bit layers: 8-bit inputs


def test_overrides_by_glob_pattern_apply_last():
    plan = plan_quantization(net(), 4, first_last_bits=8, layer_bits={"0": 4, "[23]": 3})
    assert bits_of(plan) == {"0": (4, 4), "2": (3, 3), "3": (3, 3), "5": (8, 8)}


def test_activation_bits_apply_to_layers_at_the_default_width():
    plan = plan_quantization(net(), 4, activation_bits=8, first_last_bits=6)
    assert bits_of(plan) == {"0": (6, 6), "2": (4, 8), "3": (4, 8), "5": (6, 6)}
    assert all(p.activation is None for p in plan_quantization(net(), 4, activation_bits=0))


def test_lsq_default_is_for_four_bits_or_fewer():
    plan = plan_quantization(net(), 4, first_last_bits=8, learned_scale=None)
    assert [p.weight.learned_scale for p in plan] == [False, True, True, False]
    assert [p.activation.learned_scale for p in plan] == [False, True, True, False]


def test_format_plan_lists_every_layer():
    text = format_plan(plan_quantization(net(), 2, first_last_bits=8, learned_scale=None))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "w_bits", "a_bits", "quantizer"]
    assert lines[2].split() == ["0", "Conv2d", "8", "8", "moving_average"]
    assert lines[3].split() == ["2", "Conv2d", "2", "2", "lsq"]
    assert lines[5].split() == ["5", "Linear", "8", "8", "moving_average"]


def test_pattern_matching_no_layer_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"`layer_bits` pattern 'features\.\*' matches no quantizable layer.*0, 2"):
        plan_quantization(net(), 4, layer_bits={"features.*": 8})


@pytest.mark.parametrize("value", [1, 17, 4.5])
def test_bad_bits_for_a_layer_is_an_error_naming_it(value):
    with pytest.raises(ValueError, match=r"`layer_bits\['2'\]` must be an integer in 2\.\.16"):
        plan_quantization(net(), 4, layer_bits={"2": value})
    with pytest.raises(ValueError, match=r"`first_last_bits` must be an integer in 2\.\.16"):
        plan_quantization(net(), 4, first_last_bits=value)


def test_callback_rejects_unknown_mode():
    with pytest.raises(ValueError, match="`mode` must be 'qat' or 'ptq'"):
        QuantizationCallback(mode="qta")
