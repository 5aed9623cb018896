"""Turning a float model into a fake-quantized one (and back), in place."""

from qat_lightning.nn.fake_quantized import (
    QUANTIZABLE_TYPES,
    FakeQuantizedConv1d,
    FakeQuantizedConv2d,
    FakeQuantizedConv3d,
    FakeQuantizedLayer,
    FakeQuantizedLinear,
    fake_quantize_layer,
    is_quantizable,
    restore_float_layer,
)
from qat_lightning.nn.prepare import (
    LayerPlan,
    apply_plan,
    fake_quantized_layers,
    format_plan,
    freeze_batchnorm_stats,
    is_prepared,
    plan_from_state_dict,
    plan_quantization,
    prepare_for_state_dict,
    quantizers,
    restore_float,
    set_observers_enabled,
    unsupported_layers,
)
from qat_lightning.nn.recipe import QuantizationRecipe
from qat_lightning.nn.snapshot import float_snapshot, quantized_snapshot
from qat_lightning.nn.weight_norm import (
    apply_weight_norm,
    fold_weight_norm_state_dict,
    is_weight_normalized,
    remove_weight_norm,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "FakeQuantizedConv1d",
    "FakeQuantizedConv2d",
    "FakeQuantizedConv3d",
    "FakeQuantizedLayer",
    "FakeQuantizedLinear",
    "LayerPlan",
    "QuantizationRecipe",
    "apply_plan",
    "apply_weight_norm",
    "fake_quantize_layer",
    "fake_quantized_layers",
    "format_plan",
    "freeze_batchnorm_stats",
    "is_prepared",
    "is_quantizable",
    "plan_from_state_dict",
    "plan_quantization",
    "prepare_for_state_dict",
    "float_snapshot",
    "fold_weight_norm_state_dict",
    "is_weight_normalized",
    "quantized_snapshot",
    "quantizers",
    "restore_float",
    "remove_weight_norm",
    "restore_float_layer",
    "set_observers_enabled",
    "unsupported_layers",
]
