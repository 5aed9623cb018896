"""qat-lightning: quantization-aware training for PyTorch Lightning."""

from qat_lightning.analysis import LayerSensitivity, format_sensitivity, layer_sensitivity
from qat_lightning.calibration import calibrate
from qat_lightning.callbacks import QuantizationCallback
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
    apply_plan,
    fake_quantized_layers,
    is_prepared,
    plan_quantization,
    restore_float,
)
from qat_lightning.quant import FakeQuantizer, QuantizerConfig

__version__ = "0.1.0"

__all__ = [
    "CIFAR10DataModule",
    "CifarResNet",
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
    "QuantizationCallback",
    "QuantizerConfig",
    "SmallCNN",
    "__version__",
    "apply_plan",
    "calibrate",
    "fake_quantized_layers",
    "format_sensitivity",
    "is_prepared",
    "layer_sensitivity",
    "load_weights",
    "mobilenet_v2",
    "plan_quantization",
    "resnet18",
    "resnet20",
    "resnet_cifar",
    "restore_float",
]
