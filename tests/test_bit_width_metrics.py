"""``quantized_snapshot``/``float_snapshot`` semantics and the ``BitWidthMetrics`` callback."""

from __future__ import annotations

import copy
import csv
from collections import defaultdict
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn import metrics as skm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from qat_lightning import (
    BitWidthMetrics,
    DigitsDataModule,
    ImageClassifier,
    QuantizationCallback,
    SmallCNN,
    apply_plan,
    fake_quantized_layers,
    float_snapshot,
    is_prepared,
    plan_quantization,
    quantized_snapshot,
)
from qat_lightning.quant import FakeQuantizer

TRAIN_BATCHES = 4


def _trainer(tmp_path, callbacks: list, max_epochs: int = 2, logger: Any = False) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=3,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )


def _state(module: nn.Module) -> dict[str, object]:
    """Tensors cloned; quantizers' extra state (their config dicts) copied."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def _numpy_symmetric_per_channel(weight: torch.Tensor, bits: int) -> np.ndarray:
    """Independent per-channel symmetric fake quantization as torch's fused kernel does it: float32
    ``round_half_even(w * (1 / scale))``."""
    w = weight.detach().numpy().astype(np.float32)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    max_abs = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = (max_abs / np.float32((qmax - qmin) / 2)).astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    return np.clip(np.round(w * (np.float32(1) / scale)), qmin, qmax) * scale


# ---------------------------------------------------------------------------- snapshot semantics


def test_float_model_snapshot_is_min_max_ptq_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    before = _state(model)
    calibration = [torch.randn(16, 1, 8, 8), 3 * torch.randn(16, 1, 8, 8)]

    # Independent record of each layer's input range over the calibration batches (float forward passes).
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    reference = copy.deepcopy(model).eval()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
        for name, m in reference.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        for x in calibration:
            reference(x)
    for hook in hooks:
        hook.remove()

    snapshot = quantized_snapshot(model, 3, calibration)
    _assert_same_state(before, _state(model))
    assert model.training and not is_prepared(model)
    assert not snapshot.training
    layers = dict(fake_quantized_layers(snapshot))
    assert sorted(layers) == sorted(seen)
    for name, layer in layers.items():
        np.testing.assert_allclose(
            layer.quantized_weight().detach().numpy(), _numpy_symmetric_per_channel(layer.weight, 3), rtol=1e-6
        )
        lo = min(float(t.min()) for t in seen[name])
        hi = max(float(t.max()) for t in seen[name])
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        expected_scale = (hi - lo) / 7
        quantizer = layer.input_quantizer
        assert quantizer.config.bits == 3 and quantizer.config.observer == "minmax"
        assert float(quantizer.scale) == pytest.approx(expected_scale, rel=1e-6)
        assert int(quantizer.zero_point) == int(np.clip(-np.round(lo / expected_scale), 0, 7))


def test_float_model_snapshot_weights_only_per_tensor_and_missing_calibration() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    snapshot = quantized_snapshot(model, 4, quantize_activations=False)
    assert all(isinstance(layer.input_quantizer, nn.Identity) for _, layer in fake_quantized_layers(snapshot))

    per_tensor = quantized_snapshot(model, 4, quantize_activations=False, per_channel=False)
    for _, layer in fake_quantized_layers(per_tensor):
        w = layer.weight.detach().numpy()
        scale = np.float32(np.abs(w).max()) / np.float32(7.5)
        expected = np.clip(np.round(w * (np.float32(1) / scale)), -8, 7) * scale
        assert layer.weight_quantizer.scale.shape == ()
        np.testing.assert_allclose(layer.quantized_weight().detach().numpy(), expected, rtol=1e-6)

    with pytest.raises(ValueError, match="`calibration_inputs` is empty"):
        quantized_snapshot(model, 4)
    with pytest.raises(ValueError, match="`bits` must be an integer in 2..16"):
        quantized_snapshot(model, 1, quantize_activations=False)


def test_qat_model_snapshot_regrids_the_models_own_quantizers() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, bits=4, first_last_bits=None))
    model.train()
    for _ in range(3):
        model(torch.randn(32, 1, 8, 8))  # observers record weight and activation ranges
    model.eval()
    before = _state(model)
    x = torch.randn(64, 1, 8, 8)

    same = quantized_snapshot(model, 4)
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)

    eight = quantized_snapshot(model, 8)
    for (_, ours), (_, theirs) in zip(fake_quantized_layers(eight), fake_quantized_layers(model), strict=True):
        pairs = ((ours.weight_quantizer, theirs.weight_quantizer), (ours.input_quantizer, theirs.input_quantizer))
        for q, q_model in pairs:
            assert q.config.bits == 8 and q_model.config.bits == 4
            torch.testing.assert_close(q.observer.min_val, q_model.observer.min_val)  # same recorded range
            # Same range on a finer grid: (qmax - qmin) is 255 at 8 bits and 15 at 4 bits, in both schemes.
            torch.testing.assert_close(q.scale * 255, q_model.scale * 15)
    _assert_same_state(before, _state(model))
    assert all(q.config.bits == 4 for q in model.modules() if isinstance(q, FakeQuantizer))

    fp32 = float_snapshot(model)
    assert not is_prepared(fp32) and is_prepared(model)
    reference = copy.deepcopy(model)
    for _, layer in fake_quantized_layers(reference):
        layer.weight_quantizer.fake_quant_enabled = False
        layer.input_quantizer.fake_quant_enabled = False
    torch.testing.assert_close(fp32(x), reference(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- the callback


class RecordingBitWidthMetrics(BitWidthMetrics):
    """Keeps, per bit width, the predictions and targets of the last validation epoch."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self.by_model: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.targets: list[torch.Tensor] = []

    def predict(self, model, inputs):
        logits = super().predict(model, inputs)
        self.by_model[id(model)].append(logits.argmax(dim=1))
        return logits

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.targets.append(batch[1])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.snapshots:
            self.predictions = {b: torch.cat(self.by_model[id(m)]) for b, m in self.snapshots.items()}
            self.all_targets = torch.cat(self.targets)
        super().on_validation_epoch_end(trainer, pl_module)


