"""Lightning precisions with fake quantization: bf16/fp16 autocast, the 16-bit grad scaler, refused precisions (CPU).

The fits run the default digits job (``configs/digits_qat4.yaml``, through LightningCLI as the command line does),
shortened to 6 epochs so that every phase change happens: fake quantization at epoch 1, BatchNorm frozen at 2,
observers frozen at 3. ``16-mixed`` runs on the CPU through Lightning's ``MixedPrecision`` plugin with a CPU grad
scaler (Lightning maps ``precision="16-mixed"`` on CPU to bf16).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.callbacks.quantization import SUPPORTED_PRECISIONS, check_precision
from qat_lightning.nn import is_prepared, quantizers
from qat_lightning.quant import FakeQuantizer, QuantizerConfig, quant_range
from qat_lightning.quant.config import activation_config, weight_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_qat4.yaml"
EPOCHS = 6
SHORT = [
    f"--trainer.max_epochs={EPOCHS}",
    "--trainer.callbacks.init_args.warmup_epochs=1",
    "--trainer.callbacks.init_args.freeze_bn_epoch=2",
    "--trainer.callbacks.init_args.freeze_observers_epoch=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
FP16_ON_CPU = [
    "--trainer.plugins=lightning.pytorch.plugins.MixedPrecision",
    "--trainer.plugins.precision=16-mixed",
    "--trainer.plugins.device=cpu",
]


class QuantizerProbe(Callback):
    """Records what the quantizers see in QAT training steps and what the optimizer gets for the learned scales.

    ``seen``: ``(input dtype, output dtype, scale dtype, zero point dtype, observer state dtype, autocast on)`` of
    every quantizer call in a training batch. ``scale_grads``: per optimizer step, the learned scales' gradients
    as the optimizer receives them (after the precision plugin unscaled them). ``loss_scales``: the grad scaler's
    scale at each of those steps. ``first_scales``/``last_scales``: the learned scales after the first and the
    last QAT step.
    """

    def __init__(self) -> None:
        self.seen: set[tuple[Any, ...]] = set()
        self.scale_grads: list[list[torch.Tensor]] = []
        self.loss_scales: list[float] = []
        self.first_scales: list[torch.Tensor] | None = None
        self.last_scales: list[torch.Tensor] = []
        self._hooks: list[Any] = []
        self._in_train_batch = False

    def _record(self, quantizer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if self._in_train_batch:
            state = (quantizer.scale.dtype, quantizer.zero_point.dtype, quantizer.observer.min_val.dtype)
            self.seen.add((args[0].dtype, out.dtype, *state, torch.is_autocast_enabled("cpu")))

    @staticmethod
    def _learned(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [q.scale for q in quantizers(pl_module) if isinstance(q.scale, nn.Parameter)]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._hooks and is_prepared(pl_module):
            self._hooks = [q.register_forward_hook(self._record) for q in quantizers(pl_module)]
        self._in_train_batch = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        learned = self._learned(pl_module)
        if learned:
            self.scale_grads.append([p.grad.detach().clone() for p in learned])
            self.loss_scales.append(trainer.scaler.get_scale() if trainer.scaler is not None else 1.0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._in_train_batch = False
        learned = [p.detach().clone() for p in self._learned(pl_module)]
        if learned and self.first_scales is None:
            self.first_scales = learned
        self.last_scales = learned

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:  # before the fit-end conversion copies the model
            hook.remove()


@dataclass
class Run:
    trainer: pl.Trainer
    model: ImageClassifier
    callback: QuantizationCallback
    probe: QuantizerProbe
    seconds: float

    @property
    def quantized_dir(self) -> Path:
        return Path(self.trainer.log_dir) / "quantized"


def fit_digits_job(root: Path, *overrides: str) -> Run:
    """The digits QAT job of the shipped config, built by LightningCLI, shortened, fitted with a probe."""
    args = ["--config", str(CONFIG), *SHORT, f"--trainer.default_root_dir={root}", *overrides]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["qat-lightning"])  # LightningCLI also reads sys.argv
        cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=args)
    probe = QuantizerProbe()
    cli.trainer.callbacks.append(probe)
    (callback,) = (cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationCallback))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return Run(cli.trainer, cli.model, callback, probe, time.perf_counter() - start)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Run:
    return fit_digits_job(tmp_path_factory.mktemp("fp32"), "--trainer.precision=32-true")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Run:
    return fit_digits_job(tmp_path_factory.mktemp("bf16"), "--trainer.precision=bf16-mixed")


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> Run:
    return fit_digits_job(tmp_path_factory.mktemp("fp16"), *FP16_ON_CPU)


@pytest.fixture(scope="module")
def val_split() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule()  # the config's data: default split seed, 270 validation images
    data.setup("fit")
    return data.splits["val"].tensors


@torch.no_grad()
def float32_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trained fake-quant model in eval mode, in float32 (no autocast)."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == y).double().mean().item()


# ---------------------------------------------------------------------------------------------- fits


def test_bf16_mixed_fit_passes_every_phase_in_bf16_with_float32_quantizers(bf16_run):
    run = bf16_run
    assert run.trainer.precision == "bf16-mixed" and run.trainer.current_epoch == EPOCHS
    assert run.callback.phase == "qat_frozen" and run.callback.bn_frozen
    assert all(not q.observer_enabled for q in quantizers(run.model))
    # Under autocast the layers hand bf16 activations to the input quantizers, which return bf16; the weights
    # (float32 Parameters) come back float32. Scales and observer state are float32 in every call.
    bf16, f32 = torch.bfloat16, torch.float32
    assert (bf16, bf16, f32, torch.int32, f32, True) in run.probe.seen
    assert (f32, f32, f32, torch.int32, f32, True) in run.probe.seen
    assert {(s, z, m) for _, _, s, z, m, _ in run.probe.seen} == {(f32, torch.int32, f32)}
    assert {dtype for _, dtype, *_ in run.probe.seen} <= {bf16, f32}
    assert all(p.dtype == f32 for p in run.model.parameters())


def test_bf16_mixed_accuracy_within_one_point_of_32_true(fp32_run, bf16_run, val_split):
    x, y = val_split
    acc32 = accuracy(float32_logits(fp32_run.model, x), y)
    acc16 = accuracy(float32_logits(bf16_run.model, x), y)
    assert acc32 > 0.9, "the 32-true QAT run did not learn: the comparison would mean nothing"
    assert abs(acc16 - acc32) <= 0.01
    # The last QAT validation of each run, as logged (bf16 under autocast), agrees the same way.
    assert abs(bf16_run.callback.quantized_score - fp32_run.callback.quantized_score) <= 0.01


def test_bf16_mixed_fit_end_conversion_is_written_and_matches_the_model(bf16_run, val_split):
    x, y = val_split
    out = bf16_run.quantized_dir
    assert {p.name for p in out.iterdir()} >= {
        "model_int8.pt2",
        "model_int8.onnx",
        "model_w4.packed.pt",
        "conversion_report.json",
    }
    program = torch.export.load(out / "model_int8.pt2").module()
    with torch.no_grad():
        converted = program(x)
    expected = float32_logits(bf16_run.model, x)
    assert torch.equal(converted.argmax(dim=1), expected.argmax(dim=1))
    torch.testing.assert_close(converted, expected, rtol=1e-4, atol=1e-4)
    assert accuracy(converted, y) > 0.9


def test_16_mixed_grad_scaler_trains_learned_scales_in_float32(fp32_run, fp16_run, val_split):
    run = fp16_run
    assert run.trainer.precision == "16-mixed" and run.trainer.scaler is not None
    assert run.callback.phase == "qat_frozen"
    half, f32 = torch.float16, torch.float32
    assert (half, half, f32, torch.int32, f32, True) in run.probe.seen
    assert {(s, z, m) for _, _, s, z, m, _ in run.probe.seen} == {(f32, torch.int32, f32)}
    # The optimizer gets the learned scales' gradients unscaled, in float32, from a loss scaled up by the scaler.
    assert len(run.probe.scale_grads) >= 5 * 20  # every QAT step (20 batches per epoch)
    assert min(run.probe.loss_scales) > 1.0
    grads = [g for step in run.probe.scale_grads for g in step]
    assert all(g.dtype == f32 for g in grads)
    finite = [all(bool(torch.isfinite(g).all()) for g in step) for step in run.probe.scale_grads]
    assert sum(finite) >= 0.95 * len(finite)  # an overflowing step is skipped by the scaler, as it should be
    steps = [
        torch.cat([g.reshape(-1) for g in step]) for step, ok in zip(run.probe.scale_grads, finite, strict=True) if ok
    ]
    magnitudes = torch.stack(steps).abs()
    assert (magnitudes > 0).float().mean() > 0.5
    assert magnitudes.max() < 1.0  # unscaled: a gradient still multiplied by the loss scale would be >= 1e3
    # ... and the scales learn (they move after their first step).
    assert any(not torch.equal(a, b) for a, b in zip(run.probe.first_scales, run.probe.last_scales, strict=True))
    x, y = val_split
    acc32 = accuracy(float32_logits(fp32_run.model, x), y)
    assert abs(accuracy(float32_logits(run.model, x), y) - acc32) <= 0.01
    assert (run.quantized_dir / "model_int8.pt2").is_file()


# ---------------------------------------------------------------------------------------------- units


QUANTIZERS = {
    "activation_8bit": (activation_config(8), 1),
    "activation_4bit_lsq": (activation_config(4, learned_scale=True), 1),
    "weight_4bit_per_channel": (weight_config(4), 6),
    "weight_8bit_per_channel_lsq": (weight_config(8, learned_scale=True), 6),
}


def _np_range(x: np.ndarray, config: QuantizerConfig) -> tuple[np.ndarray, np.ndarray]:
    if not config.per_channel:
        return np.float32(x.min()), np.float32(x.max())
    rows = x.reshape(x.shape[0], -1)
    return rows.min(axis=1), rows.max(axis=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizer_under_autocast_computes_in_float32(name, dtype, np_ref):
    config, channels = QUANTIZERS[name]
    x = (torch.randn(6, 5, 7) * 3 + 0.5).to(dtype)  # a 16-bit activation, as a layer under autocast returns it
    q = FakeQuantizer(config, channels).train()
    with torch.autocast("cpu", dtype=dtype):
        out = q(x)
    assert out.dtype == dtype and q.scale.dtype == torch.float32 and q.zero_point.dtype == torch.int32
    assert q.observer.min_val.dtype == torch.float32
    # Independent computation: the range, scale and zero point of the float32 values the 16-bit input holds.
    x32 = x.float().numpy()
    scale, zero_point = np_ref.choose_qparams(*_np_range(x32, config), config.bits, config.symmetric)
    np.testing.assert_array_equal(q.scale.detach().numpy(), scale)
    np.testing.assert_array_equal(q.zero_point.numpy(), zero_point)
    axis = 0 if config.per_channel else None
    codes = np_ref.quantize(x32, scale, zero_point, config.bits, config.symmetric, axis)
    expected = np_ref.dequantize(codes, scale, zero_point, axis)  # float32 grid values
    assert torch.equal(out, torch.from_numpy(expected).to(dtype))  # ... rounded once to the input's dtype
    along = (-1, 1, 1) if config.per_channel else ()
    s, z = torch.as_tensor(np.asarray(scale)).reshape(along), torch.as_tensor(np.asarray(zero_point)).reshape(along)
    np.testing.assert_array_equal(torch.round(out.float() / s).to(torch.int64) + z, codes)  # codes survive
    # Same as a float32 quantizer fed the same values without autocast.
    reference = FakeQuantizer(config, channels).train()
    assert torch.equal(reference(x.float()).to(dtype), out)
    assert torch.equal(reference.scale, q.scale) and torch.equal(reference.zero_point, q.zero_point)


def test_weight_quantizer_under_autocast_returns_float32_for_a_float32_weight(np_ref):
    weight = torch.randn(8, 3, 3, 3)
    q = FakeQuantizer(weight_config(4), 8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(weight)
    assert out.dtype == torch.float32
    scale, zero_point = np_ref.choose_qparams(*np_ref.min_max(weight.numpy(), 0), 4, True)
    np_ref.assert_fake_quant_equal(out.numpy(), weight.numpy(), scale, zero_point, 4, True, axis=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lsq_scale_gradient_under_autocast_equals_float32(dtype):
    config = activation_config(4, learned_scale=True)
    x = (torch.randn(64, 16) * 2).to(dtype)
    grad_out = torch.randn(64, 16).to(dtype)
    grads = {}
    for mode in ("autocast", "float32"):
        q = FakeQuantizer(config).train()
        inp = x.clone().requires_grad_(True) if mode == "autocast" else x.float().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=mode == "autocast"):
            q(inp.detach())  # first call: the scale is set from the observer
            out = q(inp)
        (out.float() * grad_out.float()).sum().backward()
        grads[mode] = (q.scale.grad, inp.grad)
    (scale_grad, x_grad), (scale_grad32, x_grad32) = grads["autocast"], grads["float32"]
    assert scale_grad.dtype == torch.float32 and x_grad.dtype == dtype
    assert torch.equal(scale_grad, scale_grad32)
    assert torch.equal(x_grad, x_grad32.to(dtype))


def _np_lsq_scale_grad(h: np.ndarray, scale: float, zero_point: int, bits: int, grad_out: np.ndarray) -> float:
    """LSQ step-size gradient (Esser et al. 2020) of ``sum(grad_out * fake_quant(h))``, asymmetric grid, float64."""
    qmin, qmax = quant_range(bits, symmetric=False)
    v = (h.astype(np.float32) * (np.float32(1.0) / np.float32(scale))).astype(np.float64)
    code = np.round(v) + zero_point
    inside = (code >= qmin) & (code <= qmax)
    d = np.where(inside, np.round(v) - v, np.where(code < qmin, qmin - zero_point, qmax - zero_point))
    return float((d * grad_out.astype(np.float64)).sum()) / math.sqrt(h.size * qmax)


def test_lsq_scale_gradient_survives_the_float16_grad_scaler():
    """A loss so small that its float16 gradients underflow: with the grad scaler the learned scale (a float32
    Parameter) still gets its exact LSQ gradient, unscaled; without it, nothing."""
    torch.manual_seed(0)
    first, second = nn.Linear(16, 32), nn.Linear(32, 4)
    q = FakeQuantizer(activation_config(4, learned_scale=True)).train()
    x = torch.randn(64, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        q(first(x))  # initialises the scale
    tiny = 2.0**-30  # float16's smallest subnormal is 2**-24
    seen: dict[str, torch.Tensor] = {}

    def run(scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        q.scale.grad = None
        with torch.autocast("cpu", dtype=torch.float16):
            hidden = first(x)
            out = q(hidden)
            out.register_hook(lambda g: seen.__setitem__("grad_out", g))
            loss = second(out).float().sum() * tiny
        seen["hidden"] = hidden.detach()
        if scaler is None:
            loss.backward()
            return q.scale.grad.clone()
        optimizer = torch.optim.SGD([q.scale, *first.parameters(), *second.parameters()], lr=0.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # raises for float16 parameters ("Attempting to unscale FP16 gradients")
        return q.scale.grad.clone()

    assert run(None).item() == 0.0  # float16 gradients underflow: the scale would never learn
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    grad = run(scaler)
    assert q.scale.dtype == torch.float32 and grad.dtype == torch.float32
    assert seen["grad_out"].dtype == torch.float16 and seen["hidden"].dtype == torch.float16
    expected = _np_lsq_scale_grad(
        seen["hidden"].float().numpy(),
        q.scale.item(),
        int(q.zero_point),
        4,
        seen["grad_out"].float().numpy() / scaler.get_scale(),
    )
    assert expected != 0.0 and abs(expected) < 1e-6  # far below float16's range, yet resolved
    assert grad.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("precision", "fix"), [("bf16-true", "bf16-mixed"), ("16-true", "16-mixed"), ("64-true", "32-true")]
)
def test_unsupported_precision_is_refused_at_setup_naming_the_fix(precision, fix, trainer_kwargs):
    model = ImageClassifier(SmallCNN())
    callback = QuantizationCallback(bits=4, warmup_epochs=0)  # would insert fake quantization at the first batch
    trainer = pl.Trainer(max_epochs=1, precision=precision, callbacks=[callback], **trainer_kwargs)
    with pytest.raises(ValueError, match=rf"precision='{precision}'\).*Use `precision='{fix}'`") as error:
        trainer.fit(model, DigitsDataModule())
    assert ", ".join(SUPPORTED_PRECISIONS) in str(error.value)
    # Refused before anything ran: no training step, no fake quantization, parameters as built (float32).
    assert trainer.global_step == 0 and not is_prepared(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_check_precision_accepts_the_supported_and_names_a_fix_for_others():
    for precision in ("32-true", "bf16-mixed", "16-mixed"):
        check_precision(precision)
    with pytest.raises(ValueError, match=r"precision='transformer-engine'\).*Use `precision='bf16-mixed'`"):
        check_precision("transformer-engine")
