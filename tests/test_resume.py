"""Exact resume: N epochs straight equal k epochs + ``fit(ckpt_path=...)``, for a checkpoint of every phase.

The schedule crosses every phase: epoch 0 FP32 warmup, epoch 1 QAT with live observers, epoch 2 observers
frozen, epoch 3 BatchNorm frozen, epoch 4 trains on. The middle layer is 4-bit with an LSQ learned scale (its
own optimizer group), the first and last are 8-bit with observed ranges. The loaders do not shuffle: Lightning
does not checkpoint the global RNG that a shuffling sampler draws from, so only fixed-order data can resume
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import is_prepared, quantizers

EPOCHS = 5
SCHEDULE = dict(bits=4, warmup_epochs=1, freeze_observers_epoch=2, freeze_bn_epoch=3, convert_on_fit_end=False)
# checkpoint of epoch k-1 (the resumed run starts at epoch k) -> callback state saved in it
PHASE_OF_CHECKPOINT = {
    1: dict(quantized=False, observers_frozen=False, bn_frozen=False),  # FP32 warmup
    2: dict(quantized=True, observers_frozen=False, bn_frozen=False),  # QAT, live observers
    3: dict(quantized=True, observers_frozen=True, bn_frozen=False),  # observers frozen
    4: dict(quantized=True, observers_frozen=True, bn_frozen=True),  # BatchNorm frozen too
}


class Recorder(pl.Callback):
    """Training losses per step and validation metrics per epoch, as the trainer saw them."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.metrics: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.metrics[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _loaders() -> tuple[DataLoader, DataLoader]:
    data = DigitsDataModule()
    data.setup("fit")
    return DataLoader(data.splits["train"], batch_size=32), DataLoader(data.splits["val"], batch_size=64)


def _trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=root,
        **kwargs,
    )


def _model() -> ImageClassifier:
    return ImageClassifier(SmallCNN(channels=(8, 16)), lr=1e-2)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> SimpleNamespace:
    """One uninterrupted run that checkpoints every epoch (what a killed job leaves behind)."""
    root = tmp_path_factory.mktemp("straight")
    pl.seed_everything(0)
    model, recorder = _model(), Recorder()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer = _trainer(root, [QuantizationCallback(**SCHEDULE), recorder, checkpoints])
    trainer.fit(model, *_loaders())
    return SimpleNamespace(model=model, recorder=recorder, ckpt=root / "ckpt", state=_tensors(model))


@pytest.mark.parametrize(
    "resume_epoch", sorted(PHASE_OF_CHECKPOINT), ids=["warmup", "qat", "observers_frozen", "bn_frozen"]
)
def test_resume_from_each_phase_equals_the_straight_run(straight, resume_epoch, tmp_path):
    ckpt_path = straight.ckpt / f"epoch={resume_epoch - 1}.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)
    (callback_state,) = (v for k, v in saved["callbacks"].items() if k.startswith("QuantizationCallback"))
    assert {k: callback_state[k] for k in PHASE_OF_CHECKPOINT[resume_epoch]} == PHASE_OF_CHECKPOINT[resume_epoch]

    pl.seed_everything(1)  # a different seed: everything that matters must come from the checkpoint
    model, recorder = _model(), Recorder()
    callback = QuantizationCallback(**SCHEDULE)
    trainer = _trainer(tmp_path, [callback, recorder], enable_checkpointing=False)
    trainer.fit(model, *_loaders(), ckpt_path=ckpt_path)

    assert callback.quantized and callback.observers_frozen and callback.bn_frozen
    assert (
        min(recorder.losses) == 3 * resume_epoch + 1
    )  # global step after the first resumed step; only the remaining epochs were trained
    assert sorted(recorder.metrics) == list(range(resume_epoch, EPOCHS))
    state = _tensors(model)
    assert state.keys() == straight.state.keys()
    assert any(k.endswith("features.4.weight_quantizer.scale") for k in state)  # LSQ scale, learned
    assert any(k.endswith("input_quantizer.observer.max_val") for k in state)  # observed range
    for key, value in straight.state.items():
        torch.testing.assert_close(state[key], value, msg=lambda m, key=key: f"{key}: {m}")
    for q in quantizers(model):
        assert not q.observer_enabled
    for step, loss in recorder.losses.items():
        assert loss == pytest.approx(straight.recorder.losses[step], rel=1e-5), step
    for epoch, metrics in recorder.metrics.items():
        assert metrics == pytest.approx(straight.recorder.metrics[epoch], rel=1e-5), epoch


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_test_and_predict_with_a_qat_checkpoint(straight, stage, tmp_path):
    """A fresh model and callback run ``test``/``predict`` from the last QAT checkpoint like the trained model."""
    _, val = _loaders()
    reference_trainer = _trainer(tmp_path, [], enable_checkpointing=False)
    model, callback = _model(), QuantizationCallback(**SCHEDULE)
    trainer = _trainer(tmp_path, [callback], enable_checkpointing=False)
    ckpt_path = straight.ckpt / f"epoch={EPOCHS - 1}.ckpt"
    if stage == "test":
        expected = reference_trainer.test(straight.model, val, verbose=False)
        got = trainer.test(model, val, ckpt_path=ckpt_path, verbose=False)
        assert got == expected and 0.0 < got[0]["test/acc"] <= 1.0
    else:
        expected = torch.cat(reference_trainer.predict(straight.model, val))
        got = torch.cat(trainer.predict(model, val, ckpt_path=ckpt_path))
        assert torch.equal(got, expected)
    assert is_prepared(model)
    for key, value in straight.state.items():
        assert torch.equal(model.state_dict()[key], value), key
