"""PTQ mode and the MSE observer."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.calibration import calibrate, reestimate_batch_norm
from qat_lightning.nn import apply_plan, fake_quantized_layers, plan_quantization, quantizers
from qat_lightning.quant import MSEObserver, QuantizerConfig, choose_qparams, fake_quantize


def numpy_fake_quant_mse(values: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """MSE of asymmetric quantize-dequantize of ``values`` on the range [lo, hi] (0 included), in NumPy."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, np.finfo(np.float32).eps)
    zp = np.clip(-np.round(lo / scale), 0, qmax)
    q = np.clip(np.round(values / scale) + zp, 0, qmax)
    return float((((q - zp) * scale - values) ** 2).mean())


def test_mse_observer_clips_outliers_and_beats_minmax():
    torch.manual_seed(0)
    x = torch.randn(4000)  # below 4096: the observer keeps every value
    x[0] = 40.0  # one outlier stretches the min/max range 10x
    observer = MSEObserver(QuantizerConfig(bits=4, observer="mse"))
    observer(x)
    scale, zp = observer.qparams()
    mse = (fake_quantize(x, scale, zp, 4, False) - x).pow(2).mean().item()
    minmax_mse = numpy_fake_quant_mse(x.numpy(), x.min().item(), x.max().item(), 4)
    assert mse < minmax_mse / 2
    # the chosen range is the best of the candidates, checked independently in NumPy
    candidates = [numpy_fake_quant_mse(x.numpy(), r * x.min().item(), r * x.max().item(), 4) for r in observer.ratios]
    assert mse == pytest.approx(min(candidates), rel=1e-3)


def test_mse_observer_per_channel_shapes():
    w = torch.randn(6, 3, 3, 3)
    observer = MSEObserver(QuantizerConfig(bits=4, symmetric=True, per_channel=True, observer="mse"), 6)
    observer(w)
    scale, zp = observer.qparams()
    assert scale.shape == (6,) and zp.shape == (6,)
    minmax_scale, _ = choose_qparams(observer.min_val, observer.max_val, 4, True)
    assert torch.all(scale <= minmax_scale + 1e-7)


def test_ptq_mode_trains_float_then_calibrates_and_freezes(tmp_path, caplog):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    callback = QuantizationCallback(bits=4, mode="ptq", calibration_batches=3)
    scales = {}

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            scales["quantized_during_training"] = any(True for _ in fake_quantized_layers(pl_module))

    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback, Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=5,
        default_root_dir=tmp_path,
    )
    with caplog.at_level("INFO"):
        trainer.fit(model, dm := DigitsDataModule())
    assert scales["quantized_during_training"] is False
    layers = dict(fake_quantized_layers(model))
    assert len(layers) == 3
    assert all(not q.observer_enabled for layer in layers.values() for q in (layer.weight_quantizer,))
    assert all(not layer.weight_quantizer.config.learned_scale for layer in layers.values())
    assert "calibrated observers on 3 training batches" in caplog.text
    # the PTQ accuracy in the summary equals an independent evaluation of the calibrated model
    model.eval()
    x, y = dm.splits["val"].tensors
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert callback.quantized_score == pytest.approx(expected)
    assert f"4-bit PTQ validation accuracy {expected:.4f}" in caplog.text
    # frozen: further forward passes in train mode do not move the scales
    before = {n: layer.input_quantizer.scale.clone() for n, layer in layers.items()}
    model.train()
    model(x * 10)
    assert all(torch.equal(before[n], layers[n].input_quantizer.scale) for n in layers)


def test_ptq_calibration_error_names_predict_step(tmp_path):
    class NoPredict(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.net(x.flatten(1))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[QuantizationCallback(mode="ptq")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="implement `predict_step`"):
        trainer.fit(NoPredict(), DigitsDataModule())


def test_mse_observer_samples_every_position_of_an_activation():
    """The sample must not alias with the tensor layout. Here the left column of every feature map is zero
    (like zero padding) and holds every 256th value of the flattened tensor; the chosen range must still be
    near the best clipping range for the whole tensor, checked in NumPy."""
    torch.manual_seed(0)
    x = torch.empty(64, 16, 32, 32).exponential_()
    x[..., 0] = 0.0
    observer = MSEObserver(QuantizerConfig(bits=4, observer="mse"))
    observer(x)
    scale, zp = observer.qparams()
    values = x.numpy().ravel()[::7]  # an independent, non-aliasing subsample for the NumPy reference
    chosen = numpy_fake_quant_mse(values, (0 - int(zp)) * scale.item(), (15 - int(zp)) * scale.item(), 4)
    candidates = [numpy_fake_quant_mse(values, 0.0, r * x.max().item(), 4) for r in observer.ratios]
    assert chosen <= min(candidates) * 1.05


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.BatchNorm2d(4),
    )


