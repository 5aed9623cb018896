"""Conversion to int8: at fit end, standalone and from the CLI; checked against the fake-quant model it came from."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN, convert_model
from qat_lightning.convert import load_packed_weights, measure_fidelity
from qat_lightning.convert.backends import backend
from qat_lightning.convert.cli import default_output_dir
from qat_lightning.convert.cli import main as cli_main
from qat_lightning.nn import apply_plan, fake_quantized_layers, plan_quantization
from qat_lightning.quant import activation_config, weight_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_qat4.yaml"


def _trainer(root: Path, callbacks: list, max_epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )


@functools.cache
def _train(bits: int, activation_bits: int, root: Path) -> SimpleNamespace:
    """Digits CNN: 1 FP32 epoch, then 3 of QAT (BN frozen at epoch 2, observers at 3); converted at fit end."""
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    callback = QuantizationCallback(
        bits=bits, activation_bits=activation_bits, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=3
    )
    trainer = _trainer(root / f"w{bits}a{activation_bits}", [callback], max_epochs=4)
    trainer.fit(model, datamodule)
    model.eval()
    quantized_dir = Path(trainer.log_dir) / "quantized"
    return SimpleNamespace(bits=bits, trainer=trainer, model=model, datamodule=datamodule, dir=quantized_dir)


@pytest.fixture(scope="module", params=[(8, 8), (8, 7), (4, 4), (2, 2)], ids=["w8a8", "w8a7", "w4a4", "w2a2"])
def trained(request, tmp_path_factory) -> SimpleNamespace:
    return _train(*request.param, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def trained4(tmp_path_factory) -> SimpleNamespace:
    return _train(4, 4, tmp_path_factory.getbasetemp())


def _run_pt2(path: Path):
    program = torch.export.load(path).module()
    return lambda x: program(x)


def _run_onnx(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input0": x.numpy()})[0])


RUNNERS = {"pt2": (_run_pt2, "model_int8.pt2"), "onnx": (_run_onnx, "model_int8.onnx")}


def _val_predictions(fn, datamodule: DigitsDataModule) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            preds.append(fn(x).argmax(dim=1).numpy())
            labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def test_fit_end_writes_every_default_file_and_the_report_in_the_log_dir(trained4) -> None:
    names = sorted(p.name for p in trained4.dir.iterdir())
    assert names == ["conversion_report.json", "model_int8.onnx", "model_int8.pt2", "model_w4.packed.pt"]
    report = json.loads((trained4.dir / "conversion_report.json").read_text())
    assert report["failed"] == {} and report["float_layers"] == {}
    assert report["int8_layers"] == ["backbone.classifier", "backbone.features.0", "backbone.features.4"]
    for fmt in ("pt2", "onnx"):
        assert report["files"][fmt]["bytes"] == (trained4.dir / f"model_int8.{fmt}").stat().st_size
        fidelity = report["fidelity"][fmt]
        assert fidelity["samples"] == 270 and fidelity["agreement"] >= 0.99, fidelity


@pytest.mark.parametrize("fmt", sorted(RUNNERS))
def test_each_file_agrees_with_the_fake_quant_model_on_digits_validation(trained, fmt) -> None:
    run, name = RUNNERS[fmt]
    converted = run(trained.dir / name)
    fake_quant_pred, labels = _val_predictions(trained.model, trained.datamodule)
    converted_pred, _ = _val_predictions(converted, trained.datamodule)

    fake_quant_acc, converted_acc = (fake_quant_pred == labels).mean(), (converted_pred == labels).mean()
    assert fake_quant_acc > 0.85  # the model learned something, so agreement is not trivial
    assert (converted_pred == fake_quant_pred).mean() >= 0.99
    assert abs(converted_acc - fake_quant_acc) <= 0.004
    x, _ = next(iter(trained.datamodule.val_dataloader()))
    with torch.no_grad():
        expected = trained.model(x)
        relative_error = float((converted(x) - expected).norm() / expected.norm())
    assert relative_error <= 0.02


@pytest.mark.parametrize("fmt", sorted(RUNNERS))
def test_each_file_runs_on_any_batch_size(trained4, fmt) -> None:
    run, name = RUNNERS[fmt]
    converted = run(trained4.dir / name)
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        for batch in (1, 3, 64):
            torch.testing.assert_close(converted(x[:batch]), trained4.model(x[:batch]), rtol=0, atol=1e-3)


def test_pt2_and_onnx_files_load_and_run_where_qat_lightning_cannot_be_imported(trained4, tmp_path) -> None:
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        torch.save({"x": x, "expected": trained4.model(x)}, tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['qat_lightning'] = None; sys.modules['torchao'] = None\n"  # imports would fail
        "import torch, onnxruntime\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"program = torch.export.load({str(trained4.dir / 'model_int8.pt2')!r}).module()\n"
        f"session = onnxruntime.InferenceSession({str(trained4.dir / 'model_int8.onnx')!r})\n"
        "onnx_out = torch.from_numpy(session.run(None, {'input0': io['x'].numpy()})[0])\n"
        "pt2_out = program(io['x'])\n"
        "print(float((pt2_out - io['expected']).abs().max()), float((onnx_out - io['expected']).abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    pt2_error, onnx_error = map(float, run.stdout.strip().splitlines()[-1].split())
    assert pt2_error < 1e-3 and onnx_error < 1e-3


def test_int8_files_store_weights_as_int8_codes(trained4) -> None:
    import onnx
    from onnx import numpy_helper

    layers = dict(fake_quantized_layers(trained4.model))
    proto = onnx.load(str(trained4.dir / "model_int8.onnx"))
    int8 = onnx.TensorProto.INT8
    codes = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == int8 and len(i.dims) > 1]
    assert sorted(c.shape for c in codes) == sorted(tuple(layer.weight.shape) for layer in layers.values())
    middle = next(c for c in codes if c.shape == tuple(layers["backbone.features.4"].weight.shape))
    assert middle.min() >= -8 and middle.max() <= 7  # the 4-bit layer's codes
    program = torch.export.load(trained4.dir / "model_int8.pt2")
    stored = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    assert sorted(t.shape for t in stored) == sorted(layer.weight.shape for layer in layers.values())


def test_packed_file_reloads_the_trained_weights(trained4) -> None:
    state = load_packed_weights(trained4.dir / "model_w4.packed.pt")
    float_model = ImageClassifier(SmallCNN())
    float_model.load_state_dict(state)
    for name, layer in fake_quantized_layers(trained4.model):
        assert torch.equal(float_model.get_submodule(name).weight, layer.quantized_weight())


def test_cli_converts_a_checkpoint(trained4, tmp_path) -> None:
    (ckpt,) = Path(trained4.trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    result = cli_main(["--config", str(CONFIG), "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path)])

    assert result.paths["pt2"] == tmp_path / "model_int8.pt2" and result.paths["pt2"].is_file()
    assert result.fidelity["onnx"].agreement >= 0.99 and result.fidelity["onnx"].samples == 270
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(_run_pt2(result.paths["pt2"])(x), trained4.model(x), rtol=0, atol=1e-3)


def test_cli_writes_next_to_the_run_by_default() -> None:
    assert default_output_dir(Path("logs/version_3/checkpoints/last.ckpt")) == Path("logs/version_3/quantized")
    assert default_output_dir(Path("models/qat.ckpt")) == Path("models/quantized")


def _calibrated(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    return model.eval()


def test_a_layer_the_backend_cannot_run_stays_float_and_the_file_runs(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    wide = {"weight": weight_config(16), "activation": activation_config(16)}
    plan = [dataclasses.replace(p, **wide) if p.name == "classifier" else p for p in plan_quantization(model, 4)]
    apply_plan(model, plan)
    _calibrated(model)
    x = torch.randn(16, 1, 8, 8)

    with pytest.warns(UserWarning, match=r"layer `classifier` stays float \(16-bit weights"):
        result = convert_model(model, (x,), tmp_path)

    assert result.float_layers == {"classifier": "16-bit weights (integer kernels take at most 8)"}
    assert result.int8_layers == ["features.0", "features.4"]
    with torch.no_grad():
        for run, name in RUNNERS.values():
            torch.testing.assert_close(run(tmp_path / name)(x), model(x), rtol=0, atol=1e-4)


def test_a_file_that_predicts_other_classes_is_reported_with_a_warning(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, 8))
    _calibrated(model)
    batches = [((torch.randn(16, 1, 8, 8),), None) for _ in range(2)]
    onnx = backend("onnx")
    load = onnx.load

    def rolled(path):  # a runtime that shifts every logit to the next class: the file's classes are wrong
        run = load(path)
        return lambda *inputs: run(*inputs).roll(1, dims=1)

    monkeypatch.setattr(onnx, "load", rolled)
    with pytest.warns(UserWarning, match=r"the 'onnx' file predicts the fake-quant model's class on [0-9.]+% of 32"):
        result = convert_model(model, batches[0][0], tmp_path, formats=("onnx", "pt2"), check_batches=batches)

    assert result.fidelity["onnx"].agreement < 0.99 and result.fidelity["pt2"].agreement == 1.0
    with warnings.catch_warnings(record=True) as caught:  # a file that follows the model: no such warning
        warnings.simplefilter("always")
        convert_model(model, batches[0][0], tmp_path / "again", formats=("pt2",), check_batches=batches)
    assert not any("predicts the fake-quant model's class" in str(w.message) for w in caught)


def test_convert_model_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no fake-quantized layer"):
        convert_model(SmallCNN(), (torch.randn(2, 1, 8, 8),), tmp_path)
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, 8))
    with pytest.raises(ValueError, match="must be a tuple of tensors"):
        convert_model(_calibrated(model), torch.randn(2, 1, 8, 8), tmp_path)
    assert list(tmp_path.iterdir()) == []


class _DataDependentCNN(SmallCNN):
    """Python control flow on a tensor value: trains fine, but ``torch.export`` cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 1e6:
            x = torch.zeros_like(x)
        return super().forward(x)


