"""``DigitsDataModule``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from qat_lightning.data.vision import VisionDataModule


class DigitsDataModule(VisionDataModule):
    """The UCI 8x8 digits shipped inside scikit-learn, as ``(N, 1, 8, 8)`` float images and int64 labels.

    Pixels (0..16) are standardised with the training split's mean and standard deviation. The split is
    fixed by ``seed`` and independent of the global RNG: ``val_fraction`` and ``test_fraction`` of the
    images go to validation and test, the rest to training.

    Args:
        batch_size: images per batch.
        val_fraction, test_fraction: shares of the data held out, each in (0, 0.5).
        seed: seed of the split permutation.
    """

    num_classes = 10
    input_size = 8

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ValueError(f"`{name}` must be in (0, 0.5), got {value!r}.")
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.as_tensor(labels, dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = round(len(y) * self.hparams.val_fraction)
        n_test = round(len(y) * self.hparams.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        mean, std = x[parts["train"]].mean(), x[parts["train"]].std()
        self.splits = {name: TensorDataset((x[idx] - mean) / std, y[idx]) for name, idx in parts.items()}
