"""``QuantizationCallback`` on real (short) Lightning runs: schedule, logging, checkpoints, bad input."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import FakeQuantizedLayer, fake_quantized_layers, is_prepared, quantizers


def _digits(batch_size: int = 32) -> tuple[ImageClassifier, DigitsDataModule]:
    return ImageClassifier(SmallCNN(channels=(8, 16))), DigitsDataModule(batch_size=batch_size)


class Probe(Callback):
    """Records the model's quantization state at every training batch and at every epoch end.

    Put it after the ``QuantizationCallback`` so it sees the state the callback set up for the batch.
    """

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.epoch_ends: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bns = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "prepared": is_prepared(pl_module),
                "bn_training": {bn.training for bn in bns},
                "observers": {q.observer_enabled for q in quantizers(pl_module)},
            }
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = pl_module.state_dict()
        self.epoch_ends.append(
            {
                "bn": {k: v.clone() for k, v in state.items() if ".running_" in k},
                "scales": {k: v.clone() for k, v in state.items() if k.endswith((".scale", ".zero_point"))},
                "weights": {k: v.clone() for k, v in state.items() if k.endswith(".weight")},
            }
        )


def _same(a: dict, b: dict) -> bool:
    def equal(x, y):
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weights_read_back_are_on_the_bits_grid(bits, trainer_kwargs, np_ref):
    """After insertion the digits CNN's weights take at most 2**bits values per output channel, and they are
    the NumPy quantize-dequantize of the float weights with the stored scales (observed, or learned by LSQ,
    the default at <= 4 bits). Every layer at ``bits``: the 8-bit first/last default is switched off."""
    model, data = _digits()
    callback = QuantizationCallback(bits=bits, warmup_epochs=1, first_last_bits=None)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs)
    trainer.fit(model, data)

    layers = dict(fake_quantized_layers(model))
    assert list(layers) == ["backbone.features.0", "backbone.features.4", "backbone.classifier"]
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        assert wq.config.bits == bits and wq.config.symmetric and wq.config.per_channel
        w = layer.weight.detach().numpy()
        assert wq.config.learned_scale == (bits <= 4)
        if wq.config.learned_scale:
            ref_scale, ref_zero_point = wq.scale.detach().numpy(), wq.zero_point.numpy()
            assert (ref_scale > 0).all() and (ref_zero_point == 0).all()
        else:
            # The stored scales are those of the observed range (the weights before the last optimizer step).
            ref_scale, ref_zero_point = np_ref.choose_qparams(
                wq.observer.min_val.numpy(), wq.observer.max_val.numpy(), bits, True
            )
            np.testing.assert_array_equal(wq.scale.numpy(), ref_scale, err_msg=name)
            np.testing.assert_array_equal(wq.zero_point.numpy(), ref_zero_point, err_msg=name)
        read_back = layer.quantized_weight().detach().numpy()
        np_ref.assert_fake_quant_equal(read_back, w, ref_scale, ref_zero_point, bits, True, axis=0)
        for channel, values in enumerate(read_back.reshape(read_back.shape[0], -1)):
            distinct = np.unique(values)
            assert distinct.size <= 2**bits, (name, channel, distinct.size)
            codes = distinct / ref_scale[channel]
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # integer multiples of the scale
            qmin, qmax = np_ref.quant_range(bits, True)
            assert qmin - 1e-3 <= codes.min() and codes.max() <= qmax + 1e-3
        if bits <= 4:  # the grid is coarse enough that rounding visibly changed the weights
            assert not np.allclose(read_back, w)


@pytest.mark.parametrize("bits", [2, 4])
def test_model_outputs_come_from_the_grids(bits, trainer_kwargs, np_ref):
    """Each layer of the QAT model computes its float op on the fake-quantized input and weight."""
    model, data = _digits()
    trainer = pl.Trainer(max_epochs=1, callbacks=[QuantizationCallback(bits=bits, warmup_epochs=0)], **trainer_kwargs)
    trainer.fit(model, data)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = dict(fake_quantized_layers(model))
    hooks = [
        layer.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, layer in layers.items()
    ]
    model.eval()
    x = next(iter(data.val_dataloader()))[0]
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    assert torch.equal(logits, seen["backbone.classifier"][1])
    for name, layer in layers.items():
        inp, out = seen[name]
        iq = layer.input_quantizer
        with torch.no_grad():
            x_fq = iq(inp)
        np_ref.assert_fake_quant_equal(
            x_fq.numpy(), inp.numpy(), iq.scale.detach().numpy(), iq.zero_point.numpy(), iq.config.bits, symmetric=False
        )
        w_fq = layer.quantized_weight().detach()
        if isinstance(layer, nn.Linear):
            expected = F.linear(x_fq.double(), w_fq.double(), layer.bias.double())
        else:
            expected = F.conv2d(x_fq.double(), w_fq.double(), None, padding=1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- schedule


def test_epoch_schedule(trainer_kwargs, lightning_caplog):
    model, data = _digits()
    # observed scales (LSQ scales keep learning after the observers freeze)
    callback = QuantizationCallback(
        bits=4, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=3, learned_scale=False
    )
    probe = Probe()
    # Validation also runs in the middle of each epoch, so training resumes after Lightning's model.train().
    trainer_kwargs.update(limit_train_batches=4, val_check_interval=2)
    trainer = pl.Trainer(max_epochs=5, callbacks=[callback, probe], **trainer_kwargs)
    trainer.fit(model, data)

    for b in probe.batches:
        assert b["prepared"] == (b["epoch"] >= 1), b
        assert b["bn_training"] == {b["epoch"] < 2}, b
        if b["prepared"]:
            assert b["observers"] == {b["epoch"] < 3}, b
    ends = probe.epoch_ends
    assert len(ends) == 5
    # BatchNorm statistics move until epoch 2 starts, then never again.
    assert not _same(ends[0]["bn"], ends[1]["bn"])
    assert _same(ends[1]["bn"], ends[2]["bn"]) and _same(ends[1]["bn"], ends[4]["bn"])
    # Scales move during QAT until epoch 3 starts, then never again, while the weights keep training.
    assert ends[0]["scales"] == {} and len(ends[1]["scales"]) == 12
    assert not _same(ends[1]["scales"], ends[2]["scales"])
    assert _same(ends[2]["scales"], ends[3]["scales"]) and _same(ends[2]["scales"], ends[4]["scales"])
    assert not _same(ends[3]["weights"], ends[4]["weights"])
    assert callback.phase == "qat_frozen"

    messages = [r.getMessage() for r in lightning_caplog.records if "QuantizationCallback" in r.getMessage()]
    inserted = [m for m in messages if "inserted fake quantization at epoch 1" in m]
    assert len(inserted) == 1 and "3 layers" in inserted[0] and "4-bit" in inserted[0]
    assert sum("froze the running statistics of 2 BatchNorm layers at epoch 2" in m for m in messages) == 1
    assert sum("froze observers (scales fixed) at epoch 3" in m for m in messages) == 1
    summary = [m for m in messages if "summary" in m]
    assert len(summary) == 1
    assert f"FP32 phase {callback.fp32_score:.4f}" in summary[0]
    assert f"4-bit QAT phase {callback.quantized_score:.4f}" in summary[0]
    assert 0.0 <= callback.fp32_score <= 1.0 and 0.0 <= callback.quantized_score <= 1.0


class ResetsTrainMode(ImageClassifier):
    """A module that puts itself back in train mode at every epoch start (a common user pattern)."""

    def on_train_epoch_start(self) -> None:
        self.train()


def test_bn_stays_frozen_when_the_module_resets_train_mode(trainer_kwargs):
    model, data = ResetsTrainMode(SmallCNN(channels=(8, 16))), DigitsDataModule(batch_size=32)
    probe = Probe()
    callback = QuantizationCallback(bits=4, warmup_epochs=0, freeze_bn_epoch=1, freeze_observers_epoch=2)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback, probe], **trainer_kwargs)
    trainer.fit(model, data)
    assert [b["bn_training"] for b in probe.batches] == [{True}] * 3 + [{False}] * 6
    assert _same(probe.epoch_ends[0]["bn"], probe.epoch_ends[2]["bn"])


def test_default_freeze_epochs_follow_torchvision(trainer_kwargs):
    """Defaults: BatchNorm frozen 3 epochs and observers 4 epochs after fake quantization starts."""
    model, data = _digits()
    probe = Probe()
    trainer_kwargs.update(limit_train_batches=1, limit_val_batches=1)
    trainer = pl.Trainer(
        max_epochs=6, callbacks=[QuantizationCallback(bits=4, warmup_epochs=1), probe], **trainer_kwargs
    )
    trainer.fit(model, data)
    bn_frozen = [not any(b["bn_training"]) for b in probe.batches]
    observers_frozen = [b["prepared"] and not any(b["observers"]) for b in probe.batches]
    assert bn_frozen == [False] * 4 + [True] * 2
    assert observers_frozen == [False] * 5 + [True]


def test_step_schedule(trainer_kwargs, lightning_caplog):
    model, data = _digits()
    callback = QuantizationCallback(bits=4, warmup_steps=2, freeze_bn_step=4, freeze_observers_step=6)
    probe = Probe()
    trainer_kwargs.update(limit_train_batches=5)  # the schedule crosses an epoch boundary
    trainer = pl.Trainer(max_steps=8, callbacks=[callback, probe], **trainer_kwargs)
    trainer.fit(model, data)

    assert [b["step"] for b in probe.batches] == list(range(8))
    for b in probe.batches:
        assert b["prepared"] == (b["step"] >= 2), b
        assert b["bn_training"] == {b["step"] < 4}, b
        if b["prepared"]:
            assert b["observers"] == {b["step"] < 6}, b
    messages = [r.getMessage() for r in lightning_caplog.records]
    assert any("inserted fake quantization at step 2" in m for m in messages)
    assert any("BatchNorm layers at step 4" in m for m in messages)
    assert any("froze observers (scales fixed) at step 6" in m for m in messages)


def test_step_schedule_without_freezes_never_freezes(trainer_kwargs):
    model, data = _digits()
    probe = Probe()
    trainer = pl.Trainer(max_steps=5, callbacks=[QuantizationCallback(bits=4, warmup_steps=1), probe], **trainer_kwargs)
    trainer.fit(model, data)
    assert [b["prepared"] for b in probe.batches] == [False] + [True] * 4
    assert all(b["bn_training"] == {True} and b["observers"] <= {True} for b in probe.batches)


def test_warmup_zero_quantizes_from_the_first_batch(trainer_kwargs):
    model, data = _digits()
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[QuantizationCallback(bits=8, warmup_epochs=0), probe], **trainer_kwargs
    )
    trainer.fit(model, data)
    assert all(b["prepared"] for b in probe.batches)


def test_a_model_that_arrives_in_eval_mode_is_warned_about(trainer_kwargs):
    """Lightning keeps the mode a module arrives with: an evaluated model would train with idle observers."""
    model, data = _digits()
    model.eval()
    trainer = pl.Trainer(max_epochs=1, callbacks=[QuantizationCallback(bits=8, warmup_epochs=0)], **trainer_kwargs)
    with pytest.warns(
        UserWarning,
        match=r"3 fake-quantized layers \(`backbone\.[^`]+`.*are in eval mode during "
        r"training.*Call `model\.train\(\)` before `trainer\.fit\(model\)`",
    ):
        trainer.fit(model, data)


# ---------------------------------------------------------------------------- state and checkpoints


def test_state_dict_round_trip(trainer_kwargs):
    model, data = _digits()
    callback = QuantizationCallback(bits=4, warmup_epochs=1, freeze_bn_epoch=1, freeze_observers_epoch=2)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], **trainer_kwargs)
    trainer.fit(model, data)
    assert all(q.calibrated for q in quantizers(model))  # observers ran for one epoch before freezing
    state = callback.state_dict()
    assert state["quantized"] and state["bn_frozen"] and state["observers_frozen"] and state["bits"] == 4
    assert state["fp32_score"] == callback.fp32_score and state["quantized_score"] == callback.quantized_score

    fresh = QuantizationCallback(bits=4, warmup_epochs=1, freeze_bn_epoch=1, freeze_observers_epoch=2)
    assert fresh.phase == "fp32"
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.phase == callback.phase == "qat_frozen"

    other_bits = QuantizationCallback(bits=8)
    with pytest.warns(UserWarning, match="trained at bits=4 but the callback has bits=8"):
        other_bits.load_state_dict(state)
    assert other_bits.quantized


def _checkpointed_run(tmp_path, trainer_kwargs):
    """Two epochs (FP32, then 4-bit QAT) saving a checkpoint after each; returns the trained objects."""
    model, data = _digits()
    callback = QuantizationCallback(bits=4, warmup_epochs=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[callback, checkpoints], **{**trainer_kwargs, "enable_checkpointing": True}
    )
    trainer.fit(model, data)
    return model, data, trainer, callback


def test_validate_after_fit_on_the_same_trainer(trainer_kwargs):
    """``fit`` then ``validate``/``test`` with the same trainer and the already quantized model."""
    model, data = _digits()
    callbacks = [QuantizationCallback(bits=4, warmup_epochs=0)]
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, **{**trainer_kwargs, "limit_train_batches": 1.0})
    trainer.fit(model, data)
    scales = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".scale")}
    first = trainer.validate(model, data, verbose=False)[0]
    tested = trainer.test(model, data, verbose=False)[0]["test/acc"]
    model.eval()
    x, y = data.splits["test"].tensors
    with torch.no_grad():  # an independent evaluation of the fake-quantized model on the whole test split
        expected = (model(x).argmax(dim=1) == y).double().mean().item()
    assert tested == pytest.approx(expected, abs=1e-6)
    assert expected > 0.5  # one epoch of 4-bit QAT learned the digits: chance is 0.1
    assert trainer.validate(model, data, verbose=False)[0] == first
    assert is_prepared(model)
    assert _same(scales, {k: v for k, v in model.state_dict().items() if k.endswith(".scale")})


def test_qat_checkpoint_validates_identically_in_a_fresh_model(tmp_path, trainer_kwargs):
    model, data, trainer, _ = _checkpointed_run(tmp_path, trainer_kwargs)
    expected = trainer.validate(model, data, verbose=False)[0]
    qat_ckpt = tmp_path / "ckpt" / "epoch=1.ckpt"
    assert any(k.endswith(".weight_quantizer.scale") for k in torch.load(qat_ckpt, weights_only=False)["state_dict"])

    fresh_model, fresh_data = _digits()
    fresh_trainer = pl.Trainer(callbacks=[QuantizationCallback(bits=4, warmup_epochs=1)], **trainer_kwargs)
    got = fresh_trainer.validate(fresh_model, fresh_data, ckpt_path=qat_ckpt, verbose=False)[0]
    assert got == expected
    assert is_prepared(fresh_model)
    assert all(q.calibrated for q in quantizers(fresh_model))
    for key, value in model.state_dict().items():
        assert _same({key: fresh_model.state_dict()[key]}, {key: value}), key

    # A checkpoint of the FP32 warmup loads as a float model.
    float_model, _ = _digits()
    float_trainer = pl.Trainer(callbacks=[QuantizationCallback(bits=4, warmup_epochs=1)], **trainer_kwargs)
    float_trainer.validate(float_model, fresh_data, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", verbose=False)
    assert not is_prepared(float_model)


def test_qat_checkpoint_resumes_fit(tmp_path, trainer_kwargs, lightning_caplog):
    model, data, trainer, callback = _checkpointed_run(tmp_path, trainer_kwargs)
    expected = trainer.validate(model, data, verbose=False)[0]
    qat_ckpt = tmp_path / "ckpt" / "epoch=1.ckpt"

    # Resuming a finished run restores everything and trains no further: same metrics.
    resumed_model, resumed_data = _digits()
    resumed_callback = QuantizationCallback(bits=4, warmup_epochs=1)
    resumed = pl.Trainer(max_epochs=2, callbacks=[resumed_callback], **trainer_kwargs)
    resumed.fit(resumed_model, resumed_data, ckpt_path=qat_ckpt)
    assert resumed_callback.quantized and resumed_callback.fp32_score == callback.fp32_score
    assert resumed.validate(resumed_model, resumed_data, verbose=False)[0] == expected

    # Resuming into one more epoch continues QAT on the restored quantizers (no second insertion).
    lightning_caplog.clear()
    more_model, more_data = _digits()
    probe = Probe()
    more = pl.Trainer(max_epochs=3, callbacks=[QuantizationCallback(bits=4, warmup_epochs=1), probe], **trainer_kwargs)
    more.fit(more_model, more_data, ckpt_path=qat_ckpt)
    assert probe.batches and all(b["epoch"] == 2 and b["prepared"] for b in probe.batches)
    assert len(dict(fake_quantized_layers(more_model))) == 3
    # the structure is rebuilt from the checkpoint (ImageClassifier's prepare_on_load hook) and never inserted again
    assert not any("inserted fake quantization" in r.getMessage() for r in lightning_caplog.records)


def test_resume_after_the_freezes_keeps_them(tmp_path, trainer_kwargs):
    """A checkpoint saved with BatchNorm and observers frozen resumes frozen: scales stay the saved ones."""
    model, data = _digits()
    schedule = dict(bits=4, warmup_epochs=0, freeze_bn_epoch=1, freeze_observers_epoch=1, learned_scale=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[QuantizationCallback(**schedule), checkpoints],
        **{**trainer_kwargs, "enable_checkpointing": True},
    )
    trainer.fit(model, data)
    saved = {k: v for k, v in model.state_dict().items() if ".running_" in k or k.endswith(".scale")}

    resumed_model, resumed_data = _digits()
    callback, probe = QuantizationCallback(**schedule), Probe()
    resumed = pl.Trainer(max_epochs=3, callbacks=[callback, probe], **trainer_kwargs)
    resumed.fit(resumed_model, resumed_data, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert callback.phase == "qat_frozen"
    assert probe.batches and all(b["epoch"] == 2 for b in probe.batches)
    assert all(b["bn_training"] == {False} and b["observers"] == {False} for b in probe.batches)
    state = resumed_model.state_dict()
    assert _same(saved, {k: state[k] for k in saved})
    assert not _same(
        probe.epoch_ends[0]["weights"], {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
    )


# ---------------------------------------------------------------------------- models with unusual forwards


class MaskedRegressor(pl.LightningModule):
    """A model whose forward takes several inputs and keyword-only arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 16)
        self.gate = nn.Linear(6, 16)
        self.head = nn.Linear(16, 1)
        self.calls: list[tuple[bool, float]] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
        self.calls.append((mask is not None, scale))
        h = torch.relu(self.encoder(x)) * torch.sigmoid(self.gate(x))
        if mask is not None:
            h = h * mask
        return self.head(h).squeeze(1) * scale

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        loss = F.mse_loss(self(x, mask, scale=0.5), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, mask, y = batch
        self.log("val/acc", -F.mse_loss(self(x, mask=mask, scale=0.5), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def _loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 6, generator=g)
        mask = (torch.rand(64, 16, generator=g) > 0.2).float()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, mask, x.sum(1)), batch_size=8)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def test_forward_with_several_inputs_and_keywords(trainer_kwargs):
    module = MaskedRegressor()
    # its default predict_step cannot run its batches, so no calibration (see the test after this one)
    callback = QuantizationCallback(bits=8, warmup_epochs=1, convert_on_fit_end=False, calibration_batches=0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], **trainer_kwargs)
    trainer.fit(module)
    assert is_prepared(module) and callback.quantized
    assert "forward" not in vars(module) and type(module).forward is MaskedRegressor.forward
    assert set(module.calls) == {(True, 0.5)}
    assert isinstance(module.encoder, FakeQuantizedLayer) and isinstance(module.head, FakeQuantizedLayer)
    assert callback.quantized_score is not None and np.isfinite(callback.quantized_score)
    module.eval()
    x = torch.randn(3, 6)
    assert torch.allclose(module(x, None, scale=2.0), 2 * module(x))