def test_metrics_equal_sklearn_on_the_same_predictions(tmp_path) -> None:
    L.seed_everything(0)
    callback = RecordingBitWidthMetrics(eval_bits=(2, 8))
    trainer = _trainer(tmp_path, [QuantizationCallback(bits=4, warmup_epochs=1, first_last_bits=None), callback])
    trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule())

    assert set(callback.predictions) == {2, 4, 8, None}  # the training bit width is always evaluated
    y = callback.all_targets.numpy()
    logged = trainer.callback_metrics
    for bits, predictions in callback.predictions.items():
        p = predictions.numpy()
        assert len(p) == len(y) > 0
        expected = {
            "acc": skm.accuracy_score(y, p),
            "precision": skm.precision_score(y, p, average="macro", zero_division=0),
            "recall": skm.recall_score(y, p, average="macro", zero_division=0),
            "f1": skm.f1_score(y, p, average="macro", zero_division=0),
        }
        for name, value in expected.items():
            key = f"{BitWidthMetrics.prefix(bits)}/{name}"
            assert float(logged[key]) == pytest.approx(value, abs=1e-6), key
            assert callback.results[bits][name] == pytest.approx(value, abs=1e-6)
    # At the training bit width the copy computes what the model computes.
    for name in ("acc", "precision", "recall", "f1"):
        assert float(logged[f"val_4bit/{name}"]) == float(logged[f"val/{name}"])
    # The progress bar shows the column of the model's own bit width, read from its quantizers.
    assert callback.train_bits == (4,)
    assert trainer.progress_bar_metrics["val_train_bits/acc"] == pytest.approx(float(logged["val_4bit/acc"]))
    assert not {"val_2bit/acc", "val_4bit/acc", "val_fp32/acc"} & set(trainer.progress_bar_metrics)


