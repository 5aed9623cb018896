"""Weight normalization: applying, folding, checkpoints, and its interplay with in-place fake quantization."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from qat_lightning import (
    DigitsDataModule,
    FakeQuantizedLayer,
    ImageClassifier,
    QuantizationCallback,
    SmallCNN,
    WeightNormalization,
    apply_plan,
    apply_weight_norm,
    fake_quantized_layers,
    fold_weight_norm_state_dict,
    plan_quantization,
    remove_weight_norm,
    restore_float,
)
from qat_lightning.nn import FakeQuantizedConv2d, FakeQuantizedLinear, is_weight_normalized

CNN_LAYERS = ["features.0", "features.4", "classifier"]


def _normalized(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_weight_normalized(m)]


def _no_parametrizations(model: nn.Module) -> bool:
    return not any(parametrize.is_parametrized(m) for m in model.modules())


def test_apply_selects_layers_by_name_and_type_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(8, 1, 8, 8)
    expected = model(x)
    assert apply_weight_norm(model, exclude=["classifier"]) == ["features.0", "features.4"]
    assert apply_weight_norm(model, layer_types=[nn.Linear]) == ["classifier"]
    assert apply_weight_norm(model) == []  # already normalized
    assert _normalized(model) == CNN_LAYERS
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    conv = model.features[0]
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (16, 1, 1, 1) and v.shape == conv.weight.shape
    torch.testing.assert_close(conv.weight, g * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1))

    assert apply_weight_norm(SmallCNN(), include=["features.*"]) == ["features.0", "features.4"]


def test_remove_folds_into_plain_weights_with_the_same_values() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    apply_weight_norm(model)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        model.features[0].parametrizations.weight.original0.mul_(3.0)  # g and v no longer from the same weight
        expected_weight = model.features[0].weight.clone()
        expected = model(x)
    assert remove_weight_norm(model) == CNN_LAYERS
    assert _no_parametrizations(model) and type(model.features[0]) is nn.Conv2d
    assert isinstance(model.features[0].weight, nn.Parameter)
    torch.testing.assert_close(model.features[0].weight, expected_weight, rtol=0, atol=0)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert remove_weight_norm(model) == []


def test_fake_quantized_weight_normalized_layers_fold_into_fake_quantized_layers() -> None:
    """``QuantizationCallback`` changes ``__class__`` in place; torch's ``remove_parametrizations`` restores
    ``__class__.__bases__[0]``. Folding must leave working fake-quantized Conv/Linear layers."""
    torch.manual_seed(0)
    model = SmallCNN()
    apply_weight_norm(model)
    parameters = list(model.parameters())
    apply_plan(model, plan_quantization(model, bits=4, learned_scale=False))
    assert list(model.parameters()) == parameters  # same g, v objects: the optimizer keeps training them
    model.train()
    for _ in range(2):
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    conv = model.features[0]
    assert isinstance(conv, FakeQuantizedConv2d) and is_weight_normalized(conv)

    assert remove_weight_norm(model) == CNN_LAYERS
    assert _no_parametrizations(model)
    assert type(model.features[0]) is FakeQuantizedConv2d and type(model.classifier) is FakeQuantizedLinear
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    restore_float(model)
    assert type(model.features[0]) is nn.Conv2d and type(model.classifier) is nn.Linear


def test_restoring_float_keeps_a_working_parametrization() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    apply_weight_norm(model)
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    apply_plan(model, plan_quantization(model, bits=4))
    restore_float(model)
    assert not any(isinstance(m, FakeQuantizedLayer) for m in model.modules())
    assert _normalized(model) == CNN_LAYERS
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    remove_weight_norm(model)
    assert type(model.features[0]) is nn.Conv2d


def test_weight_norm_applied_after_fake_quantization_also_round_trips() -> None:
    layer = nn.Linear(5, 3)
    apply_plan(layer, plan_quantization(layer, bits=8, activation_bits=0))
    apply_weight_norm(layer)
    restore_float(layer)
    assert _normalized(layer) == [""]
    layer(torch.randn(2, 5))
    remove_weight_norm(layer)
    assert type(layer) is nn.Linear


def test_fold_state_dict_loads_into_a_plain_model() -> None:
    torch.manual_seed(0)
    normalized = SmallCNN().eval()
    apply_weight_norm(normalized)
    with torch.no_grad():
        normalized.classifier.parametrizations.weight.original0.mul_(2.0)
    state = normalized.state_dict()
    assert fold_weight_norm_state_dict(state, layers=["features.0.", "classifier."]) == ["features.0.", "classifier."]
    assert "features.4.parametrizations.weight.original0" in state
    assert sorted(fold_weight_norm_state_dict(state)) == ["features.4."]
    plain = SmallCNN().eval()
    plain.load_state_dict(state)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(plain(x), normalized(x), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1, -1])
def test_fold_state_dict_along_another_dim_gives_the_trained_weight(dim: int) -> None:
    torch.manual_seed(1)
    normalized = SmallCNN().eval()
    apply_weight_norm(normalized, dim=dim)
    with torch.no_grad():
        normalized.features[0].parametrizations.weight.original0.uniform_(0.5, 2.0)
    layers = [(name, m) for name, m in normalized.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = {name: m.weight.detach().clone() for name, m in layers}
    state = normalized.state_dict()
    fold_weight_norm_state_dict(state, dim=dim)
    for name, weight in expected.items():
        torch.testing.assert_close(state[f"{name}.weight"], weight, rtol=0, atol=0)


class OptimizerProbe(L.Callback):
    """Records, at each epoch start, whether g and v of the first conv are optimized, and their values."""

    def __init__(self) -> None:
        self.records: list[tuple[int, bool, str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        conv = pl_module.backbone.features[0]
        wn = conv.parametrizations.weight
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        in_optimizer = id(wn.original0) in optimized and id(wn.original1) in optimized
        values = torch.cat([wn.original0.detach().flatten(), wn.original1.detach().flatten()]).clone()
        self.records.append((trainer.current_epoch, in_optimizer, type(conv).__mro__[1].__name__, values))


def _trainer(tmp_path, callbacks: list, max_epochs: int = 3, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        callbacks=callbacks,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_weight_norm_then_qat_then_fold_in_a_fit(tmp_path) -> None:
    L.seed_everything(0)
    probe = OptimizerProbe()
    callbacks = [WeightNormalization(), QuantizationCallback(bits=4, warmup_epochs=1), probe]
    trainer = _trainer(tmp_path, callbacks, max_epochs=3)
    model = ImageClassifier(SmallCNN())
    datamodule = DigitsDataModule()
    trainer.fit(model, datamodule)

    assert [r[:3] for r in probe.records] == [
        (0, True, "Conv2d"),
        (1, True, "FakeQuantizedConv2d"),  # QAT inserted under torch's Parametrized wrapper
        (2, True, "FakeQuantizedConv2d"),
    ]
    assert not torch.equal(probe.records[1][3], probe.records[2][3])  # g, v still trained during QAT
    assert _no_parametrizations(model)
    assert [(name, type(layer)) for name, layer in fake_quantized_layers(model)] == [
        ("backbone.features.0", FakeQuantizedConv2d),
        ("backbone.features.4", FakeQuantizedConv2d),
        ("backbone.classifier", FakeQuantizedLinear),
    ]
    # The folded model computes what was validated last (eval mode: frozen scales, BN running statistics).
    last_acc = float(trainer.callback_metrics["val/acc"])
    again = _trainer(tmp_path, [WeightNormalization()]).validate(model, datamodule, verbose=False)[0]
    assert again["val/acc"] == last_acc

    # A checkpoint saved during training holds g and v; the folded model loads it through the callback.
    checkpoint_path = trainer.checkpoint_callback.best_model_path
    state = torch.load(checkpoint_path, weights_only=False)["state_dict"]
    assert "backbone.features.0.parametrizations.weight.original0" in state
    tested = _trainer(tmp_path, [WeightNormalization()]).test(model, datamodule, ckpt_path=checkpoint_path)
    assert 0.0 < tested[0]["test/acc"] <= 1.0
    assert _no_parametrizations(model)


class FailingClassifier(ImageClassifier):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_weight_norm_is_folded_after_an_exception(tmp_path) -> None:
    model = FailingClassifier(SmallCNN())
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [WeightNormalization(include=["backbone.classifier"])]).fit(model, DigitsDataModule())
    assert _no_parametrizations(model)
    assert isinstance(model.backbone.classifier.weight, nn.Parameter)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(TypeError, match="`include` must be a sequence of glob patterns"):
        WeightNormalization(include="backbone.*")
    with pytest.raises(TypeError, match="`layer_types` must hold nn.Module subclasses"):
        WeightNormalization(layer_types=["Conv2d"])
    callback = WeightNormalization(include=["encoder.*"])
    with pytest.raises(ValueError, match="found no layer .* matching `include`=\\['encoder.\\*'\\]"):
        _trainer(tmp_path, [callback]).fit(ImageClassifier(SmallCNN()), DigitsDataModule())


def test_restoring_float_on_a_deep_copy_gives_it_its_own_parametrized_class() -> None:
    """A deep copy shares torch's dynamic ``Parametrized*`` class with its original (folding one deletes the
    other's property); ``float_snapshot`` restores float on its copy, which rebuilds that class for the copy."""
    model = SmallCNN()
    apply_weight_norm(model)
    apply_plan(model, plan_quantization(model, bits=4))
    snapshot = copy.deepcopy(model)
    restore_float(snapshot)  # rebuilds the copy's wrapper classes, so folding the original cannot reach them
    remove_weight_norm(model)
    snapshot(torch.randn(2, 1, 8, 8))
    assert _normalized(snapshot) == CNN_LAYERS
