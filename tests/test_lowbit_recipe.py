"""The low-bit recipe: QAT starts from the PTQ calibration, LSQ starts from the error-minimising scale, and
progressive bit widths (float, then 4, 3, 2 bits) switch at the planned epochs and survive a resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import np_choose_qparams, np_fake_quantize
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.calibration import calibrate, calibrate_for_training
from qat_lightning.callbacks.quantization import late_freeze_epochs
from qat_lightning.nn import apply_plan, plan_quantization, quantizers
from qat_lightning.quant import MSEObserver


def _digit_loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    dm = DigitsDataModule()
    dm.setup()
    train, val = dm.splits["train"].tensors, dm.splits["val"].tensors
    return DataLoader(TensorDataset(*train), batch_size=batch_size), DataLoader(TensorDataset(*val), batch_size=64)


class FirstBatch(Callback):
    """Keeps a copy of the model as the first training batch starts (after the QuantizationCallback set it up)."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.model is None:
            self.model = copy.deepcopy(pl_module)


def test_qat_starts_from_the_ptq_calibration(trainer_kwargs):
    """With warmup 0, the quantizers the first training step sees are those our PTQ gives the same float model
    on the same batches: same scales and zero points, same outputs, bit for bit."""
    train, val = _digit_loaders()
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN(channels=(8, 16)))
    reference = copy.deepcopy(model)
    apply_plan(reference, plan_quantization(reference, 2, learned_scale=False, activation_observer="mse"))
    calibrate(reference, train, lambda batch, i: reference(batch[0]), num_batches=3)

    first = FirstBatch()
    callback = QuantizationCallback(
        bits=2, warmup_epochs=0, learned_scale=False, calibration_batches=3, convert_on_fit_end=False
    )
    pl.Trainer(max_epochs=1, callbacks=[callback, first], **trainer_kwargs).fit(model, train, val)
    started = first.model
    assert started is not None
    pairs = list(zip(quantizers(started), quantizers(reference), strict=True))
    assert len(pairs) == 6 and all(q.calibrated for q, _ in pairs)
    for q, r in pairs:
        torch.testing.assert_close(q.scale, r.scale, rtol=0, atol=0)
        torch.testing.assert_close(q.zero_point, r.zero_point, rtol=0, atol=0)
    x = val.dataset.tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(started.eval()(x), reference.eval()(x), rtol=0, atol=0)


def _np_best_scale(values: np.ndarray, low: float, high: float, bits: int, symmetric: bool, ratios) -> tuple:
    """Brute force over the candidate ranges ``r * [low, high]``: (smallest squared error, its scale, zero point)."""
    best = (np.inf, None, None)
    for r in ratios:
        scale, zp = np_choose_qparams(np.float32(low * r), np.float32(high * r), bits, symmetric)
        err = float(((np_fake_quantize(values, scale, zp, bits, symmetric) - values) ** 2).mean())
        best = min(best, (err, scale, zp), key=lambda t: t[0])
    return best


def test_lsq_starts_from_the_error_minimising_scale():
    """LSQ weights (per channel) and inputs (per tensor) start from the candidate range of smallest squared error,
    found independently by brute force in NumPy; not from min/max."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    model = nn.Sequential(layer)
    apply_plan(model, plan_quantization(model, 2, first_last_bits=None))  # LSQ at 2 bits
    batches = [(torch.randn(16, 12),), (torch.randn(16, 12) * 2,)]
    batches[1][0][0, 0] = 25.0  # an outlier the error-minimising range clips
    assert calibrate_for_training(model, batches, lambda batch, i: model(batch[0]), num_batches=5) == 2

    ratios = MSEObserver(layer.weight_quantizer.config).ratios
    w = layer.weight.detach().numpy()
    for c in range(5):
        row = w[c]
        err, scale, _ = _np_best_scale(row, row.min(), row.max(), 2, True, ratios)
        got = np_fake_quantize(row, layer.weight_quantizer.scale[c].detach().numpy(), np.int32(0), 2, True)
        assert float(((got - row) ** 2).mean()) == pytest.approx(err, rel=1e-5)
        assert layer.weight_quantizer.scale[c].item() == pytest.approx(float(scale), rel=1e-6)
    x = torch.cat([b[0] for b in batches]).numpy()
    err, scale, zp = _np_best_scale(x, x.min(), x.max(), 2, False, ratios)
    q = layer.input_quantizer
    assert q.scale.item() == pytest.approx(float(scale), rel=1e-6) and q.zero_point.item() == int(zp)
    minmax_scale, minmax_zp = np_choose_qparams(x.min(), x.max(), 2, False)
    assert err < 0.9 * float(((np_fake_quantize(x, minmax_scale, minmax_zp, 2, False) - x) ** 2).mean())

    # LSQ learns on from there: a training step's forward does not re-initialise it, and the quantizer reads as
    # calibrated, with its observer holding the range it covers (so a checkpoint restores it as calibrated)
    scale_before = q.scale.detach().clone()
    model.train()(torch.randn(16, 12) * 10)
    torch.testing.assert_close(q.scale.detach(), scale_before, rtol=0, atol=0)
    assert q.calibrated and bool(q.observer.initialized)
    low, high = q.clipping_range()
    torch.testing.assert_close(q.observer.min_val, low)
    torch.testing.assert_close(q.observer.max_val, high)


class Stages(Callback):
    """Records, at every training batch, the weight and input bit widths of each layer and the middle layer's
    weight scale."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.epoch_end_scales: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        quantizer = getattr(pl_module.backbone.features[4], "weight_quantizer", None)
        if quantizer is not None:
            self.epoch_end_scales[trainer.current_epoch] = quantizer.scale.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        layers = {"first": pl_module.backbone.features[0], "middle": pl_module.backbone.features[4]}
        layers["last"] = pl_module.backbone.classifier
        record = {"epoch": trainer.current_epoch}
        for name, layer in layers.items():
            quantizer = getattr(layer, "weight_quantizer", None)
            record[name] = None if quantizer is None else (quantizer.config.bits, layer.input_quantizer.config.bits)
        if record["middle"] is not None:
            record["scale"] = layers["middle"].weight_quantizer.scale.detach().clone()
        self.batches.append(record)