def test_calibration_falls_back_to_the_first_batch_when_predict_step_fails(trainer_kwargs):
    module = MaskedRegressor()
    callback = QuantizationCallback(bits=8, warmup_epochs=1, convert_on_fit_end=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs)
    with pytest.warns(UserWarning, match=r"could not calibrate the quantizers .*`predict_step`.*first training"):
        trainer.fit(module)
    assert all(q.calibrated for q in quantizers(module))  # observed from the first QAT batch on, as without it


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True, "4", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 2\.\.16"):
        QuantizationCallback(bits=bits)


@pytest.mark.parametrize("activation_bits", [1, 17, 4.5])
def test_bad_activation_bits(activation_bits):
    with pytest.raises(ValueError, match=r"`activation_bits` must be an integer in 2\.\.16"):
        QuantizationCallback(bits=4, activation_bits=activation_bits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(warmup_epochs=2, freeze_bn_epoch=1), r"`freeze_bn_epoch`=1 is earlier than `warmup_epochs`=2.*>= 2"),
        (
            dict(warmup_epochs=3, freeze_observers_epoch=0),
            r"`freeze_observers_epoch`=0 is earlier than `warmup_epochs`=3.*>= 3",
        ),
        (dict(warmup_steps=10, freeze_bn_step=5), r"`freeze_bn_step`=5 is earlier than `warmup_steps`=10.*>= 10"),
        (
            dict(warmup_steps=10, freeze_observers_step=9),
            r"`freeze_observers_step`=9 is earlier than `warmup_steps`=10",
        ),
        (
            dict(warmup_epochs=2, freeze_observers_epoch=2, calibration_batches=0),
            r"`freeze_observers_epoch`=2 equals `warmup_epochs`=2: .*never set the scales without calibration.*use a "
            r"value >= 3",
        ),
        (
            dict(warmup_steps=7, freeze_observers_step=7, calibration_batches=0),
            r"`freeze_observers_step`=7 equals `warmup_steps`=7: .*use a value >= 8",
        ),
        (dict(freeze_bn_epoch=3, freeze_bn_step=100), r"Give `freeze_bn_epoch` or `freeze_bn_step`, not both"),
        (
            dict(freeze_observers_epoch=5, freeze_observers_step=100),
            r"Give `freeze_observers_epoch` or `freeze_observers_step`, not both",
        ),
        (dict(warmup_epochs=-1), r"`warmup_epochs` must be a non-negative integer, got -1"),
        (dict(warmup_epochs=None), r"`warmup_epochs` must be a non-negative integer, got None"),
        (dict(warmup_steps=-5), r"`warmup_steps` must be a non-negative integer or None, got -5"),
        (dict(freeze_bn_epoch=2.5), r"`freeze_bn_epoch` must be a non-negative integer or None, got 2\.5"),
    ],
)
def test_bad_schedule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationCallback(bits=4, **kwargs)


class NoQuantizableLayers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.norm = nn.LayerNorm(4)

    def training_step(self, batch, batch_idx):
        return self.norm(batch[0] * self.scale).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)


def test_model_without_conv_or_linear(trainer_kwargs):
    trainer = pl.Trainer(max_epochs=1, callbacks=[QuantizationCallback(bits=4)], **trainer_kwargs)
    with pytest.raises(
        ValueError,
        match=r"no layer to quantize in NoQuantizableLayers: .*nn\.Conv1d, nn\.Conv2d, nn\.Conv3d or nn\.Linear",
    ):
        trainer.fit(NoQuantizableLayers())


def test_exclude_matching_everything(trainer_kwargs):
    model, data = _digits()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[QuantizationCallback(bits=4, exclude=["backbone.*"])], **trainer_kwargs
    )
    with pytest.raises(ValueError, match=r"not matched by `exclude`=\['backbone\.\*'\]"):
        trainer.fit(model, data)
    assert not is_prepared(model)
