"""The quantization math: pure functions, observers and the fake quantizer module."""

from qat_lightning.quant.config import QuantizerConfig, activation_config, weight_config
from qat_lightning.quant.error import max_abs_error, sqnr_db
from qat_lightning.quant.fake_quantizer import FakeQuantizer
from qat_lightning.quant.fused import set_fused
from qat_lightning.quant.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    build_observer,
)
from qat_lightning.quant.primitives import (
    check_bits,
    choose_qparams,
    dequantize,
    fake_quantize,
    quant_range,
    quantize,
)
from qat_lightning.quant.rounding import Rounding, set_recompute
from qat_lightning.quant.straight_through import fake_quantize_lsq

__all__ = [
    "FakeQuantizer",
    "MinMaxObserver",
    "MSEObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "QuantizerConfig",
    "Rounding",
    "activation_config",
    "build_observer",
    "check_bits",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_lsq",
    "max_abs_error",
    "quant_range",
    "quantize",
    "set_fused",
    "set_recompute",
    "sqnr_db",
    "weight_config",
]
