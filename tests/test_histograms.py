"""``WeightHistograms``: the per-layer grid numbers against NumPy, and the event files read back."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from qat_lightning import (
    DigitsDataModule,
    ImageClassifier,
    QuantizationCallback,
    SmallCNN,
    WeightHistograms,
    apply_plan,
    plan_quantization,
)
from qat_lightning.callbacks.weight_histograms import quantize_layer_weight

TRAIN_BATCHES = 3
LAYERS = ("backbone.features.0", "backbone.features.4", "backbone.classifier")


def _numpy_grid(weight: torch.Tensor, scale: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric codes and dequantized weight, as torch's kernel rounds: ``w * (1 / scale)``."""
    w = weight.detach().numpy()
    s = scale.reshape(-1, *([1] * (w.ndim - 1))).astype(np.float32)
    codes = np.clip(np.round(w * (np.float32(1) / s)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return codes, codes * s


def _numpy_sqnr(w: np.ndarray, q: np.ndarray) -> float:
    w, q = w.astype(np.float64), q.astype(np.float64)
    return float(10 * np.log10(np.sum(w**2) / np.sum((w - q) ** 2)))


def test_float_layer_is_quantized_per_channel_at_the_given_bits() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3)
    grid = quantize_layer_weight(layer, bits=4)
    w = layer.weight.detach().numpy()
    expected_scale = np.abs(w.reshape(5, -1)).max(axis=1).astype(np.float32) / np.float32(7.5)
    np.testing.assert_allclose(grid.scale.numpy(), expected_scale, rtol=1e-6)
    codes, dequantized = _numpy_grid(layer.weight, grid.scale.numpy(), 4)
    np.testing.assert_array_equal(grid.codes.numpy(), codes)
    np.testing.assert_allclose(grid.dequantized.numpy(), dequantized, rtol=1e-6)
    assert grid.codes.dtype == torch.int32 and grid.codes.min() >= -8 and grid.codes.max() <= 7


def test_fake_quantized_layer_uses_its_own_quantizer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    apply_plan(model, plan_quantization(model, bits=3, activation_bits=0, first_last_bits=None, learned_scale=False))
    model.train()(torch.randn(2, 6))
    layer = model[0]
    with torch.no_grad():
        layer.weight.mul_(0.5)  # weights moved since the observer last looked: the layer's scales still apply
    grid = quantize_layer_weight(layer, bits=8)  # `bits` is for float layers only
    torch.testing.assert_close(grid.scale, layer.weight_quantizer.scale)
    torch.testing.assert_close(grid.dequantized, layer.quantized_weight().detach(), rtol=0, atol=0)
    codes, _ = _numpy_grid(layer.weight, layer.weight_quantizer.scale.numpy(), 3)
    np.testing.assert_array_equal(grid.codes.numpy(), codes)


def _fit(tmp_path, logger, callbacks: list, max_epochs: int = 2) -> tuple[L.Trainer, ImageClassifier]:
    L.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    trainer = L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=1,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, DigitsDataModule())
    return trainer, model


def test_event_files_hold_histograms_and_sqnr_every_epoch(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer, model = _fit(tmp_path, logger, [WeightHistograms(bits=4)], max_epochs=3)

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    epoch_steps = [TRAIN_BATCHES * (epoch + 1) - 1 for epoch in range(3)]
    assert [e.step for e in events.Scalars("val/acc")] == epoch_steps  # the same steps as Lightning's metrics
    modules = dict(model.named_modules())
    for name in LAYERS:
        weight = modules[name].weight.detach()
        for kind in ("float", "codes", "scale"):
            assert [e.step for e in events.Histograms(f"weights/{name}/{kind}")] == epoch_steps
        for kind in ("sqnr_db", "max_abs"):
            assert [e.step for e in events.Scalars(f"quant_error/{name}/{kind}")] == epoch_steps
        # The last epoch's entries describe the final weights (no optimizer step follows the last epoch end).
        last = events.Histograms(f"weights/{name}/float")[-1].histogram_value
        assert last.num == weight.numel()
        assert last.sum == pytest.approx(float(weight.double().sum()), rel=1e-5, abs=1e-5)
        assert (last.min, last.max) == pytest.approx((float(weight.min()), float(weight.max())))
        scale = np.abs(weight.numpy().reshape(weight.shape[0], -1)).max(axis=1).astype(np.float32) / np.float32(7.5)
        scales = events.Histograms(f"weights/{name}/scale")[-1].histogram_value
        assert scales.num == weight.shape[0]
        assert scales.sum == pytest.approx(float(scale.sum()), rel=1e-5)
        codes, dequantized = _numpy_grid(weight, scale, 4)
        code_hist = events.Histograms(f"weights/{name}/codes")[-1].histogram_value
        assert (code_hist.min, code_hist.max, code_hist.sum) == (codes.min(), codes.max(), codes.sum())
        sqnr = events.Scalars(f"quant_error/{name}/sqnr_db")[-1].value
        assert sqnr == pytest.approx(_numpy_sqnr(weight.numpy(), dequantized), rel=1e-5)
        max_abs = events.Scalars(f"quant_error/{name}/max_abs")[-1].value
        assert max_abs == pytest.approx(float(np.abs(weight.numpy() - dequantized).max()), rel=1e-5)
    assert not [t for t in tags["histograms"] if not t.startswith("weights/")]


def test_every_n_epochs_float_layers_at_bits_then_the_grid_of_the_models_plan(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [
        QuantizationCallback(bits=3, warmup_epochs=2, first_last_bits=None),
        WeightHistograms(every_n_epochs=2),
    ]
    trainer, model = _fit(tmp_path, logger, callbacks, max_epochs=4)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    warmup, qat = events.Histograms("weights/backbone.classifier/codes")
    assert (warmup.step, qat.step) == (5, 11)
    # Epoch 1 is float: the 8-bit default grid, whose symmetric range the largest weight of a channel spans.
    low, high = warmup.histogram_value.min, warmup.histogram_value.max
    assert low >= -128 and high <= 127 and (high == 127 or low == -128)
    # Epoch 3 is QAT: the 3-bit grid the plan gave the layer, read from its own quantizer.
    assert model.backbone.classifier.weight_quantizer.config.bits == 3
    assert qat.histogram_value.min >= -4 and qat.histogram_value.max <= 3
    classifier = model.backbone.classifier
    final = events.Histograms("weights/backbone.classifier/scale")[-1].histogram_value
    assert final.sum == pytest.approx(float(classifier.weight_quantizer.scale.sum()), rel=1e-5)


def test_other_loggers_get_scalars_and_one_warning(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv", version=0)
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        _fit(tmp_path, logger, [WeightHistograms()], max_epochs=2)
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("quant_error/backbone.classifier/sqnr_db")]
    assert [int(r["step"]) for r in rows] == [TRAIN_BATCHES - 1, 2 * TRAIN_BATCHES - 1]
    assert all(float(r["quant_error/backbone.classifier/sqnr_db"]) > 30 for r in rows)  # 8-bit default grid


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`bits` must be an integer in 2..16"):
        WeightHistograms(bits=17)
    with pytest.raises(ValueError, match="`every_n_epochs` must be a positive integer"):
        WeightHistograms(every_n_epochs=0)
