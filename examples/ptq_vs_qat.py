"""Post-training quantization (PTQ) against quantization-aware training (QAT), per bit width.

1. Train the small CNN in float on scikit-learn's bundled 8x8 digits.
2. PTQ: fake-quantize a copy of it (``plan_quantization`` + ``apply_plan``), ``calibrate`` its quantizers on a
   few training batches (observers only: BatchNorm keeps its statistics, no gradient), evaluate.
3. QAT: fine-tune another copy with ``QuantizationCallback(bits, warmup_epochs=0)``, evaluate.

Both keep the first and last layer at 8 bits (the callback's default) and quantize the others at ``bits``.

Prints a table of test accuracy (float, PTQ, QAT) for each bit width and, last, one JSON line.

    python examples/ptq_vs_qat.py                 # bits 8 4 2; a few minutes on a CPU
    python examples/ptq_vs_qat.py --fast          # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from qat_lightning import (
    DigitsDataModule,
    ImageClassifier,
    QuantizationCallback,
    QuantizationRecipe,
    SmallCNN,
    calibrate,
)
from qat_lightning.nn import apply_plan, plan_quantization


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Share of correctly classified images, in eval mode."""
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in loader)
    return correct / len(loader.dataset)


def post_training_quantize(model: nn.Module, bits: int, loader: DataLoader, batches: int) -> nn.Module:
    """A fake-quantized copy of ``model`` whose quantizers observed ``batches`` batches of ``loader``, with the
    settings of the callback's PTQ mode (MSE-searched activation ranges)."""
    quantized = copy.deepcopy(model)
    recipe = QuantizationRecipe(bits=bits, learned_scale=False, activation_observer="mse")  # 8-bit first/last
    apply_plan(quantized, plan_quantization(quantized, recipe=recipe))
    calibrate(quantized, loader, forward=lambda batch, _: quantized(batch[0]), num_batches=batches)
    return quantized.eval()


def trainer(epochs: int, fast: bool, callbacks: list[pl.Callback] = ()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        limit_train_batches=3 if fast else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2], help="bit widths to compare")
    parser.add_argument("--float-epochs", type=int, default=20, help="epochs of float training")
    parser.add_argument("--qat-epochs", type=int, default=10, help="epochs of QAT fine-tuning per bit width")
    parser.add_argument("--calibration-batches", type=int, default=8, help="training batches PTQ observes")
    parser.add_argument("--fast", action="store_true", help="few epochs of 3 batches (smoke test)")
    args = parser.parse_args(argv)
    float_epochs, qat_epochs = (3, 1) if args.fast else (args.float_epochs, args.qat_epochs)

    pl.seed_everything(0)
    data = DigitsDataModule()
    data.setup()
    float_model = ImageClassifier(SmallCNN(input_size=8), num_classes=10, lr=3e-3)
    trainer(float_epochs, args.fast).fit(float_model, datamodule=data)
    backbone = float_model.backbone
    results: dict[str, Any] = {"float": accuracy(backbone, data.test_dataloader()), "bits": {}}

    for bits in args.bits:
        ptq = post_training_quantize(backbone, bits, data.train_dataloader(), args.calibration_batches)
        # train(): the copy of the evaluated backbone is in eval mode, which Lightning keeps (no QAT would happen).
        qat = ImageClassifier(copy.deepcopy(backbone).train(), num_classes=10, lr=1e-3)
        trainer(qat_epochs, args.fast, [QuantizationCallback(bits=bits, warmup_epochs=0)]).fit(qat, datamodule=data)
        results["bits"][bits] = {
            "ptq": accuracy(ptq, data.test_dataloader()),
            "qat": accuracy(qat.backbone, data.test_dataloader()),
        }

    print(f"\ntest accuracy, float: {results['float']:.4f}")
    print(f"{'bits':>4} {'PTQ':>8} {'QAT':>8}")
    for bits, row in results["bits"].items():
        print(f"{bits:>4} {row['ptq']:>8.4f} {row['qat']:>8.4f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
