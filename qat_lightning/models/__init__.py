"""Reference models and the generic LightningModule the configs use."""

from qat_lightning.models.classifier import ImageClassifier, classification_metrics
from qat_lightning.models.compact_cnn import CompactCNN
from qat_lightning.models.lenet import LeNet5
from qat_lightning.models.resnet_cifar import CifarResNet, resnet20, resnet_cifar
from qat_lightning.models.small_cnn import SmallCNN
from qat_lightning.models.torchvision_models import mobilenet_v2, resnet18
from qat_lightning.models.weights import load_weights

__all__ = [
    "CifarResNet",
    "CompactCNN",
    "ImageClassifier",
    "LeNet5",
    "SmallCNN",
    "classification_metrics",
    "load_weights",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet_cifar",
]
