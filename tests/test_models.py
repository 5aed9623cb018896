"""The write-ups' models: shapes, parameter counts, weight norm, local weights files, the SGD option."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import (
    ImageClassifier,
    LeNet5,
    QuantizationCallback,
    SmallCNN,
    apply_plan,
    fake_quantized_layers,
    load_weights,
    mobilenet_v2,
    plan_quantization,
    resnet18,
    resnet20,
    resnet_cifar,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_bn_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + 2 * c_out  # bias-free conv, BatchNorm weight and bias


def cifar_resnet_params(n: int, num_classes: int = 10) -> int:
    """Parameters of the 6n+2 CIFAR ResNet with 1x1 projection shortcuts, counted from the paper's layout."""
    total = conv_bn_params(3, 16, 3)
    c_in = 16
    for c in (16, 32, 64):
        for block in range(n):
            total += conv_bn_params(c_in, c, 3) + conv_bn_params(c, c, 3)
            if block == 0 and c_in != c:
                total += conv_bn_params(c_in, c, 1)
            c_in = c
    return total + 64 * num_classes + num_classes


def tiny_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **kwargs
    )


def random_loader(n: int = 8, shape: tuple[int, ...] = (3, 32, 32), classes: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def test_lenet5_has_the_classic_shape_and_parameter_count():
    # conv 1->6 5x5, conv 6->16 5x5, fc 400->120->84->10, all with biases.
    expected = (25 * 6 + 6) + (6 * 25 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(LeNet5()) == expected == 61_706
    assert LeNet5()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert LeNet5(in_channels=3, num_classes=4, input_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="`input_size` must be at least 12"):
        LeNet5(input_size=8)


@pytest.mark.parametrize("depth", [20, 32])
def test_cifar_resnet_has_depth_weighted_layers_and_the_papers_parameter_count(depth):
    model = resnet_cifar(depth)
    main_path_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(main_path_convs) + 1 == depth  # 3x3 convolutions plus the classifier
    assert n_params(model) == cifar_resnet_params((depth - 2) // 6)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_is_0_27_million_parameters_and_rejects_other_depths():
    assert 0.265e6 < n_params(resnet20()) < 0.275e6
    assert resnet20(num_classes=100).fc.out_features == 100
    with pytest.raises(ValueError, match="`depth` must be 6n\\+2"):
        resnet_cifar(21)


def test_weight_norm_small_cnn_computes_the_same_function_and_trains_under_qat():
    torch.manual_seed(0)
    plain = SmallCNN(input_size=28)
    torch.manual_seed(0)
    normed = SmallCNN(input_size=28, weight_norm=True)
    layers = [m for m in normed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 3
    for layer in layers:  # weight = g * v / ||v|| with one g per output channel
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        norms = v.flatten(1).norm(dim=1).view_as(g)
        torch.testing.assert_close(layer.weight, g * v / norms)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(normed.eval()(x), plain.eval()(x))  # same init, only reparametrized

    apply_plan(normed, plan_quantization(normed, bits=4, first_last_bits=None))
    normed.train()
    normed(x).sum().backward()
    assert all(layer.parametrizations.weight.original0.grad is not None for layer in layers)
    for _, layer in fake_quantized_layers(normed):  # 4-bit grid: at most 16 weight values per output channel
        assert max(len(row.unique()) for row in layer.quantized_weight().flatten(1)) <= 16


@pytest.mark.parametrize(
    ("build", "shape"),
    [(lambda: mobilenet_v2(num_classes=7), (2, 3, 32, 32)), (lambda: resnet18(num_classes=7), (2, 3, 32, 32))],
)
def test_torchvision_models_build_without_download(build, shape):
    assert build()(torch.randn(shape)).shape == (2, 7)


def test_weights_file_round_trip_and_clear_errors(tmp_path):
    source = mobilenet_v2(num_classes=5, width_mult=0.25)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    loaded = mobilenet_v2(num_classes=5, width_mult=0.25, weights_path=tmp_path / "weights.pth")
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)

    with pytest.raises(ValueError, match="(?s)do not fit MobileNetV2.*size mismatch for classifier.1.weight"):
        mobilenet_v2(num_classes=6, width_mult=0.25, weights_path=tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="'missing.pth' not found.*download.pytorch.org/models/mobilenet_v2"):
        mobilenet_v2(weights_path="missing.pth")
    with pytest.raises(FileNotFoundError, match="download.pytorch.org/models/resnet18"):
        resnet18(weights_path=tmp_path / "missing.pth")


def test_backbone_loads_from_a_lightning_checkpoint(tmp_path):
    model = ImageClassifier(resnet_cifar(8), num_classes=10)
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, random_loader())
    trainer.save_checkpoint(tmp_path / "float.ckpt")

    restored = resnet_cifar(8, weights_path=tmp_path / "float.ckpt")
    for name, tensor in model.backbone.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, msg=name)
    with pytest.raises(ValueError, match="without entries under 'head.'.*'backbone'"):
        load_weights(resnet_cifar(8), tmp_path / "float.ckpt", prefix="head.")


def test_image_classifier_sgd_option_and_qat_of_resnet20(tmp_path):
    model = ImageClassifier(resnet20(), optimizer="sgd", lr=0.05, momentum=0.8, weight_decay=5e-4)
    callback = QuantizationCallback(bits=4, warmup_epochs=0)
    trainer = tiny_trainer(max_steps=2, callbacks=[callback], default_root_dir=tmp_path)  # the int8 files go there
    trainer.fit(model, random_loader())

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.8 and optimizer.defaults["weight_decay"] == 5e-4
    assert optimizer.param_groups[0]["initial_lr"] == 0.05
    convs_and_fc = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(list(fake_quantized_layers(model))) == len(convs_and_fc) == 22  # 19 3x3, 2 shortcuts, fc
    with pytest.raises(ValueError, match="`optimizer` must be 'adamw' or 'sgd'"):
        ImageClassifier(resnet20(), optimizer="adam")
