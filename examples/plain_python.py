"""Quantization-aware training from plain Python: your own LightningModule plus ``QuantizationCallback(bits=4)``.

The model trains in float for ``--warmup-epochs`` epochs, then with fake quantization of every conv and linear
layer (weights and inputs: 4 bits, the first and last layer 8 bits by default); no change to the model's code.
Data: scikit-learn's bundled 8x8 digits.

    python examples/plain_python.py            # 12 epochs, about a minute on a CPU
    python examples/plain_python.py --fast     # smoke test: a few batches per epoch
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import DigitsDataModule, QuantizationCallback


class DigitsClassifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about quantization."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="total epochs (float warmup + QAT)")
    parser.add_argument("--warmup-epochs", type=int, default=4, help="float epochs before fake quantization")
    parser.add_argument("--fast", action="store_true", help="1 float + 1 QAT epoch of 3 batches (smoke test)")
    args = parser.parse_args(argv)
    epochs, warmup_epochs = (2, 1) if args.fast else (args.epochs, args.warmup_epochs)

    pl.seed_everything(0)
    model = DigitsClassifier()
    quantization = QuantizationCallback(bits=4, warmup_epochs=warmup_epochs)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[quantization],
        limit_train_batches=3 if args.fast else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    print(f"val/acc: float warmup {quantization.fp32_score:.4f}, 4-bit QAT {quantization.quantized_score:.4f}")
    return {"model": model, "callback": quantization}


if __name__ == "__main__":
    main()
