"""CUDA: fit, resume, per-bit-width metrics and fit-end conversion on a GPU, under 32-true and 16-mixed.

Marked ``cuda``: skipped where ``torch.cuda.is_available()`` is False (see ``conftest.py``); ``benchmarks/gpu_check.py``
runs them. The job is the digits QAT job of ``configs/digits_qat4.yaml`` (SmallCNN, 4 bits, 8-bit first/last layer,
LSQ at 4 bits) on a 6-epoch schedule: fake quantization at epoch 1, BatchNorm frozen at 2, observers frozen at 3.
Every epoch is checkpointed; the resume starts from the end of epoch 3 (all phase changes behind it).

TF32 is switched off for these tests so that the CUDA float32 numbers can be compared with a CPU recomputation.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from qat_lightning import BitWidthMetrics, DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import quantizers
from qat_lightning.nn.snapshot import float_snapshot, quantized_snapshot

pytestmark = pytest.mark.cuda

ACCELERATOR = "cuda"
PRECISIONS = ("32-true", "16-mixed")
EPOCHS = 6
RESUME_EPOCH = 3  # the checkpoint written at the end of this epoch (0-based) is resumed
EVAL_BITS = (2, 4, 8)
STEPS_PER_EPOCH = 20  # 1,257 training images in batches of 64


class StateAtTrainStart(Callback):
    """The model state, the grad scaler's scale and the optimizer state as training (re)starts."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self.loss_scale: float | None = None
        self.optimizer_state_devices: set[str] = set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = cpu_state(pl_module)
        self.loss_scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
        self.optimizer_state_devices = {
            v.device.type
            for state in trainer.optimizers[0].state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        }


def cpu_state(module: nn.Module) -> dict[str, Any]:
    """A CPU copy of ``module.state_dict()`` (tensors and the quantizers' extra state)."""
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in
            module.state_dict().items()}  # fmt: skip


def same(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@dataclass
class Run:
    trainer: pl.Trainer
    model: ImageClassifier
    callback: QuantizationCallback
    metrics: BitWidthMetrics
    start: StateAtTrainStart
    root: Path

    @property
    def log_dir(self) -> Path:
        return Path(self.trainer.log_dir)


def fit(root: Path, precision: str | None, ckpt_path: str | Path | None = None, **kwargs: Any) -> Run:
    """Fit the digits QAT job (the shipped config's model, data and schedule, shortened) on ``ACCELERATOR``."""
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN(in_channels=1, num_classes=10, input_size=8), num_classes=10, lr=0.003)
    callback = QuantizationCallback(bits=4, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=3)
    metrics = BitWidthMetrics(eval_bits=EVAL_BITS)
    start = StateAtTrainStart()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        precision=precision,
        max_epochs=EPOCHS,
        callbacks=[callback, metrics, start, checkpoints],
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(model, DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
    return Run(trainer, model, callback, metrics, start, root)


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    """IEEE float32 matmuls and convolutions on the GPU, so that the CPU can recompute the GPU's float32 numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module", params=PRECISIONS)
def cuda_run(request, tmp_path_factory) -> Run:
    return fit(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def resumed_run(cuda_run, tmp_path_factory) -> Run:
    checkpoint = cuda_run.root / "checkpoints" / f"epoch={RESUME_EPOCH}.ckpt"
    return fit(tmp_path_factory.mktemp("resumed"), cuda_run.trainer.precision, ckpt_path=checkpoint)


@pytest.fixture(scope="module")
def val_split() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule()
    data.setup("fit")
    return data.splits["val"].tensors


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` in eval mode, float32, on the device of its parameters (returned on the CPU)."""
    was_training = model.training
    model.eval()
    try:
        return model(x.to(next(model.parameters()).device)).float().cpu()
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == y).double().mean().item()


def cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu()


# ---------------------------------------------------------------------------------------------- fit


