"""Accuracy of naive PTQ, our PTQ and our QAT at 2/4/8 bits on the digits data, for two models.

Methods (test accuracy on the held-out split of the 8x8 digits, fixed seeds):

- ``fp32``: the float model, trained for ``--epochs`` epochs; every other method starts from it.
- ``ptq_naive_<b>``: the ResNet-20 write-up's method: per-tensor min/max ranges for weights and inputs of every
  layer at b bits, calibrated on 10 batches.
- ``ptq_<b>``: our PTQ defaults: per-channel weights, MSE-searched input ranges, first/last layer at 8 bits.
- ``qat_<b>``: ``QuantizationCallback(bits=b, warmup_epochs=0)`` defaults (LSQ at <= 4 bits, first/last layer at
  8 bits), fine-tuning the float model for ``--qat-epochs`` epochs.
- ``brevitas_qat_2`` (CNN, when brevitas is installed: the ``bench`` extra): the same CNN with Brevitas quantized
  layers, weights and activations at 2 bits in the middle layer, 8 bits first/last, same fine-tuning budget.

Models: the small CNN on 8x8 inputs and ResNet-20 with the inputs resized to 32x32 (3 channels).
Prints a table, then one JSON object of accuracies (0..1) keyed ``<model>_<method>`` on the last line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.calibration import calibrate
from qat_lightning.nn import apply_plan, plan_quantization

BITS = (2, 4, 8)


class Resized(nn.Module):
    """Upsamples ``(N, 1, 8, 8)`` digits to ``(N, 3, size, size)`` before ``backbone`` (no parameters)."""

    def __init__(self, backbone: nn.Module, size: int = 32) -> None:
        super().__init__()
        self.backbone, self.size = backbone, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.backbone(x.expand(-1, 3, -1, -1))


def build(model_name: str) -> nn.Module:
    if model_name == "cnn":
        return SmallCNN()
    from qat_lightning.models import resnet20

    return Resized(resnet20(num_classes=10))


def fit(model: ImageClassifier, dm: DigitsDataModule, epochs: int, callbacks: list) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, dm)


@torch.no_grad()
def test_accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    model.eval()
    x, y = dm.splits["test"].tensors
    return (model(x).argmax(1) == y).float().mean().item()


def ptq(float_model: ImageClassifier, dm: DigitsDataModule, bits: int, naive: bool) -> float:
    model = copy.deepcopy(float_model)
    if naive:
        plan = plan_quantization(
            model,
            bits,
            first_last_bits=None,
            per_channel_weights=False,
            weight_observer="minmax",
            activation_observer="minmax",
            learned_scale=False,
        )
    else:
        plan = plan_quantization(model, bits, first_last_bits=8, activation_observer="mse", learned_scale=False)
    apply_plan(model, plan)
    calibrate(model, dm.train_dataloader(), lambda batch, i: model(batch[0]), num_batches=10)
    return test_accuracy(model, dm)


def qat(float_model: ImageClassifier, dm: DigitsDataModule, bits: int, epochs: int, lr: float) -> float:
    model = copy.deepcopy(float_model).train()  # test_accuracy left it in eval mode, which Lightning keeps
    model.hparams.lr = lr
    fit(model, dm, epochs, [QuantizationCallback(bits=bits, warmup_epochs=0)])
    return test_accuracy(model, dm)


def brevitas_cnn(float_cnn: SmallCNN, bits: int) -> nn.Module:
    """The small CNN in Brevitas layers: middle conv and activations at ``bits``, first/last layer at 8 bits."""
    import brevitas.nn as qnn

    c1, c2 = float_cnn.features[0].out_channels, float_cnn.features[4].out_channels
    model = nn.Sequential(
        qnn.QuantIdentity(bit_width=8, return_quant_tensor=False),
        qnn.QuantConv2d(1, c1, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(c1),
        qnn.QuantReLU(bit_width=bits),
        nn.MaxPool2d(2),
        qnn.QuantConv2d(c1, c2, 3, padding=1, bias=False, weight_bit_width=bits),
        nn.BatchNorm2d(c2),
        qnn.QuantReLU(bit_width=8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        qnn.QuantLinear(float_cnn.classifier.in_features, 10, bias=True, weight_bit_width=8),
    )
    float_layers = [float_cnn.features[i] for i in (0, 1, 4, 5)] + [float_cnn.classifier]
    quant_layers = [model[i] for i in (1, 2, 5, 6, 10)]
    for src, dst in zip(float_layers, quant_layers, strict=True):
        dst.load_state_dict(src.state_dict(), strict=False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs (a smoke run, not the reference figures)")
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet20"], choices=["cnn", "resnet20"])
    args = parser.parse_args()
    epochs, qat_epochs = (4, 2) if args.quick else (30, 15)
    torch.set_num_threads(2)
    results: dict[str, float] = {}
    start = time.perf_counter()
    for model_name in args.models:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule()
        dm.setup()
        float_model = ImageClassifier(build(model_name), lr=3e-3)
        fit(float_model, dm, epochs, [])
        results[f"{model_name}_fp32"] = test_accuracy(float_model, dm)
        for bits in BITS:
            results[f"{model_name}_ptq_naive_{bits}"] = ptq(float_model, dm, bits, naive=True)
            results[f"{model_name}_ptq_{bits}"] = ptq(float_model, dm, bits, naive=False)
            pl.seed_everything(bits, verbose=False)
            results[f"{model_name}_qat_{bits}"] = qat(float_model, dm, bits, qat_epochs, lr=1e-3)
        if model_name == "cnn" and importlib.util.find_spec("brevitas") is not None:
            pl.seed_everything(2, verbose=False)
            brevitas = ImageClassifier(brevitas_cnn(float_model.backbone, 2), lr=1e-3)
            fit(brevitas, dm, qat_epochs, [])
            results["cnn_brevitas_qat_2"] = test_accuracy(brevitas, dm)
        print(f"[{model_name} done after {time.perf_counter() - start:.0f} s]", flush=True)

    methods = ["fp32"] + [f"{m}_{b}" for b in BITS for m in ("ptq_naive", "ptq", "qat")] + ["brevitas_qat_2"]
    print(f"\n{'method':<16}" + "".join(f"{m:>10}" for m in args.models))
    for method in methods:
        cells = [results.get(f"{m}_{method}") for m in args.models]
        if any(c is not None for c in cells):
            print(f"{method:<16}" + "".join(f"{c * 100:>9.1f}%" if c is not None else f"{'-':>10}" for c in cells))
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