class NoisyInput(nn.Module):
    """Draws from the global RNG in every forward (train and eval), like stochastic test-time augmentation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-3 * torch.randn_like(x)


def _fit_weights(tmp_path, extra_callbacks: list) -> tuple[dict[str, torch.Tensor], float]:
    L.seed_everything(123)
    model = ImageClassifier(nn.Sequential(NoisyInput(), SmallCNN()))
    callbacks = [QuantizationCallback(bits=4, warmup_epochs=1, freeze_bn_epoch=2), *extra_callbacks]
    trainer = _trainer(tmp_path, callbacks, max_epochs=3)
    trainer.fit(model, DigitsDataModule())
    return _state(model), float(trainer.callback_metrics["val/acc"])


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path) -> None:
    reference, reference_acc = _fit_weights(tmp_path / "a", [])
    callback = BitWidthMetrics(eval_bits=(2, 8))
    observed, observed_acc = _fit_weights(tmp_path / "b", [callback])
    assert callback.results  # it did evaluate
    assert any(k.endswith("running_mean") for k in observed) and any(k.endswith("observer.min_val") for k in observed)
    _assert_same_state(reference, observed)  # parameters, BN statistics, observers and quantizer buffers
    assert observed_acc == reference_acc


def test_event_files_and_fit_end_table(tmp_path) -> None:
    L.seed_everything(0)
    callback = BitWidthMetrics(eval_bits=(2, 8, 16))
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = _trainer(tmp_path, [QuantizationCallback(bits=4, warmup_epochs=1), callback], max_epochs=2, logger=logger)
    trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule())

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    epoch_steps = [TRAIN_BATCHES * (epoch + 1) - 1 for epoch in range(2)]
    # 4 bits is not in `eval_bits`: it is evaluated once the model carries 4-bit quantizers (the QAT epoch).
    steps = {"val_2bit": epoch_steps, "val_4bit": epoch_steps[1:], "val_8bit": epoch_steps}
    for prefix, expected_steps in {**steps, "val_16bit": epoch_steps, "val_fp32": epoch_steps}.items():
        for name in ("acc", "precision", "recall", "f1"):
            assert [e.step for e in events.Scalars(f"{prefix}/{name}")] == expected_steps
    assert events.Scalars("val_4bit/acc")[-1].value == pytest.approx(float(trainer.callback_metrics["val_4bit/acc"]))
    assert "bit_width_metrics/plot" in tags["images"]
    assert [e.step for e in events.Images("bit_width_metrics/plot")] == [epoch_steps[-1]]
    assert "bit_width_metrics/text_summary" in tags["tensors"]
    (text_event,) = events.Tensors("bit_width_metrics/text_summary")
    assert text_event.step == epoch_steps[-1]
    text = text_event.tensor_proto.string_val[0].decode()
    assert text == callback.table.to_markdown()
    assert text.splitlines()[0] == "| metric | 2-bit | 4-bit | 8-bit | 16-bit | fp32 |"

    log_dir = tmp_path / "tb" / "version_0"
    assert (log_dir / "bit_width_metrics.md").read_text() == text
    assert (log_dir / "bit_width_metrics.png").stat().st_size > 0
    with open(log_dir / "bit_width_metrics.csv") as f:
        rows = list(csv.reader(f))
    assert [row[0] for row in rows[1:]] == ["acc", "precision", "recall", "f1"]
    header = rows[0][1:]
    for row in rows[1:]:
        for label, value in zip(header, row[1:], strict=True):
            prefix = "val_fp32" if label == "fp32" else f"val_{label.removesuffix('-bit')}bit"
            assert float(value) == pytest.approx(float(trainer.callback_metrics[f"{prefix}/{row[0]}"]))


def test_float_model_without_qat_shows_fp32_in_progress_bar(tmp_path) -> None:
    L.seed_everything(0)
    callback = BitWidthMetrics(eval_bits=(4,), calibration_batches=2)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    model = ImageClassifier(SmallCNN())
    trainer.fit(model, DigitsDataModule())
    assert not is_prepared(model)
    assert len(callback._calibration_inputs) == 2
    assert set(callback.results) == {4, None}
    assert float(trainer.callback_metrics["val_fp32/acc"]) == float(trainer.callback_metrics["val/acc"])
    assert callback.train_bits == ()
    assert trainer.progress_bar_metrics["val_train_bits/acc"] == float(trainer.callback_metrics["val_fp32/acc"])
    assert (tmp_path / "bit_width_metrics.csv").exists()  # no logger: the table goes to default_root_dir

    # Validation alone has no training batch to calibrate activations with: weights only, with a warning.
    validator = BitWidthMetrics(eval_bits=(4,))
    with pytest.warns(UserWarning, match="no training batch seen"):
        _trainer(tmp_path, [validator]).validate(model, DigitsDataModule(), verbose=False)
    assert set(validator.results) == {4, None}


def test_bad_arguments_and_batches() -> None:
    with pytest.raises(ValueError, match="`eval_bits` must be an integer in 2..16, got 1"):
        BitWidthMetrics(eval_bits=(1, 4))
    with pytest.raises(TypeError, match="`eval_bits` must be a sequence"):
        BitWidthMetrics(eval_bits=4)
    with pytest.raises(ValueError, match="`calibration_batches` must be a positive integer"):
        BitWidthMetrics(calibration_batches=0)
    with pytest.raises(TypeError, match="override `unpack_batch`"):
        BitWidthMetrics().unpack_batch({"image": torch.zeros(1), "label": torch.zeros(1)})
    assert BitWidthMetrics(eval_bits=[8, 2, 8]).eval_bits == (2, 8)