class _Snapshot(L.Callback):
    """Records the checkpoint bytes and the weights at fit end, before the conversion that follows it."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ckpt = Path(trainer.checkpoint_callback.best_model_path)
        self.ckpt_bytes = self.ckpt.read_bytes()
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}


def test_a_failed_conversion_leaves_checkpoint_and_model_intact(tmp_path, caplog) -> None:
    L.seed_everything(0)
    model = ImageClassifier(_DataDependentCNN())
    snapshot = _Snapshot()
    trainer = _trainer(tmp_path, [snapshot, QuantizationCallback(bits=4, warmup_epochs=1)], max_epochs=2)

    with caplog.at_level(logging.ERROR, logger="qat_lightning"):
        trainer.fit(model, DigitsDataModule(batch_size=64))

    assert any("int8 conversion failed" in r.getMessage() for r in caplog.records)
    assert snapshot.ckpt.read_bytes() == snapshot.ckpt_bytes
    for key, value in snapshot.state.items():
        assert torch.equal(model.state_dict()[key], value), key
    quantized = Path(trainer.log_dir) / "quantized"
    assert not quantized.exists() or list(quantized.iterdir()) == []
    reloaded = ImageClassifier(_DataDependentCNN())
    QuantizationCallback(bits=4).setup(trainer, reloaded, "fit")  # rebuilds the QAT structure on load
    reloaded.load_state_dict(torch.load(snapshot.ckpt, weights_only=False)["state_dict"])


def test_fidelity_counts_agreement_accuracy_and_relative_error_over_batches() -> None:
    logits_a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    logits_b = torch.tensor([[2.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1, 1])
    batches = [((torch.arange(2),), labels[:2]), ((torch.arange(2, 4),), labels[2:])]

    (result,) = measure_fidelity(lambda i: logits_a[i], {"b": lambda i: logits_b[i]}, batches).values()

    assert (result.agreement, result.samples) == (0.75, 4)
    assert (result.reference_accuracy, result.accuracy) == (0.75, 0.5)
    expected = float(np.linalg.norm((logits_b - logits_a).double()) / np.linalg.norm(logits_a.double()))
    assert result.relative_error == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="No batch"):
        measure_fidelity(lambda i: logits_a[i], {"b": lambda i: logits_b[i]}, [])


class _DigitsResNet(nn.Module):
    """A stem and three torchvision BasicBlocks (each calls its ReLU module twice; one downsamples)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv1x1

        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        down = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2, down), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_residual_network_files_follow_the_fake_quant_model(tmp_path) -> None:
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = ImageClassifier(_DigitsResNet(), lr=3e-3)
    callback = QuantizationCallback(
        bits=4, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=3, convert_on_fit_end=False
    )
    _trainer(tmp_path, [callback], max_epochs=4).fit(model, datamodule)
    model.eval()

    x, _ = next(iter(datamodule.train_dataloader()))
    checks = [((x,), y) for x, y in datamodule.val_dataloader()]
    result = convert_model(model, (x,), tmp_path / "out", packed=False, check_batches=checks)

    assert result.float_layers == {} and len(result.int8_layers) == 9
    fake_quant_pred, labels = _val_predictions(model, datamodule)
    assert (fake_quant_pred == labels).mean() > 0.85
    for fmt, (run, name) in RUNNERS.items():
        # Residual adds stay float in the files, as in the fake-quant model: the same predictions.
        converted_pred, _ = _val_predictions(run(tmp_path / "out" / name), datamodule)
        assert (converted_pred == fake_quant_pred).mean() >= 0.99, fmt
        assert result.fidelity[fmt].agreement >= 0.99 and result.fidelity[fmt].relative_error <= 0.02, fmt


