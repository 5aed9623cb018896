"""Hostile input: NaN/Inf batches must not poison observer ranges or scales; tiny dataloaders; converting a
model that cannot be converted."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN, convert_model
from qat_lightning.convert.cli import main as convert_cli
from qat_lightning.nn import apply_plan, fake_quantized_layers, plan_quantization
from qat_lightning.quant import FakeQuantizer, MinMaxObserver, MovingAverageMinMaxObserver, QuantizerConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_qat4.yaml"


@pytest.mark.parametrize("observer_cls", [MinMaxObserver, MovingAverageMinMaxObserver])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_batch_is_skipped_and_counted(observer_cls, bad):
    observer = observer_cls(QuantizerConfig(bits=8, averaging_constant=0.5))
    observer(torch.tensor([-1.0, 2.0]))
    observer(torch.tensor([bad, 5.0]))
    assert (observer.min_val.item(), observer.max_val.item()) == (-1.0, 2.0)
    assert observer.skipped.item() == 1
    observer(torch.tensor([-3.0, 4.0]))
    expected = (-3.0, 4.0) if observer_cls is MinMaxObserver else (-2.0, 3.0)
    assert (observer.min_val.item(), observer.max_val.item()) == expected


def test_non_finite_first_batch_leaves_observer_uninitialised():
    q = FakeQuantizer(QuantizerConfig(bits=4, per_channel=True, symmetric=True), 2)
    q.train()
    q(torch.tensor([[float("nan"), 1.0], [2.0, 3.0]]))
    assert not q.observer.initialized
    q(torch.tensor([[-1.0, 1.0], [2.0, 3.0]]))
    assert q.observer.min_val.tolist() == [-1.0, 2.0]
    assert torch.isfinite(q.scale).all()


def test_training_with_a_nan_batch_keeps_scales_finite_and_warns(tmp_path):
    pl.seed_everything(0)
    x = torch.randn(96, 1, 8, 8)
    y = torch.randint(0, 10, (96,))
    x[40, 0, 0, 0] = float("nan")  # lands in the second batch of the second epoch (no shuffling)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = ImageClassifier(SmallCNN())
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[QuantizationCallback(bits=4, warmup_epochs=1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match=r"observations of batches with NaN/Inf values were skipped"):
        trainer.fit(model, loader)
    first = dict(fake_quantized_layers(model))["backbone.features.0"]
    assert first.input_quantizer.observer.skipped.item() == 1
    for _, layer in fake_quantized_layers(model):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            assert torch.isfinite(q.scale).all() and torch.isfinite(q.observer.min_val).all()


@pytest.mark.parametrize("samples", [0, 1])
def test_empty_or_one_sample_dataloader(tmp_path, samples):
    x, y = torch.randn(samples, 1, 8, 8), torch.randint(0, 10, (samples,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    model = ImageClassifier(SmallCNN())
    callback = QuantizationCallback(bits=4, warmup_epochs=0)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    if samples:
        assert callback.quantized
        for _, layer in fake_quantized_layers(model):
            assert torch.isfinite(layer.weight_quantizer.scale).all()
        with torch.no_grad():
            assert torch.isfinite(model.eval()(x)).all()


def test_converting_a_prepared_model_that_never_saw_data_names_the_fix(tmp_path):
    """Fake-quantized but never run: no scales exist; the error says how to get them, and following it works.
    (A model never prepared at all: ``tests/test_convert.py::test_convert_model_rejects_bad_input``.)"""
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, 4))
    x = torch.randn(16, 1, 8, 8)
    with pytest.raises(ValueError, match=r"none of its quantizers has seen data.*run a few batches through it"):
        convert_model(model, (x,), tmp_path)
    assert list(tmp_path.iterdir()) == []

    model.train()
    with torch.no_grad():
        model(x)
    result = convert_model(model.eval(), (x,), tmp_path)
    assert result.int8_layers == ["classifier", "features.0", "features.4"]
    assert result.fidelity["pt2"].relative_error < 1e-4 and result.fidelity["onnx"].agreement == 1.0


def test_convert_cli_on_a_checkpoint_of_the_fp32_warmup_names_the_cause(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["qat-lightning-convert"])
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="warmup")
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[QuantizationCallback(bits=4, warmup_epochs=1), checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule(batch_size=64))
    ckpt = tmp_path / "warmup.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        convert_cli(["--config", str(CONFIG), "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "holds no fake-quantized layers: it was saved before QAT started" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_converting_a_diverged_model_names_the_tensors_and_writes_nothing(tmp_path):
    """A NaN weight (training that diverged) would give a file of NaN logits that agrees with the NaN fake-quant
    model; conversion refuses instead, naming the tensor and the fix, and the earlier files stay."""
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, 4))
    x = torch.randn(16, 1, 8, 8)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    first = convert_model(model, (x,), tmp_path)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.features[4].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in `features\.4\.weight`.*gradient_clip_val"):
        convert_model(model, (x,), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == written and first.paths
