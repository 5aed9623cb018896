"""qat-lightning: quantization-aware training for PyTorch Lightning."""

from qat_lightning.callbacks import QuantizationCallback
from qat_lightning.convert import ConversionResult, convert_model, load_packed_weights, save_packed_weights
from qat_lightning.data import DigitsDataModule
from qat_lightning.models import ImageClassifier, SmallCNN
from qat_lightning.nn import (
    FakeQuantizedLayer,
    LayerPlan,
    apply_plan,
    fake_quantized_layers,
    is_prepared,
    plan_quantization,
    restore_float,
)
from qat_lightning.quant import FakeQuantizer, QuantizerConfig

__version__ = "0.1.0"

__all__ = [
    "ConversionResult",
    "DigitsDataModule",
    "FakeQuantizedLayer",
    "FakeQuantizer",
    "ImageClassifier",
    "LayerPlan",
    "QuantizationCallback",
    "QuantizerConfig",
    "SmallCNN",
    "__version__",
    "apply_plan",
    "convert_model",
    "fake_quantized_layers",
    "is_prepared",
    "load_packed_weights",
    "plan_quantization",
    "restore_float",
    "save_packed_weights",
]