def test_fit_trains_on_the_device_with_float32_quantizers(cuda_run, val_split):
    run = cuda_run
    assert run.trainer.current_epoch == EPOCHS and run.callback.phase == "qat_frozen"
    assert run.trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    device = run.trainer.strategy.root_device
    assert device.type == ACCELERATOR
    for quantizer in quantizers(run.model):
        assert quantizer.scale.device == device and quantizer.scale.dtype == torch.float32
        assert quantizer.zero_point.dtype == torch.int32 and quantizer.observer.min_val.dtype == torch.float32
    assert all(p.device == device and p.dtype == torch.float32 for p in run.model.parameters())
    if run.trainer.precision == "16-mixed":
        assert run.trainer.scaler is not None and run.trainer.scaler.get_scale() > 1.0
    x, y = val_split
    assert accuracy(evaluate(run.model, x), y) > 0.9
    # The device computes what the CPU computes: the same trained model on the CPU, in float32.
    on_device, on_cpu = evaluate(run.model, x), evaluate(cpu_copy(run.model), x)
    assert (on_device.argmax(1) == on_cpu.argmax(1)).double().mean().item() >= 1 - 2 / len(y)


def test_bit_width_metrics_on_the_device_match_a_cpu_recomputation(cuda_run, val_split):
    run = cuda_run
    assert set(run.metrics.results) == {*EVAL_BITS, None}
    x, y = val_split
    model = cpu_copy(run.model)
    for bits, values in run.metrics.results.items():
        snapshot = float_snapshot(model) if bits is None else quantized_snapshot(model, bits)
        expected = accuracy(evaluate(snapshot, x), y)
        assert abs(values["acc"] - expected) <= 2 / len(y), bits
    assert run.metrics.results[8]["acc"] > 0.9
    # ... and the fit-end table holds the same numbers.
    with open(run.log_dir / "bit_width_metrics.csv") as table:
        rows = {row["metric"]: row for row in csv.DictReader(table)}
    for bits, values in run.metrics.results.items():
        label = "fp32" if bits is None else f"{bits}-bit"
        assert float(rows["acc"][label]) == pytest.approx(values["acc"], abs=1e-12)


def test_fit_end_conversion_of_a_device_model(cuda_run, val_split):
    out = cuda_run.log_dir / "quantized"
    assert (out / "model_int8.pt2").is_file() and (out / "model_int8.onnx").is_file()
    assert (out / "conversion_report.json").is_file()
    x, y = val_split
    program = torch.export.load(out / "model_int8.pt2").module()
    with torch.no_grad():
        converted = program(x)
    expected = evaluate(cpu_copy(cuda_run.model), x)
    assert torch.equal(converted.argmax(1), expected.argmax(1))
    torch.testing.assert_close(converted, expected, rtol=1e-4, atol=1e-4)
    on_device = evaluate(cuda_run.model, x)
    assert (converted.argmax(1) == on_device.argmax(1)).double().mean().item() >= 1 - 2 / len(y)


# ---------------------------------------------------------------------------------------------- resume


def test_resume_restores_the_quantized_model_and_keeps_its_frozen_state(cuda_run, resumed_run, val_split):
    checkpoint = torch.load(
        cuda_run.root / "checkpoints" / f"epoch={RESUME_EPOCH}.ckpt", map_location="cpu", weights_only=False
    )
    saved = checkpoint["state_dict"]
    restored = resumed_run.start.state
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        assert same(restored[key], value), key
    assert resumed_run.start.optimizer_state_devices == {ACCELERATOR}
    if cuda_run.trainer.precision == "16-mixed":
        assert resumed_run.start.loss_scale == checkpoint["MixedPrecision"]["scale"]

    run = resumed_run
    assert run.trainer.current_epoch == EPOCHS and run.trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    assert run.callback.phase == "qat_frozen"
    final = cpu_state(run.model)
    frozen = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    learned = [k for k, _ in run.model.named_parameters() if k.endswith("_quantizer.scale")]
    observed = [k for k in saved if k.endswith("_quantizer.scale") and k not in learned]
    assert frozen and observed and learned
    for key in frozen + observed:  # BatchNorm statistics and observers were frozen before the checkpoint
        assert torch.equal(final[key], saved[key]), key
    assert any(not torch.equal(final[key], saved[key]) for key in learned)  # LSQ scales kept learning
    x, y = val_split
    uninterrupted, resumed = accuracy(evaluate(cuda_run.model, x), y), accuracy(evaluate(run.model, x), y)
    assert abs(resumed - uninterrupted) <= 0.02
    assert (run.log_dir / "quantized" / "model_int8.pt2").is_file()
