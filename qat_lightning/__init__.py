"""qat-lightning: quantization-aware training for PyTorch Lightning."""

from qat_lightning.analysis import LayerSensitivity, format_sensitivity, layer_sensitivity
from qat_lightning.calibration import calibrate
from qat_lightning.callbacks import BitWidthMetrics, QuantizationCallback, WeightHistograms, WeightNormalization
from qat_lightning.convert import (
    ConversionResult,
    ExportError,
    Fidelity,
    convert_model,
    integer_model,
    load_packed_weights,
    save_packed_weights,
)
from qat_lightning.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from qat_lightning.models import (
    CifarResNet,
    ImageClassifier,
    LeNet5,
    SmallCNN,
    load_weights,
    mobilenet_v2,
    resnet18,
    resnet20,
    resnet_cifar,
)
from qat_lightning.nn import (
    FakeQuantizedLayer,
    LayerPlan,
    QuantizationRecipe,
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
    "CIFAR10DataModule",
    "CifarResNet",
    "BitWidthMetrics",
    "ConversionResult",
    "ExportError",
    "Fidelity",
    "DigitsDataModule",
    "FakeQuantizedLayer",
    "FakeQuantizer",
    "FashionMNISTDataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "LayerPlan",
    "LayerSensitivity",
    "LeNet5",
    "MNISTDataModule",
    "MetricTable",
    "QuantizationCallback",
    "QuantizationRecipe",
    "QuantizerConfig",
    "SmallCNN",
    "WeightHistograms",
    "WeightNormalization",
    "__version__",
    "apply_plan",
    "calibrate",
    "convert_model",
    "integer_model",
    "fake_quantized_layers",
    "format_sensitivity",
    "is_prepared",
    "layer_sensitivity",
    "load_weights",
    "mobilenet_v2",
    "load_packed_weights",
    "plan_quantization",
    "resnet18",
    "resnet20",
    "resnet_cifar",
    "apply_weight_norm",
    "float_snapshot",
    "fold_weight_norm_state_dict",
    "max_abs_error",
    "quantized_snapshot",
    "remove_weight_norm",
    "restore_float",
    "sqnr_db",
    "save_packed_weights",
]
