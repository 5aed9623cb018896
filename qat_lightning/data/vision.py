"""Base datamodules for image datasets: shared loaders, and the train/val/test logic of torchvision's datasets."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import VisionDataset
from torchvision.transforms import v2


def to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    """Transforms that turn a PIL image into a float32 ``(C, H, W)`` tensor, scaled to [0, 1], then standardised
    per channel with ``mean`` and ``std`` (in units of that [0, 1] scale)."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class VisionDataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``, ``"val"``, ``"test"`` datasets of ``(image, label)``).

    Subclasses fill ``self.splits`` in ``setup``. The training loader shuffles; the others keep the order.
    Worker processes persist across epochs when ``num_workers > 0``; batches are pinned when CUDA is available.

    Args:
        batch_size: images per batch.
        num_workers: data-loading worker processes (0 loads in the main process).
    """

    def __init__(self, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"{type(self).__name__} has no '{split}' split yet: call `setup()` first.")
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class TorchvisionDataModule(VisionDataModule):
    """A torchvision dataset with a train and a test split (MNIST, FashionMNIST, CIFAR-10, ...).

    ``prepare_data`` downloads the files into ``root`` when ``download=True``; ``setup`` never downloads and
    fails with an error naming ``root`` and the missing files when they are not there. Validation uses
    ``val_size`` training images held out by a seeded permutation (shown with the evaluation transform, without
    augmentation), or the test split itself when ``val_size=0``.

    Subclasses set ``dataset_class``, ``num_classes``, ``in_channels``, ``input_size``, ``mean`` and ``std``,
    and list the dataset's files in ``required_files``; they may add augmentation in ``train_transform``.

    Args:
        root: directory holding the dataset in torchvision's layout (created by ``download=True``).
        download: download the dataset into ``root`` if it is not there yet (needs internet access).
        batch_size: images per batch.
        val_size: training images held out for validation; 0 validates on the test split.
        num_workers: data-loading worker processes.
        seed: seed of the permutation that picks the held-out images.
    """

    dataset_class: ClassVar[type[VisionDataset]]
    num_classes: ClassVar[int]
    in_channels: ClassVar[int]
    input_size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]

    def __init__(
        self,
        root: str | os.PathLike = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(
                f"`val_size` must be a non-negative integer (0: validate on the test split), got {val_size!r}."
            )
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = download
        self.val_size = val_size
        self.seed = seed

    @property
    def dataset_name(self) -> str:
        """The dataset's name, as error messages give it."""
        return self.dataset_class.__name__

    def required_files(self) -> list[str]:
        """Paths, relative to ``root``, of the files ``setup`` reads."""
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        """PIL image -> standardised float tensor ``(in_channels, input_size, input_size)``."""
        return v2.Compose(to_normalized_tensor(self.mean, self.std))

    def train_transform(self) -> Callable:
        """The evaluation transform, plus augmentation where the dataset's recipe has one."""
        return self.eval_transform()

    def _dataset(self, train: bool, transform: Callable | None, download: bool = False) -> VisionDataset:
        return self.dataset_class(self.root, train=train, transform=transform, download=download)

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset(train, transform=None, download=True)

    def check_files(self) -> None:
        """Raise ``FileNotFoundError`` naming ``root``, the missing files and the fix if any file is missing."""
        missing = [name for name in self.required_files() if not (self.root / name).is_file()]
        if not missing:
            return
        if self.download:
            fix = "`download=True` is set but the files are still missing: call `prepare_data()` before `setup()`"
            fix += " (the Trainer does) on a machine with internet access"
        else:
            fix = "pass `download=True` (on the command line: --data.init_args.download=true) to download it"
        raise FileNotFoundError(
            f"{self.dataset_name} not found under root='{self.root}': missing {', '.join(missing)}. "
            f"Point `root` at the directory that holds it, or {fix}."
        )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.check_files()
        train = self._dataset(True, self.train_transform())
        test = self._dataset(False, self.eval_transform())
        if self.val_size == 0:
            self.splits = {"train": train, "val": test, "test": test}
            return
        if self.val_size >= len(train):
            raise ValueError(
                f"`val_size`={self.val_size} leaves no training images: {self.dataset_name} under '{self.root}' has "
                f"{len(train)}; use a smaller value, or 0 to validate on the test split."
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held_out = self._dataset(True, self.eval_transform())  # validation images are not augmented
        self.splits = {
            "train": Subset(train, order[self.val_size :]),
            "val": Subset(held_out, order[: self.val_size]),
            "test": test,
        }
