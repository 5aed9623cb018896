"""``ImageFolderDataModule``: an ImageNet-style tree of images, one sub-folder per class and per split."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from qat_lightning.data.vision import VisionDataModule, to_normalized_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(VisionDataModule):
    """Images in ``<root>/<split>/<class>/<image file>`` (the layout of ImageNet after the usual preparation).

    Class indices follow the sorted class folder names, which must be the same in every split. Images are
    loaded as RGB and standardised with ImageNet's per-channel mean and standard deviation. Training uses
    the ImageNet recipe's random resized crop to ``image_size`` and a random horizontal flip; evaluation
    resizes the shorter side to ``resize_size`` and crops the centre ``image_size`` square.

    Args:
        root: directory holding the split folders.
        train_dir, val_dir: names of the training and validation split folders under ``root``.
        test_dir: name of the test split folder (``None``: test on the validation split).
        image_size: side of the square images fed to the model, in pixels.
        resize_size: side the shorter image edge is resized to before the evaluation centre crop
            (``None``: ``image_size * 256 / 224``, ImageNet's ratio).
        batch_size: images per batch.
        num_workers: data-loading worker processes.
    """

    in_channels = 3

    def __init__(
        self,
        root: str | os.PathLike = "data/imagenet",
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        resize_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive integer (pixels), got {image_size!r}.")
        resize_size = round(image_size * 256 / 224) if resize_size is None else resize_size
        if resize_size < image_size:
            raise ValueError(
                f"`resize_size`={resize_size} is smaller than `image_size`={image_size}: the centre crop needs "
                f"a resized image at least as large; use resize_size >= {image_size} or None."
            )
        self.save_hyperparameters()
        self.root = Path(root)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": val_dir if test_dir is None else test_dir}
        self.image_size = image_size
        self.resize_size = resize_size
        self.classes: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of class folders in the training split."""
        return len(self.classes or self._find_classes("train"))

    @property
    def input_size(self) -> int:
        return self.image_size

    def _find_classes(self, split: str) -> list[str]:
        directory = self.root / self.split_dirs[split]
        if not directory.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule: no {split} split folder '{directory}' under root='{self.root}'. Expected "
                f"the layout <root>/<split>/<class>/<image> with split folders {sorted(set(self.split_dirs.values()))}"
                "; "
                "set `root` (and `train_dir`, `val_dir`, `test_dir`) to match your data."
            )
        return find_classes(directory)[0]

    def train_transform(self) -> Callable:
        augment = [v2.RandomResizedCrop(self.image_size), v2.RandomHorizontalFlip()]
        return v2.Compose(augment + to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD))

    def eval_transform(self) -> Callable:
        resize = [v2.Resize(self.resize_size), v2.CenterCrop(self.image_size)]
        return v2.Compose(resize + to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        classes = {split: self._find_classes(split) for split in self.split_dirs}
        for split, names in classes.items():
            if names != classes["train"]:
                raise ValueError(
                    f"ImageFolderDataModule: the class folders of '{self.root / self.split_dirs[split]}' differ from "
                    f"those of '{self.root / self.split_dirs['train']}' (only in one of them: "
                    f"{sorted(set(names) ^ set(classes['train']))}); labels would not match. Give every split the "
                    "same class folders."
                )
        self.classes = classes["train"]
        dirs = self.split_dirs
        eval_dirs = {dirs["val"], dirs["test"]}
        evaluation = {d: ImageFolder(self.root / d, transform=self.eval_transform()) for d in eval_dirs}
        self.splits = {
            "train": ImageFolder(self.root / dirs["train"], transform=self.train_transform()),
            "val": evaluation[dirs["val"]],
            "test": evaluation[dirs["test"]],
        }
