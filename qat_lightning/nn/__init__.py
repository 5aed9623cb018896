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
    plan_quantization,
    quantizers,
    restore_float,
    set_observers_enabled,
    unsupported_layers,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "FakeQuantizedConv1d",
    "FakeQuantizedConv2d",
    "FakeQuantizedConv3d",
    "FakeQuantizedLayer",
    "FakeQuantizedLinear",
    "LayerPlan",
    "apply_plan",
    "fake_quantize_layer",
    "fake_quantized_layers",
    "format_plan",
    "freeze_batchnorm_stats",
    "is_prepared",
    "is_quantizable",
    "plan_quantization",
    "quantizers",
    "restore_float",
    "restore_float_layer",
    "set_observers_enabled",
    "unsupported_layers",
]
