"""PTQ mode and the MSE observer."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import fake_quantized_layers
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