def _progressive_fit(trainer_kwargs, max_epochs: int, **fit_kwargs):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN(channels=(8, 16)))
    callback = QuantizationCallback(
        bits=2, progressive=(4, 3), warmup_epochs=1, calibration_batches=2, convert_on_fit_end=False
    )
    stages = Stages()
    directory = trainer_kwargs["default_root_dir"] / "ckpt"
    checkpoints = ModelCheckpoint(dirpath=directory, save_top_k=-1, filename="{epoch}")
    kwargs = {**trainer_kwargs, "enable_checkpointing": True}
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[callback, stages, checkpoints], **kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=32), **fit_kwargs)
    return callback, stages


def _range_kept(old_scale: torch.Tensor, old_bits: int, new_scale: torch.Tensor, new_bits: int) -> None:
    """A symmetric grid moved to fewer bits covers the same range: ``s * (2**b - 1) / 2`` is unchanged."""
    torch.testing.assert_close(new_scale * (2**new_bits - 1), old_scale * (2**old_bits - 1), rtol=1e-6, atol=0)


def test_progressive_stages_switch_at_their_epochs_and_resume(trainer_kwargs):
    callback, stages = _progressive_fit(trainer_kwargs, max_epochs=4)
    by_epoch = {b["epoch"]: b for b in reversed(stages.batches)}  # the first batch of each epoch
    assert by_epoch[0]["middle"] is None  # float warmup
    assert [by_epoch[e]["middle"] for e in (1, 2, 3)] == [(4, 4), (3, 3), (2, 2)]
    assert all(by_epoch[e][n] == (8, 8) for e in (1, 2, 3) for n in ("first", "last"))  # first/last keep 8 bits
    assert callback.state_dict()["stage"] == 2 and callback.stage_bits == 2
    # each stage starts from the scales the previous one learned, its clipping range on fewer levels
    for epoch, (old, new) in {2: (4, 3), 3: (3, 2)}.items():
        learned = stages.epoch_end_scales[epoch - 1]
        assert not torch.equal(learned, by_epoch[epoch - 1]["scale"])  # LSQ moved the scales during the stage
        _range_kept(learned, old, by_epoch[epoch]["scale"], new)

    # resume from the checkpoint saved after epoch 2 (the 3-bit stage): the stage is restored, and epoch 3 moves
    # the checkpoint's 3-bit scales to 2 bits
    checkpoint = trainer_kwargs["default_root_dir"] / "ckpt" / "epoch=2.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    saved_scale = saved["state_dict"]["backbone.features.4.weight_quantizer.scale"]
    assert saved["callbacks"]["QuantizationCallback"]["stage"] == 1
    resumed, resumed_stages = _progressive_fit(trainer_kwargs, max_epochs=4, ckpt_path=checkpoint)
    first = resumed_stages.batches[0]
    assert first["epoch"] == 3 and first["middle"] == (2, 2) and resumed.stage_bits == 2
    _range_kept(saved_scale, 3, first["scale"], 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(progressive=(3, 4)), r"`progressive` must be strictly decreasing bit widths in 3\.\.16, each above"),
        (dict(progressive=(4, 4)), r"`progressive` must be strictly decreasing .*got \(4, 4\)"),
        (dict(progressive=(4, 2)), r"`progressive` must be .* each above `bits`=2 \(the final stage\).*got \(4, 2\)"),
        (dict(progressive=(4, 3.5)), r"`progressive` must be strictly decreasing bit widths"),
        (dict(progressive=(32,)), r"`progressive` must be strictly decreasing bit widths in 3\.\.16"),
        (
            dict(progressive=(4, 3), progressive_epochs=(2,)),
            r"`progressive_epochs` must be a positive integer .* one positive integer per stage of `progressive`="
            r"\(4, 3\) \(2 values\), got \(2,\)",
        ),
        (dict(progressive=(4,), progressive_epochs=0), r"`progressive_epochs` must be a positive integer.*got 0"),
        (
            dict(progressive=(4, 3), warmup_epochs=1, freeze_bn_epoch=2),
            r"`freeze_bn_epoch`=2 overlaps the progressive stages \(4 bits in epochs 1\.\.1, 3 bits in epochs 2\.\.2\);"
            r" .*final 2-bit stage, which starts at epoch 3: use a value >= 3",
        ),
        (
            dict(progressive=(4, 3), progressive_epochs=(2, 3), freeze_observers_epoch=4),
            r"`freeze_observers_epoch`=4 overlaps .*starts at epoch 6: use a value >= 6",
        ),
        (dict(progressive=(4,), freeze_bn_step=10), r"give `freeze_bn_epoch`, not `freeze_bn_step`"),
        (dict(progressive=(4,), warmup_steps=10), r"give `warmup_epochs`, not `warmup_steps`=10"),
        (dict(progressive=(4,), mode="ptq"), r"`progressive` needs mode='qat'"),
    ],
)
def test_bad_progressive_schedule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationCallback(bits=2, **kwargs)


