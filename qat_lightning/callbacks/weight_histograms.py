"""``WeightHistograms``: per-layer weight histograms, their quantized codes and scales, and quantization error."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from qat_lightning.callbacks._tensorboard import TensorBoardWriter, epoch_end_step
from qat_lightning.nn import FakeQuantizedLayer, is_quantizable, weight_channel_axis
from qat_lightning.quant import FakeQuantizer, check_bits, weight_config
from qat_lightning.quant.error import max_abs_error, sqnr_db


class WeightQuantization(NamedTuple):
    """A layer's weight on its integer grid: ``codes`` (int32, shape of the weight), per-channel ``scale``
    (``(C_out,)``, or ``()`` per tensor) and the ``dequantized`` weight (float, shape of the weight)."""

    codes: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor


@torch.no_grad()
def quantize_layer_weight(layer: nn.Module, bits: int) -> WeightQuantization:
    """Quantize ``layer.weight`` as training does: with the layer's own weight quantizer once it is
    fake-quantized and calibrated, else per-channel symmetric at ``bits`` over the current weight's range.

    ``dequantized`` is the fake-quantized weight of the forward pass (torch's fused kernel) and ``codes`` are
    read off it, so both agree with training even where a weight falls exactly between two grid points.
    """
    weight = layer.weight.detach()
    if isinstance(layer, FakeQuantizedLayer) and layer.weight_quantizer.calibrated:
        quantizer = layer.weight_quantizer
    else:
        axis = weight_channel_axis(layer)
        config = dataclasses.replace(weight_config(bits), channel_axis=axis)
        quantizer = FakeQuantizer(config, weight.shape[axis]).to(weight.device)
        quantizer(weight)  # a new quantizer is in training mode: this records the weight's range
    was_training = quantizer.training
    quantizer.eval()  # apply the recorded scale without observing again
    dequantized = quantizer(weight)
    quantizer.train(was_training)
    return WeightQuantization(quantizer.quantize(dequantized), quantizer.scale, dequantized)


class WeightHistograms(Callback):
    r"""Shows, every ``every_n_epochs`` training epochs, how each Conv/ConvTranspose/Linear layer's weights sit on
    their grid (a fake-quantized attention module's ``out_proj`` included; its in-projection is not shown).

    TensorBoard histograms (tags per layer ``<name>``, as in ``model.named_modules()``):

    - ``weights/<name>/float``: the float weights (after any weight normalization);
    - ``weights/<name>/codes``: their integer codes on the quantization grid;
    - ``weights/<name>/scale``: the per-channel scales (weight units per integer step).

    Scalars (through ``LightningModule.log``, so any logger records them):

    - ``quant_error/<name>/sqnr_db``: signal-to-quantization-noise ratio of the weights in dB;
    - ``quant_error/<name>/max_abs``: the largest absolute weight error, in weight units.

    Fake-quantized layers use their own weight quantizer, so their grid is the one the model's plan gave them;
    float layers (during the FP32 warmup, or without QAT) are quantized per-channel symmetric at ``bits``.
    Histograms need a ``TensorBoardLogger``; with other loggers the callback warns once and logs only the
    scalars. Everything is logged at the step of the epoch's last batch, like Lightning's own epoch metrics.

    Args:
        bits: grid of float layers, 2..16 (set it to the QAT recipe's bits to see the warmup on that grid).
        every_n_epochs: log at the end of every n-th training epoch.
    """

    def __init__(self, bits: int = 8, every_n_epochs: int = 1) -> None:
        check_bits(bits)
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}.")
        self.bits = bits
        self.every_n_epochs = every_n_epochs
        self._writer = TensorBoardWriter(type(self).__name__, "weight histograms")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        writer = self._writer(trainer)
        step = epoch_end_step(trainer)
        for name, layer in pl_module.named_modules():
            single_weight = is_quantizable(layer) and not isinstance(layer, nn.MultiheadAttention)
            if not (isinstance(layer, FakeQuantizedLayer) or single_weight):
                continue
            weight = layer.weight.detach()
            grid = quantize_layer_weight(layer, self.bits)
            if writer is not None:
                writer.add_histogram(f"weights/{name}/float", weight, step)
                writer.add_histogram(f"weights/{name}/codes", grid.codes, step)
                writer.add_histogram(f"weights/{name}/scale", grid.scale, step)
            pl_module.log(f"quant_error/{name}/sqnr_db", float(sqnr_db(weight, grid.dequantized)))
            pl_module.log(f"quant_error/{name}/max_abs", float(max_abs_error(weight, grid.dequantized)))
