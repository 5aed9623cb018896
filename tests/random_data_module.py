"""A LightningModule around any 4-class image network, trained and validated on 32 fixed random images."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class RandomDataClassifier(L.LightningModule):
    """``net`` on ``(N, 3, side, side)`` random images with 4 random labels (seeded: every call gets the same data)."""

    def __init__(self, net: nn.Module, side: int) -> None:
        super().__init__()
        self.net, self.side = net, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _loader(self):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(32, 3, self.side, self.side, generator=g)
        data = torch.utils.data.TensorDataset(images, torch.randint(0, 4, (32,)))
        return torch.utils.data.DataLoader(data, batch_size=8)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()