def test_progressive_defaults_freeze_in_the_final_stage():
    callback = QuantizationCallback(bits=2, progressive=(4, 3), progressive_epochs=(2, 1), warmup_epochs=1)
    assert (callback._freeze_bn.epoch, callback._freeze_observers.epoch) == (4 + 3, 4 + 4)


@pytest.mark.parametrize(
    ("max_epochs", "bn_epoch", "observer_epoch", "expected"),
    [(24, 3, 4, (18, 19)), (12, 3, 4, (9, 10)), (4, 3, 4, (3, 4)), (1, 3, 4, (3, 4)), (24, 20, 23, (20, 23))],
)
def test_late_freeze_epochs(max_epochs, bn_epoch, observer_epoch, expected):
    assert late_freeze_epochs(max_epochs, bn_epoch, observer_epoch) == expected


class Phases(Callback):
    """The callback's phase at the first batch of every epoch."""

    def __init__(self, callback: QuantizationCallback) -> None:
        self.callback, self.phases = callback, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.phases.append(self.callback.phase)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # 8 epochs: BatchNorm frozen at 3 * 8 // 4 = 6, observers at 7 (not 3 and 4), at every width.
        (dict(bits=2), ["qat"] * 6 + ["qat_bn_frozen", "qat_frozen"]),
        (dict(bits=4), ["qat"] * 6 + ["qat_bn_frozen", "qat_frozen"]),
        (dict(bits=8), ["qat"] * 6 + ["qat_bn_frozen", "qat_frozen"]),
        # Freezes given as arguments are kept.
        (
            dict(bits=4, freeze_bn_epoch=3, freeze_observers_epoch=4),
            ["qat"] * 3 + ["qat_bn_frozen"] + ["qat_frozen"] * 4,
        ),
        (
            dict(bits=2, freeze_bn_epoch=2, freeze_observers_epoch=5),
            ["qat"] * 2 + ["qat_bn_frozen"] * 3 + ["qat_frozen"] * 3,
        ),
    ],
)
def test_default_freezes_come_in_the_last_quarter(trainer_kwargs, kwargs, expected):
    pl.seed_everything(0)
    callback = QuantizationCallback(warmup_epochs=0, calibration_batches=1, convert_on_fit_end=False, **kwargs)
    phases = Phases(callback)
    trainer = pl.Trainer(max_epochs=8, callbacks=[callback, phases], **{**trainer_kwargs, "limit_train_batches": 1})
    trainer.fit(ImageClassifier(SmallCNN(channels=(4, 8))), DigitsDataModule(batch_size=32))
    assert phases.phases == expected


def test_late_freezes_follow_each_run_length_and_keep_given_step_freezes():
    callback = QuantizationCallback(bits=2, warmup_epochs=0)
    callback._schedule_late_freezes(24)
    assert (callback._freeze_bn.epoch, callback._freeze_observers.epoch) == (18, 19)
    callback._schedule_late_freezes(8)  # a second fit of another length: from the defaults again, not from 18
    assert (callback._freeze_bn.epoch, callback._freeze_observers.epoch) == (6, 7)
    callback = QuantizationCallback(bits=2, warmup_epochs=0, freeze_bn_step=10)
    callback._schedule_late_freezes(24)
    assert (callback._freeze_bn.step, callback._freeze_observers.epoch) == (10, 19)
