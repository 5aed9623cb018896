"""After the fit-end int8 conversion nothing breaks: the trained module, its checkpoints, testing, fitting again,
loading, and Lightning's ``ModelPruning`` (Lightning 1.x's QAT callback failed each of these)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from torch import nn

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.convert import load_packed_weights
from qat_lightning.nn import FakeQuantizedLayer, fake_quantized_layers, is_prepared, quantizers

FILES = ["conversion_report.json", "model_int8.onnx", "model_int8.pt2", "model_w4.packed.pt"]


def _backbone() -> SmallCNN:
    return SmallCNN(channels=(8, 16))


def _trainer(trainer_kwargs: dict, callbacks: list, max_epochs: int = 3, **overrides) -> pl.Trainer:
    """The suite's quiet Trainer (``trainer_kwargs``), with checkpointing and a short test loop."""
    options = {**trainer_kwargs, "enable_checkpointing": True, "limit_test_batches": 2, **overrides}
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **options)


def _best_checkpoint(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "ckpt", monitor="val/acc", mode="max", save_last=True)


class BeforeConversion(pl.Callback):
    """Put before the ``QuantizationCallback``: records the module and the checkpoints at fit end, before the
    conversion that follows in the callback's ``on_fit_end``."""

    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}
        self.classes = {name: type(m) for name, m in pl_module.named_modules()}
        self.training = {name: m.training for name, m in pl_module.named_modules()}
        self.observers = [q.observer_enabled for q in quantizers(pl_module)]
        self.parameters = [id(p) for p in pl_module.parameters()]
        self.checkpoints = {p: p.read_bytes() for p in Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")}
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(self.batch)
        pl_module.train(was_training)
        self.converted_before = (Path(trainer.default_root_dir) / "int8").exists()


def _first_val_batch(data: DigitsDataModule) -> torch.Tensor:
    data.setup("fit")
    return next(iter(data.val_dataloader()))[0]


def test_conversion_leaves_the_module_and_checkpoints_as_trained_and_test_best_works(tmp_path, trainer_kwargs):
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model, before = ImageClassifier(_backbone()), BeforeConversion(_first_val_batch(data))
    callback = QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "int8")
    trainer = _trainer(trainer_kwargs, [before, callback, _best_checkpoint(tmp_path)])
    trainer.fit(model, data)

    assert not before.converted_before and sorted(p.name for p in (tmp_path / "int8").iterdir()) == FILES
    # The LightningModule is still the trained fake-quant model: same classes, tensors, modes, Parameters.
    assert {name: type(m) for name, m in model.named_modules()} == before.classes
    assert isinstance(model.backbone.features[0], FakeQuantizedLayer)
    assert {name: m.training for name, m in model.named_modules()} == before.training
    assert [q.observer_enabled for q in quantizers(model)] == before.observers
    assert [id(p) for p in model.parameters()] == before.parameters
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
    for key, value in before.state.items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(before.batch), before.logits)
    assert before.checkpoints and {p: p.read_bytes() for p in before.checkpoints} == before.checkpoints

    best = trainer.checkpoint_callback.best_model_path
    assert Path(best).name != "last.ckpt"
    tested = trainer.test(model, data, ckpt_path="best", verbose=False)[0]
    assert trainer.ckpt_path == best and 0.0 < tested["test/acc"] <= 1.0
    loaded = ImageClassifier.load_from_checkpoint(best, backbone=_backbone())
    assert is_prepared(loaded)
    assert _trainer(trainer_kwargs, []).test(loaded, data, verbose=False)[0] == tested


def test_fit_again_after_conversion_with_a_new_trainer_and_callback(tmp_path, trainer_kwargs, lightning_caplog):
    """The same (already fake-quantized, already converted) module trains on in QAT under a new trainer."""
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(_backbone())
    first = _trainer(trainer_kwargs, [QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "int8")])
    first.fit(model, data)
    scales = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".scale")}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    layers = dict(fake_quantized_layers(model))

    lightning_caplog.clear()
    again = QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "again")
    trainer = _trainer(trainer_kwargs, [again], max_epochs=2)
    trainer.fit(model, data)

    assert dict(fake_quantized_layers(model)) == layers  # the same layers, not quantized a second time
    assert again.quantized and again.phase == "qat" and again.fp32_score is None
    assert again.quantized_score is not None
    messages = [r.getMessage() for r in lightning_caplog.records]
    assert not any("inserted fake quantization" in m for m in messages)
    state = model.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in weights.items())  # it trained
    assert any(not torch.equal(state[k], v) for k, v in scales.items())  # in QAT: the scales moved too
    # the learned (LSQ) scales are optimised, in their own group without weight decay
    optimizer = trainer.optimizers[0]
    lsq = [p for q in quantizers(model) for p in q.parameters(recurse=False)]
    assert lsq and [id(p) for p in optimizer.param_groups[-1]["params"]] == [id(p) for p in lsq]
    assert optimizer.param_groups[-1]["weight_decay"] == 0.0
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == FILES


