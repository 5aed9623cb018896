"""QAT of a custom model with residual additions and depthwise convolutions (MobileNetV2-style blocks).

``QuantizationCallback`` needs no rewrite of the model: every ``nn.Conv2d`` (depthwise ones included, with one
weight scale per channel) and ``nn.Linear`` is fake-quantized in place, and the residual ``x + block(x)`` in
``forward`` stays as it is. Data: scikit-learn's bundled 8x8 digits.

    python examples/custom_model.py            # 15 epochs, a few minutes on a CPU
    python examples/custom_model.py --fast     # smoke test
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, fake_quantized_layers


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise convolution, 1x1 projection; the input is added back to the output."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),  # depthwise
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class TinyMobileNet(nn.Module):
    """A stem convolution, two inverted residual blocks, global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6()
        )
        self.blocks = nn.Sequential(InvertedResidual(channels), InvertedResidual(channels))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="total epochs (float warmup + QAT)")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bit width")
    parser.add_argument("--fast", action="store_true", help="2 epochs of 3 training batches (smoke test)")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    epochs = 2 if args.fast else args.epochs
    model = ImageClassifier(TinyMobileNet(), num_classes=10, lr=1e-2)
    quantization = QuantizationCallback(bits=args.bits, warmup_epochs=epochs // 2)
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
    for name, layer in fake_quantized_layers(model):
        groups = getattr(layer, "groups", 1)
        kind = "depthwise" if groups > 1 and groups == layer.in_channels else type(layer).float_class.__name__
        print(f"{name:28s} {kind:10s} weight scales: {tuple(layer.weight_quantizer.scale.shape)}")
    print(f"val/acc float {quantization.fp32_score:.4f}, {args.bits}-bit QAT {quantization.quantized_score:.4f}")
    return {"model": model, "callback": quantization}


if __name__ == "__main__":
    main()
