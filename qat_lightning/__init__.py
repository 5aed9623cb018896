"""qat-lightning: quantization-aware training for PyTorch Lightning."""

from qat_lightning.callbacks import BitWidthMetrics, QuantizationCallback, WeightHistograms, WeightNormalization
from qat_lightning.data import DigitsDataModule
from qat_lightning.models import ImageClassifier, SmallCNN
from qat_lightning.nn import (
    FakeQuantizedLayer,
    LayerPlan,
    apply_plan,
    apply_weight_norm,
    fake_quantized_layers,
    float_snapshot,
    fold_weight_norm_state_dict,
    is_prepared,
    plan_quantization,
    quantized_snapshot,
    remove_weight_norm,
    restore_float,
)
from qat_lightning.quant import FakeQuantizer, QuantizerConfig, max_abs_error, sqnr_db
from qat_lightning.report import MetricTable

__version__ = "0.1.0"

__all__ = [
    "BitWidthMetrics",
    "DigitsDataModule",
    "FakeQuantizedLayer",
    "FakeQuantizer",
    "ImageClassifier",
    "LayerPlan",
    "MetricTable",
    "QuantizationCallback",
    "QuantizerConfig",
    "SmallCNN",
    "WeightHistograms",
    "WeightNormalization",
    "__version__",
    "apply_plan",
    "apply_weight_norm",
    "fake_quantized_layers",
    "float_snapshot",
    "fold_weight_norm_state_dict",
    "is_prepared",
    "max_abs_error",
    "plan_quantization",
    "quantized_snapshot",
    "remove_weight_norm",
    "restore_float",
    "sqnr_db",
]
