"""MNIST and FashionMNIST: 28x28 grey-scale images of 10 classes, 60,000 for training and 10,000 for testing."""

from __future__ import annotations

import os

from torchvision.datasets import MNIST, FashionMNIST

from qat_lightning.data.vision import TorchvisionDataModule


class MNISTDataModule(TorchvisionDataModule):
    """Handwritten digits, as ``(N, 1, 28, 28)`` float images standardised with the training set's statistics.

    ``root`` holds torchvision's layout: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
    (the unpacked idx files of the original distribution). See ``TorchvisionDataModule`` for the arguments.
    """

    dataset_class = MNIST
    num_classes = 10
    in_channels = 1
    input_size = 28
    mean = (0.1307,)
    std = (0.3081,)

    def required_files(self) -> list[str]:
        raw = os.path.join(self.dataset_class.__name__, "raw")
        return [os.path.join(raw, archive.removesuffix(".gz")) for archive, _ in self.dataset_class.resources]


class FashionMNISTDataModule(MNISTDataModule):
    """Zalando's clothing images, in MNIST's format under ``<root>/FashionMNIST/raw/``."""

    dataset_class = FashionMNIST
    mean = (0.2860,)
    std = (0.3530,)