def test_conv1d_layers_convert_on_integer_weights_and_follow_the_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 16, 5, padding=2, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    apply_plan(model, plan_quantization(model, 8, first_last_bits=8))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 2, 64))
    model.eval()
    batches = [((torch.randn(8, 2, 64),), None) for _ in range(3)]
    formats = ("pt2", "onnx", "x86") if backend("x86").requirement() is None else ("pt2", "onnx")
    result = convert_model(model, batches[0][0], tmp_path, formats=formats, check_batches=batches, packed=False)

    assert result.failed == {} and result.float_layers == {}
    assert result.int8_layers == ["0", "3", "7"]
    for fmt, fidelity in result.fidelity.items():
        assert fidelity.agreement == 1.0 and fidelity.relative_error < 1e-3, (fmt, fidelity)
    import onnx

    proto = onnx.load(str(result.paths["onnx"]))
    int8_weights = [i.dims for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert sorted(map(list, int8_weights)) == [[4, 16], [16, 1, 3], [16, 2, 5]]


def test_per_tensor_weights_convert_and_the_packed_file_reloads_bit_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, 4, per_channel_weights=False))
    _calibrated(model)
    x = torch.randn(16, 1, 8, 8)

    result = convert_model(model, (x,), tmp_path, check_batches=[((x,), None)])

    assert result.failed == {} and result.float_layers == {}
    assert all(f.agreement == 1.0 and f.relative_error < 1e-4 for f in result.fidelity.values()), result.fidelity
    float_model = SmallCNN()
    float_model.load_state_dict(load_packed_weights(result.packed_path))
    for name, layer in fake_quantized_layers(model):
        assert layer.weight_quantizer.scale.dim() == 0  # one scale for the whole tensor
        assert torch.equal(float_model.get_submodule(name).weight, layer.quantized_weight()), name
