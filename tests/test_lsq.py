"""LSQ learned step size: gradients against the paper's formula, initialisation, optimizer registration."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import fake_quantized_layers
from qat_lightning.quant import FakeQuantizer, QuantizerConfig, quant_range


def lsq_scale_grad(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int, grad_out: np.ndarray):
    """Independent LSQ gradient of sum(grad_out * fq(x)) w.r.t. the step size (Esser et al. 2020, eq. 3), in float64.

    As in the forward pass of PyTorch's kernels, a value counts as inside the range when its rounded code
    ``round(x / scale) + zero_point`` is on the grid, and ``x / scale`` is ``x * (1 / scale)`` in float32.
    """
    v = (x.astype(np.float32) * (np.float32(1.0) / np.float32(scale))).astype(np.float64)
    code = np.round(v) + zero_point
    inside = (code >= qmin) & (code <= qmax)
    d = np.where(inside, np.round(v) - v, np.where(code < qmin, qmin - zero_point, qmax - zero_point))
    return float((d * grad_out.astype(np.float64)).sum())


@pytest.mark.parametrize(("bits", "symmetric"), [(2, True), (4, True), (3, False), (8, False)])
def test_per_tensor_lsq_gradient_matches_formula(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(64, 16) * 2
    q = FakeQuantizer(QuantizerConfig(bits=bits, symmetric=symmetric, learned_scale=True))
    q.train()
    q(x)  # initialises scale from the observer
    assert isinstance(q.scale, torch.nn.Parameter)
    q.scale.grad = None
    grad_out = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    (q(xg) * grad_out).sum().backward()

    qmin, qmax = quant_range(bits, symmetric)
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    expected = lsq_scale_grad(x.numpy(), q.scale.item(), int(q.zero_point), qmin, qmax, grad_out.numpy()) * factor
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # straight-through estimator for the input: pass inside the clamp range, zero outside
    v = x / q.scale.detach() + q.zero_point.float()
    inside = ((v >= qmin - 0.5) & (v <= qmax + 0.5)).float()
    assert torch.allclose(xg.grad, grad_out * inside)


def test_per_channel_lsq_gradient_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = FakeQuantizer(QuantizerConfig(bits=4, symmetric=True, per_channel=True, learned_scale=True), 8)
    q.train()
    q(w)
    q.scale.grad = None
    grad_out = torch.randn_like(w)
    (q(w) * grad_out).sum().backward()
    qmin, qmax = quant_range(4, True)
    factor = 1.0 / math.sqrt(w[0].numel() * qmax)
    for c in range(8):
        expected = lsq_scale_grad(w[c].numpy(), q.scale[c].item(), 0, qmin, qmax, grad_out[c].numpy()) * factor
        assert q.scale.grad[c].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_lsq_initialised_from_observer_once_then_learned():
    q = FakeQuantizer(QuantizerConfig(bits=4, symmetric=True, learned_scale=True))
    q.train()
    q(torch.tensor([-3.0, 1.0]))
    assert q.scale.item() == pytest.approx(3.0 / 7.5)
    q(torch.tensor([-30.0, 10.0]))  # a later, wider batch does not reset the learned scale
    assert q.scale.item() == pytest.approx(3.0 / 7.5)


def test_lsq_scales_join_the_running_optimizer_and_learn(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN(), lr=3e-3)
    callback = QuantizationCallback(bits=2, warmup_epochs=1, first_last_bits=None)
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                snapshots["before"] = {
                    n: m.weight_quantizer.scale.detach().clone() for n, m in fake_quantized_layers(pl_module)
                }

    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[callback, Snapshot()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=5,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule())
    optimizer = trainer.optimizers[0]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    layers = dict(fake_quantized_layers(model))
    assert len(layers) == 3
    for name, layer in layers.items():
        assert id(layer.weight_quantizer.scale) in held
        assert not torch.equal(layer.weight_quantizer.scale.detach(), snapshots["before"][name]), name
    new_group = optimizer.param_groups[-1]
    assert new_group["weight_decay"] == 0.0
    # the scheduler drives the new group with the same schedule as the first one
    assert new_group["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
