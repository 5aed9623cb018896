"""Conversion to int8: at fit end, standalone and from the CLI; checked against the fake-quant model it came from."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN, convert_model
from qat_lightning.convert import compare_predictions, load_packed_weights
from qat_lightning.convert.cli import default_output_dir
from qat_lightning.convert.cli import main as cli_main
from qat_lightning.convert.int8 import cpu_has_int8_dot_product
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


# 8-bit inputs x 8-bit weights: exact only where the CPU adds int8 products in 32 bits (VNNI/AMX); on AVX2 alone
# oneDNN adds pairs of them in 16 bits and can saturate (see docs/int8_backend.md). 7-bit inputs never do.
_SATURATES_HERE = pytest.mark.xfail(
    not cpu_has_int8_dot_product(), reason="oneDNN's AVX2 int8 kernels (no VNNI) may saturate 8x8-bit products"
)


@pytest.fixture(
    scope="module",
    params=[pytest.param((8, 8), marks=_SATURATES_HERE), (8, 7), (4, 4)],
    ids=["w8a8", "w8a7", "w4a4"],
)
def trained(request, tmp_path_factory) -> SimpleNamespace:
    return _train(*request.param, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def trained4(tmp_path_factory) -> SimpleNamespace:
    return _train(4, 4, tmp_path_factory.getbasetemp())


def _val_predictions(fn, datamodule: DigitsDataModule) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            preds.append(fn(x).argmax(dim=1).numpy())
            labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def test_fit_end_writes_int8_and_packed_files_in_the_log_dir(trained4) -> None:
    assert sorted(p.name for p in trained4.dir.iterdir()) == ["model_int8.pt", "model_w4.packed.pt"]


def test_int8_agrees_with_the_fake_quant_model_on_digits_validation(trained) -> None:
    int8 = torch.jit.load(str(trained.dir / "model_int8.pt"))
    fake_quant_pred, labels = _val_predictions(trained.model, trained.datamodule)
    int8_pred, _ = _val_predictions(int8, trained.datamodule)

    fake_quant_acc, int8_acc = (fake_quant_pred == labels).mean(), (int8_pred == labels).mean()
    assert fake_quant_acc > 0.85  # the model learned something, so agreement is not trivial
    assert (int8_pred == fake_quant_pred).mean() >= 0.99
    assert abs(int8_acc - fake_quant_acc) <= 0.003


def test_int8_file_is_small_and_runs_on_any_batch_size(trained4) -> None:
    int8 = torch.jit.load(str(trained4.dir / "model_int8.pt"))
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        for batch in (1, 3, 64):
            torch.testing.assert_close(int8(x[:batch]), trained4.model(x[:batch]), rtol=0, atol=1e-4)
    float_bytes = sum(t.numel() * 4 for t in SmallCNN().state_dict().values())
    assert (trained4.dir / "model_int8.pt").stat().st_size < float_bytes


def test_int8_file_loads_with_torch_alone(trained4, tmp_path) -> None:
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        torch.save({"x": x, "expected": trained4.model(x)}, tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['qat_lightning'] = None\n"  # any import of the training code would fail
        "import torch\n"
        f"model = torch.jit.load({str(trained4.dir / 'model_int8.pt')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "print(float((model(io['x']) - io['expected']).abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-4


def test_packed_file_reloads_the_trained_weights(trained4) -> None:
    state = load_packed_weights(trained4.dir / "model_w4.packed.pt")
    float_model = ImageClassifier(SmallCNN())
    float_model.load_state_dict(state)
    for name, layer in fake_quantized_layers(trained4.model):
        assert torch.equal(float_model.get_submodule(name).weight, layer.quantized_weight())


def test_onnx_qdq_file_runs_in_onnxruntime(trained4, tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x, _ = next(iter(trained4.datamodule.train_dataloader()))
    result = convert_model(trained4.model, (x,), tmp_path, onnx=True, packed=False)

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])

    def run_onnx(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input0": x.numpy()})[0])

    onnx_pred, _ = _val_predictions(run_onnx, trained4.datamodule)
    fake_quant_pred, _ = _val_predictions(trained4.model, trained4.datamodule)
    assert (onnx_pred == fake_quant_pred).mean() >= 0.99


def test_cli_converts_a_checkpoint(trained4, tmp_path) -> None:
    (ckpt,) = Path(trained4.trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    result = cli_main(["--config", str(CONFIG), "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path)])

    assert result.int8_path == tmp_path / "model_int8.pt" and result.int8_path.is_file()
    assert result.agreement.agreement >= 0.99 and result.agreement.samples == 270
    int8 = torch.jit.load(str(result.int8_path))
    x, _ = next(iter(trained4.datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(int8(x), trained4.model(x), rtol=0, atol=1e-4)


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

    with pytest.warns(UserWarning, match=r"layer `classifier` stays float \(16-bit weights\)"):
        result = convert_model(model, (x,), tmp_path)

    assert result.float_layers == {"classifier": "16-bit weights"}
    assert result.int8_layers == ["features.0", "features.4"]
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(result.int8_path))(x), model(x), rtol=0, atol=1e-4)


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


def test_compare_predictions_counts_agreement_and_accuracy() -> None:
    logits_a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    logits_b = torch.tensor([[2.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1, 1])
    batches = [((torch.arange(2),), labels[:2]), ((torch.arange(2, 4),), labels[2:])]

    result = compare_predictions(lambda i: logits_a[i], lambda i: logits_b[i], batches)

    assert (result.agreement, result.samples) == (0.75, 4)
    assert (result.reference_accuracy, result.candidate_accuracy) == (0.75, 0.5)
    with pytest.raises(ValueError, match="empty"):
        compare_predictions(lambda i: logits_a[i], lambda i: logits_b[i], [])


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


def test_residual_network_runs_on_int8_kernels_and_agrees(tmp_path) -> None:
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    model = ImageClassifier(_DigitsResNet(), lr=3e-3)
    callback = QuantizationCallback(
        bits=4, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=3, convert_on_fit_end=False
    )
    _trainer(tmp_path, [callback], max_epochs=4).fit(model, datamodule)
    model.eval()

    x, _ = next(iter(datamodule.train_dataloader()))
    result = convert_model(model, (x,), tmp_path / "out", packed=False)

    assert result.float_layers == {} and len(result.int8_layers) == 9
    int8 = torch.jit.load(str(result.int8_path))
    kernels = [n.kind() for m in int8.modules() for n in m.graph.nodes() if n.kind().startswith("onednn::")]
    assert kernels.count("onednn::qconv2d_pointwise") == 3  # conv + residual add + ReLU fused, once per block
    int8_pred, labels = _val_predictions(int8, datamodule)
    fake_quant_pred, _ = _val_predictions(model, datamodule)
    # Residual adds run on 8-bit grids here but in float in the fake-quant model: agreement, not identity.
    assert (fake_quant_pred == labels).mean() > 0.85
    assert (int8_pred == fake_quant_pred).mean() >= 0.98