def _quantized_bn_net(batches) -> torch.nn.Module:
    net = _bn_net()
    apply_plan(net, plan_quantization(net, 2, first_last_bits=None, learned_scale=False))
    calibrate(net, batches, lambda batch, i: net(batch), num_batches=len(batches))
    return net


def _batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(5, 3, 7, 7) * 2 + 1, torch.randn(3, 3, 7, 7), torch.randn(4, 3, 7, 7) - 0.5]


def test_reestimate_batch_norm_averages_the_quantized_models_batch_statistics():
    batches = _batches()
    net = _quantized_bn_net(batches)
    net.eval()
    conv1, bn1, _, conv2, bn2 = net
    float_stats = bn2.running_mean.clone()
    params = {k: v.clone() for k, v in net.named_parameters()}
    scales = [q.scale.clone() for q in quantizers(net)]

    assert reestimate_batch_norm(net, batches, lambda batch, i: net(batch), num_batches=10) == 3

    # independently: each BatchNorm's input in the quantized model, normalised by its batch statistics in train
    # mode; running statistics = mean over the batches of each batch's mean and unbiased variance
    expected = {1: ([], []), 2: ([], [])}
    with torch.no_grad():
        for x in batches:
            h = conv1(x)
            for i, bn in ((1, bn1), (2, bn2)):
                mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
                n = h.numel() / h.shape[1]
                expected[i][0].append(mean)
                expected[i][1].append(var * n / (n - 1))
                h = (h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
                h = h * bn.weight[:, None, None] + bn.bias[:, None, None]
                if i == 1:
                    h = conv2(torch.relu(h))
    for i, bn in ((1, bn1), (2, bn2)):
        torch.testing.assert_close(bn.running_mean, torch.stack(expected[i][0]).mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, torch.stack(expected[i][1]).mean(0), rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3 and not bn.training
    assert not torch.equal(bn2.running_mean, float_stats)
    assert not net.training
    for k, v in net.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    for q, scale in zip(quantizers(net), scales, strict=True):
        torch.testing.assert_close(q.scale, scale, rtol=0, atol=0)


def test_reestimate_batch_norm_keeps_the_statistics_when_it_fails_or_sees_nothing():
    batches = _batches()
    net = _quantized_bn_net(batches)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "tracked" in k}

    def failing(batch, i):
        if i == 1:
            raise RuntimeError("bad batch")
        return net(batch)

    with pytest.raises(RuntimeError, match="bad batch"):
        reestimate_batch_norm(net, batches, failing, num_batches=3)
    assert reestimate_batch_norm(net, [], lambda batch, i: net(batch), num_batches=3) == 0
    for k, v in net.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(bn.momentum == 0.1 for bn in (net[1], net[4])) and net.training and net[1].training
    assert reestimate_batch_norm(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.ones(1, 2)], None, 1) == 0


@pytest.mark.parametrize("bn_batches", [2, 0])
def test_ptq_mode_reestimates_batch_norm_and_the_written_file_predicts_the_same(
    bn_batches, trainer_kwargs, tmp_path, caplog
):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN(channels=(8, 16)))
    callback = QuantizationCallback(
        bits=4, mode="ptq", calibration_batches=1, bn_reestimation_batches=bn_batches, convert_dir=tmp_path / "out"
    )
    stats = {}

    class FloatStatistics(pl.Callback):  # runs before the QuantizationCallback's on_train_end
        def on_train_end(self, trainer, pl_module):
            stats.update({k: v.clone() for k, v in pl_module.state_dict().items() if "running_mean" in k})

    trainer = pl.Trainer(max_epochs=1, callbacks=[FloatStatistics(), callback], **trainer_kwargs)
    dm = DigitsDataModule()
    with caplog.at_level("INFO"):
        trainer.fit(model, dm)
    changed = [not torch.equal(v, model.state_dict()[k]) for k, v in stats.items()]
    assert len(changed) == 2 and all(changed) == bool(bn_batches) and any(changed) == bool(bn_batches)
    assert ("re-estimated the BatchNorm statistics on 2 training batches" in caplog.text) == bool(bn_batches)
    assert all(int(v) == (bn_batches or 3) for k, v in model.state_dict().items() if "num_batches_tracked" in k)
    # the validated (fake-quantized) model and the int8 program it was written to predict the same classes
    x = dm.splits["val"].tensors[0][:64]
    program = torch.export.load(next((tmp_path / "out").rglob("*.pt2"))).module()
    model.eval()
    with torch.no_grad():
        assert torch.equal(program(x).argmax(1), model(x).argmax(1))


def test_bn_reestimation_batches_must_be_a_count():
    with pytest.raises(ValueError, match=r"`bn_reestimation_batches` must be a non-negative integer, got -1"):
        QuantizationCallback(mode="ptq", bn_reestimation_batches=-1)
