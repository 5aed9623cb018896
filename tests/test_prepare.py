"""Preparing a model in place: same modules and Parameters, optimizers keep working, and it can be undone."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import QuantizationCallback
from qat_lightning.nn import (
    FakeQuantizedConv1d,
    FakeQuantizedConv2d,
    FakeQuantizedLayer,
    FakeQuantizedLinear,
    apply_plan,
    fake_quantize_layer,
    fake_quantized_layers,
    freeze_batchnorm_stats,
    is_prepared,
    is_quantizable,
    plan_quantization,
    prepare_on_load,
    quantizers,
    restore_float,
    set_observers_enabled,
    unsupported_layers,
)
from qat_lightning.quant import activation_config, weight_config


class TwoBranchNet(nn.Module):
    """A Conv2d branch on images and a Conv1d branch on sequences, joined by a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.sequence = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 5 * 5 + 3 * 7, 5)

    def forward(self, image: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.image(image).flatten(1), self.sequence(sequence).flatten(1)], dim=1)
        return self.head(features)


def _inputs(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 5, 5), torch.randn(n, 2, 7)


class MixedNet(nn.Module):
    """Quantizable layers (attention and a transposed convolution among them) next to layers that stay float."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(2, 1, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8 + 16, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.norm(self.embed(tokens)))
        h, _ = self.attn(h, h, h)
        img = self.deconv(self.conv(image))
        return self.fc(torch.cat([h.mean(1), img.flatten(1)], dim=1))


MIXED_FLOAT_LAYERS = ["embed (Embedding)", "rnn (GRU)"]


def test_plan_lists_quantizable_layers_with_their_configs():
    plan = plan_quantization(TwoBranchNet(), bits=4, activation_bits=6, first_last_bits=None, learned_scale=False)
    assert [(p.name, p.layer_type) for p in plan] == [
        ("image.0", "Conv2d"),
        ("sequence.0", "Conv1d"),
        ("head", "Linear"),
    ]
    for p in plan:
        assert p.weight == weight_config(4)
        assert p.activation == activation_config(6)
    assert all(p.activation is None for p in plan_quantization(TwoBranchNet(), bits=4, activation_bits=0))
    uniform = plan_quantization(TwoBranchNet(), bits=3, first_last_bits=None, learned_scale=False)
    assert all(p.activation == activation_config(3) for p in uniform)


def test_conversion_keeps_modules_and_parameters():
    model = TwoBranchNet()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    apply_plan(model, plan_quantization(model, bits=4, learned_scale=False))

    assert type(model.image[0]) is FakeQuantizedConv2d and isinstance(model.image[0], nn.Conv2d)
    assert type(model.sequence[0]) is FakeQuantizedConv1d and isinstance(model.sequence[0], nn.Conv1d)
    assert type(model.head) is FakeQuantizedLinear and isinstance(model.head, nn.Linear)
    for name in ("image.0", "sequence.0", "head"):
        assert dict(model.named_modules())[name] is modules[name]
    # Same Parameter objects, nothing added: the quantizers only hold buffers.
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, param in model.named_parameters():
        assert param is params[name], name
    assert model.head.weight is params["head.weight"]
    assert is_prepared(model)
    assert [name for name, _ in fake_quantized_layers(model)] == ["image.0", "sequence.0", "head"]
    assert len(list(quantizers(model))) == 6
    assert "head.weight_quantizer.scale" in model.state_dict()
    assert model.head.weight_quantizer.scale.shape == (5,)  # one scale per output channel


def test_optimizer_created_before_preparation_keeps_training():
    model = TwoBranchNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    apply_plan(model, plan_quantization(model, bits=4))
    image, sequence = _inputs(16)
    target = torch.randint(0, 5, (16,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(image, sequence), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        # the bias before BatchNorm has no gradient but rounding noise: BatchNorm subtracts it again
        assert name == "image.0.bias" or not torch.equal(param, before[name]), name
    assert losses[-1] < losses[0]


def test_prepared_linear_computes_on_the_grid(np_ref):
    layer = nn.Linear(6, 4)
    fake_quantize_layer(layer, weight_config(4), activation_config(4))
    x = torch.randn(10, 6)
    layer.train()(x)  # calibrate both quantizers
    layer.eval()
    out = layer(x).detach().numpy()

    w = layer.weight.detach().numpy()
    wq = layer.weight_quantizer
    w_ref_scale, _ = np_ref.choose_qparams(*np_ref.min_max(w, 0), 4, True)
    np.testing.assert_array_equal(wq.scale.numpy(), w_ref_scale)
    w_fq = layer.quantized_weight().detach().numpy()
    np_ref.assert_fake_quant_equal(w_fq, w, w_ref_scale, wq.zero_point.numpy(), 4, True, 0)
    iq = layer.input_quantizer
    x_ref_scale, x_ref_zero_point = np_ref.choose_qparams(*np_ref.min_max(x.numpy(), None), 4, False)
    assert iq.scale.item() == x_ref_scale and iq.zero_point.item() == x_ref_zero_point
    x_fq = iq(x).numpy()
    np_ref.assert_fake_quant_equal(x_fq, x.numpy(), x_ref_scale, x_ref_zero_point, 4, False)
    # The layer's output is the float matmul of the two grids (values checked against NumPy above).
    expected = x_fq.astype(np.float64) @ w_fq.T.astype(np.float64) + layer.bias.detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_activation_bits_zero_keeps_inputs_float():
    model = TwoBranchNet()
    apply_plan(model, plan_quantization(model, bits=4, activation_bits=0))
    assert isinstance(model.head.input_quantizer, nn.Identity)
    assert len(list(quantizers(model))) == 3


def test_exclude_globs():
    model = TwoBranchNet()
    plan = plan_quantization(model, bits=8, exclude=["image.*", "hea?"])
    assert [p.name for p in plan] == ["sequence.0"]
    apply_plan(model, plan)
    assert type(model.image[0]) is nn.Conv2d and type(model.head) is nn.Linear
    assert isinstance(model.sequence[0], FakeQuantizedLayer)
    assert plan_quantization(model, bits=8, exclude=["*"]) == []


def test_unsupported_layers_stay_float():
    model = MixedNet()
    plan = plan_quantization(model, bits=4)
    assert [p.name for p in plan] == ["attn", "conv", "deconv", "fc"]
    assert unsupported_layers(model) == MIXED_FLOAT_LAYERS
    apply_plan(model, plan)
    assert unsupported_layers(model) == MIXED_FLOAT_LAYERS
    assert type(model.embed) is nn.Embedding and type(model.rnn) is nn.GRU
    assert isinstance(model.attn.out_proj, FakeQuantizedLayer)  # quantized with its attention module
    assert not is_quantizable(model.attn.out_proj) and not is_quantizable(model.deconv)  # already converted
    with pytest.raises(TypeError, match="Embedding cannot be fake-quantized"):
        fake_quantize_layer(model.embed, weight_config(4), None)
    out = model(torch.randint(0, 10, (2, 5)), torch.randn(2, 1, 4, 4))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


class _MixedModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = MixedNet()

    def training_step(self, batch, batch_idx):
        tokens, image, y = batch
        return F.cross_entropy(self.net(tokens, image), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(
            torch.randint(0, 10, (16, 5)), torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def test_callback_warns_once_about_float_layers(trainer_kwargs, recwarn):
    module = _MixedModule()
    trainer = pl.Trainer(max_epochs=2, callbacks=[QuantizationCallback(bits=4, warmup_epochs=0)], **trainer_kwargs)
    trainer.fit(module)
    assert is_prepared(module)
    messages = [str(w.message) for w in recwarn if "stay float" in str(w.message)]
    assert len(messages) == 1, messages
    for layer in MIXED_FLOAT_LAYERS:
        assert layer in messages[0]
    assert "net.conv (" not in messages[0] and "net.fc (" not in messages[0]


class MyLinear(nn.Linear):
    """A user subclass: converted through a subclass made on the fly."""


def test_user_subclass_is_converted_and_restored():
    layer = MyLinear(3, 2)
    fake_quantize_layer(layer, weight_config(4), activation_config(4))
    assert isinstance(layer, MyLinear) and isinstance(layer, FakeQuantizedLayer)
    assert type(layer).__name__ == "FakeQuantizedMyLinear"
    restore_float(nn.Sequential(layer))
    assert type(layer) is MyLinear


def test_restore_float_returns_the_original_model():
    model = TwoBranchNet()
    float_model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    apply_plan(model, plan_quantization(model, bits=2))
    image, sequence = _inputs()
    freeze_batchnorm_stats(model.train())  # calibrate the quantizers, leave BatchNorm statistics alone
    model(image, sequence)
    model.eval(), float_model.eval()
    assert not torch.allclose(model(image, sequence), float_model(image, sequence), atol=1e-3)

    restore_float(model)
    assert type(model.image[0]) is nn.Conv2d
    assert type(model.sequence[0]) is nn.Conv1d
    assert type(model.head) is nn.Linear
    assert not is_prepared(model)
    assert not hasattr(model.head, "weight_quantizer") and not hasattr(model.head, "input_quantizer")
    assert model.state_dict().keys() == float_model.state_dict().keys()
    for name, param in model.named_parameters():
        assert param is params[name]
    assert torch.equal(model(image, sequence), float_model(image, sequence))


def test_set_observers_enabled_and_freeze_batchnorm():
    model = TwoBranchNet().train()
    apply_plan(model, plan_quantization(model, bits=4))
    set_observers_enabled(model, False)
    assert not any(q.observer_enabled for q in quantizers(model))
    set_observers_enabled(model, True)
    assert all(q.observer_enabled for q in quantizers(model))
    assert freeze_batchnorm_stats(model) == 1
    assert not model.image[1].training and model.head.training
    mean = model.image[1].running_mean.clone()
    model(*_inputs())
    assert torch.equal(model.image[1].running_mean, mean)


def test_prepare_on_load_lets_a_float_model_load_a_quantized_state_dict():
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    fresh, unhooked = copy.deepcopy(trained), copy.deepcopy(trained)
    apply_plan(trained, plan_quantization(trained, 4))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        trained.train()(x)  # observe ranges, initialise the learned scales
    state = trained.state_dict()

    handle = prepare_on_load(fresh)
    fresh.load_state_dict(state)  # strict: every quantizer key finds its module
    assert is_prepared(fresh) and fresh.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))
    handle.remove()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        unhooked.load_state_dict(state)  # without the hook a float model cannot hold the quantizers
