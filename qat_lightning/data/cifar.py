"""CIFAR-10: 32x32 colour images of 10 classes, 50,000 for training and 10,000 for testing."""

from __future__ import annotations

import os
from collections.abc import Callable

from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from qat_lightning.data.vision import TorchvisionDataModule, to_normalized_tensor


class _UnverifiedCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 with its MD5 checks reduced to "the file exists" (torchvision's
    ``check_integrity`` skips the checksum when it is ``None``); the archive of a download is still verified."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 with the standard augmentation of the ResNet papers for training: 4-pixel zero padding and a
    random 32x32 crop, then a random horizontal flip. Images are ``(N, 3, 32, 32)`` floats standardised per
    channel with the training set's mean and standard deviation.

    ``root`` holds torchvision's layout: ``<root>/cifar-10-batches-py/`` with the pickled ``data_batch_1`` ..
    ``data_batch_5``, ``test_batch`` and ``batches.meta`` of the official python archive.

    Args:
        verify_checksums: check the MD5 sums of the batch files against the official archive's, as torchvision
            does. Set ``False`` for a copy in the same format whose bytes differ (re-pickled files, a subset,
            generated test data); the files must then only exist.
        **kwargs: see ``TorchvisionDataModule`` (``root``, ``download``, ``batch_size``, ``val_size``, ...).
    """

    dataset_class = CIFAR10
    num_classes = 10
    in_channels = 3
    input_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        root: str | os.PathLike = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__(root, download, batch_size, val_size, num_workers, seed)
        self.verify_checksums = verify_checksums

    def _dataset(self, train: bool, transform: Callable | None, download: bool = False) -> CIFAR10:
        dataset_class = CIFAR10 if self.verify_checksums else _UnverifiedCIFAR10
        return dataset_class(self.root, train=train, transform=transform, download=download)

    def _checksums(self) -> dict[str, str]:
        files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
        return {os.path.join(CIFAR10.base_folder, name): md5 for name, md5 in files}

    def required_files(self) -> list[str]:
        return list(self._checksums())

    def check_files(self) -> None:
        super().check_files()
        if not self.verify_checksums:
            return
        corrupt = [name for name, md5 in self._checksums().items() if not check_integrity(self.root / name, md5)]
        if corrupt:
            raise ValueError(
                f"CIFAR10 files under root='{self.root}' do not match the official archive's MD5 checksums: "
                f"{', '.join(corrupt)}. Delete them and use `download=True` to fetch them again, or, for a copy in "
                "the same format that is meant to differ (re-pickled, a subset, generated data), pass "
                "`verify_checksums=False`."
            )

    def train_transform(self) -> Callable:
        augment = [v2.RandomCrop(self.input_size, padding=4), v2.RandomHorizontalFlip()]
        return v2.Compose(augment + to_normalized_tensor(self.mean, self.std))