def test_fit_again_with_ckpt_path_after_conversion(tmp_path, trainer_kwargs):
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(_backbone())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    first = _trainer(trainer_kwargs, [QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "int8")])
    first.callbacks.append(checkpoint)
    first.fit(model, data)

    callback = QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "again")
    trainer = _trainer(trainer_kwargs, [callback], max_epochs=4)
    trainer.fit(model, data, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert trainer.current_epoch == 4 and callback.quantized and callback.fp32_score is not None
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == FILES


class PruningMasks(pl.Callback):
    """Put after ``ModelPruning``: the weight masks of the conv and linear layers after each epoch's pruning."""

    def __init__(self) -> None:
        self.masks: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        layers = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.masks.append({n: m.weight_mask.clone() for n, m in layers})


@pytest.mark.parametrize("permanent", [True, False], ids=["permanent", "masks_kept"])
def test_model_pruning_with_qat(tmp_path, trainer_kwargs, permanent, caplog):
    """Lightning's ``ModelPruning`` (global L1, 20% more of the weights after every epoch) across the FP32 and the
    QAT phase: the fit ends, the conversion succeeds, and pruned weights stay exactly zero in the fake-quant
    model, its checkpoint, the reloaded model and the converted files."""
    pl.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(_backbone())
    pruning = ModelPruning("l1_unstructured", amount=0.2, make_pruning_permanent=permanent)
    masks = PruningMasks()
    callback = QuantizationCallback(bits=4, warmup_epochs=1, convert_dir=tmp_path / "int8")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(trainer_kwargs, [pruning, masks, callback, checkpoint])
    with caplog.at_level(logging.ERROR, logger="qat_lightning"):
        trainer.fit(model, data)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == FILES
    layers = dict(fake_quantized_layers(model))
    final = {name.removeprefix("backbone."): mask for name, mask in masks.masks[-1].items()}
    assert (
        set(layers)
        == {f"backbone.{n}" for n in final}
        == {f"backbone.{n}" for n in ("features.0", "features.4", "classifier")}
    )
    # pruning went on during QAT (epochs 1 and 2): more zeros than after the FP32 epoch
    assert sum(int((m == 0).sum()) for m in masks.masks[-1].values()) > sum(
        int((m == 0).sum()) for m in masks.masks[0].values()
    )
    packed = load_packed_weights(tmp_path / "int8" / "model_w4.packed.pt")
    int8 = torch.export.load(tmp_path / "int8" / "model_int8.pt2").module()
    x = _first_val_batch(data)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), rtol=0, atol=1e-3)
        for name, layer in layers.items():
            pruned = final[name.removeprefix("backbone.")] == 0
            assert pruned.any() and not pruned.all(), name
            assert hasattr(layer, "weight_orig") != permanent, name
            assert torch.all(layer.weight[pruned] == 0), name
            assert torch.all(layer.quantized_weight()[pruned] == 0), name
            assert torch.all(packed[f"{name}.weight"][pruned] == 0), name

    state = torch.load(checkpoint.last_model_path, weights_only=False)["state_dict"]
    if permanent:  # a plain QAT checkpoint: loads into an unpruned model
        loaded = ImageClassifier.load_from_checkpoint(checkpoint.last_model_path, backbone=_backbone())
        for name, layer in fake_quantized_layers(loaded):
            assert torch.equal(layer.weight, layers[name].weight), name
            assert torch.all(layer.weight[final[name.removeprefix("backbone.")] == 0] == 0), name
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
    else:  # torch's pruning reparametrization is saved as is (load it into a model pruned the same way)
        for name in final:
            assert torch.equal(state[f"backbone.{name}.weight_mask"], final[name]), name
