"""BatchNorm folding: the pure formulas against NumPy and against the unfused modules, the graph pass, and
how per-channel weight grids move through a fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qat_lightning.convert import (
    InputGrid,
    IntegerLayer,
    batchnorm_factor,
    find_batchnorm_pairs,
    fold_batchnorm,
    fold_batchnorms,
)


def _random_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0, negative_gamma: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
    if bn.affine:
        low = -1.0 if negative_gamma else 0.5
        bn.weight.data.copy_(torch.rand(c, generator=g) * (1.5 - low) + low)
        bn.bias.data.copy_(torch.randn(c, generator=g))
    bn.eval()


def test_fold_batchnorm_matches_numpy_formula() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 3, 3, 3, generator=g), torch.randn(6, generator=g)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    gamma, beta, eps = torch.randn(6, generator=g), torch.randn(6, generator=g), 1e-5
    bn = nn.BatchNorm2d(6, eps=eps)
    bn.running_mean.copy_(mean), bn.running_var.copy_(var), bn.weight.data.copy_(gamma)

    factor = batchnorm_factor(bn)
    folded_w, folded_b = fold_batchnorm(w, b, mean, factor, beta)

    f = gamma.double().numpy() / np.sqrt(var.double().numpy() + eps)
    np.testing.assert_allclose(factor.numpy(), f, rtol=1e-6)
    np.testing.assert_allclose(folded_w.numpy(), w.double().numpy() * f[:, None, None, None], rtol=1e-5, atol=1e-6)
    expected_b = (b.double().numpy() - mean.double().numpy()) * f + beta.double().numpy()
    np.testing.assert_allclose(folded_b.numpy(), expected_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_conv_equals_conv_then_batchnorm(bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8, affine=affine)
    _random_bn(bn)
    x = torch.randn(5, 4, 9, 9)
    with torch.no_grad():
        expected = bn(conv(x))
        weight, folded_bias = fold_batchnorm(
            conv.weight, conv.bias, bn.running_mean, batchnorm_factor(bn), bn.bias if affine else None
        )
        folded = nn.functional.conv2d(x, weight, folded_bias, padding=1)
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)


def test_fold_rejects_mismatched_channels_and_missing_statistics() -> None:
    with pytest.raises(ValueError, match="4 channels but the layer has 8"):
        fold_batchnorm(torch.randn(8, 3), None, torch.zeros(4), torch.ones(4), None)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batchnorm_factor(nn.BatchNorm2d(4, track_running_stats=False))


class _Net(nn.Module):
    """conv->bn->relu, a conv whose output goes through ReLU before its BatchNorm (not foldable), linear->bn1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.bn_fc = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.bn2(torch.relu(self.conv2(x)))
        return self.bn_fc(self.fc(torch.flatten(x, 1)))


def test_find_and_fold_follow_the_data_flow() -> None:
    torch.manual_seed(0)
    model = _Net()
    for bn in (model.bn, model.bn2, model.bn_fc):
        _random_bn(bn)
    model.eval()
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)

    pairs = find_batchnorm_pairs(torch.export.export(model, (x,)).graph)
    assert sorted(pairs) == [("conv", "bn"), ("fc", "bn_fc")]
    factors = fold_batchnorms(model, pairs)

    assert isinstance(model.bn, nn.Identity) and isinstance(model.bn_fc, nn.Identity)
    assert isinstance(model.bn2, nn.BatchNorm2d)  # behind a ReLU: not folded
    assert set(factors) == {"conv", "fc"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_a_module_called_twice_is_not_folded() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(self.conv(x)))

    model = Shared().eval()
    assert find_batchnorm_pairs(torch.export.export(model, (torch.randn(2, 3, 4, 4),)).graph) == []


def _layer(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> IntegerLayer:
    return IntegerLayer("conv", codes, scale, bits, InputGrid(scale=0.1, zero_point=0, bits=8))


def test_folding_keeps_codes_and_moves_scales() -> None:
    codes = torch.tensor([[3, -8], [7, -2], [1, 0]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25, 2.0])
    factor = torch.tensor([2.0, -0.5, 0.0])

    folded = _layer(codes, scale, 4).folded(factor)

    assert torch.equal(folded.codes, torch.tensor([[3, -8], [-7, 2], [0, 0]], dtype=torch.int8))
    assert torch.equal(folded.scale, torch.tensor([1.0, 0.125, 2.0]))
    assert torch.equal(folded.weight(), _layer(codes, scale, 4).weight() * factor[:, None])


def test_folding_an_8_bit_minimum_with_negative_gamma_clamps_one_step() -> None:
    codes = torch.tensor([[-128, 127, 5]], dtype=torch.int8)
    folded = _layer(codes, torch.tensor([1.0]), 8).folded(torch.tensor([-1.0]))
    assert torch.equal(folded.codes, torch.tensor([[127, -127, -5]], dtype=torch.int8))


def test_folding_a_4_bit_minimum_with_negative_gamma_keeps_its_magnitude() -> None:
    codes = torch.tensor([[-8, 7, 0]], dtype=torch.int8)
    folded = _layer(codes, torch.tensor([0.5]), 4).folded(torch.tensor([-2.0]))
    assert torch.equal(folded.codes, torch.tensor([[8, -7, 0]], dtype=torch.int8))
    assert torch.equal(folded.weight(), torch.tensor([[8.0, -7.0, 0.0]]))
