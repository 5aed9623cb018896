"""Property-based: random valid configurations each train one short fit to a finite loss and a loadable checkpoint."""

import math

import lightning.pytorch as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning import ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import is_prepared

configs = st.fixed_dictionaries(
    {
        "bits": st.integers(2, 16),
        "activation_bits": st.sampled_from([None, 0, 2, 4, 8, 16]),
        "first_last_bits": st.sampled_from([None, 4, 8]),
        "learned_scale": st.sampled_from([None, True, False]),
        "per_channel_weights": st.booleans(),
        "activation_observer": st.sampled_from([None, "minmax", "moving_average", "mse"]),
        "warmup_steps": st.integers(0, 2),
        "freeze_bn_step": st.sampled_from([None, 3]),
        "freeze_observers_step": st.sampled_from([None, 4]),
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs)
def test_random_configuration_trains_and_checkpoints(config, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    losses = []

    class RecordLoss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    model = ImageClassifier(SmallCNN())
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[QuantizationCallback(**config), RecordLoss()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader, loader)
    assert losses and all(math.isfinite(v) for v in losses)
    assert is_prepared(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path, backbone=SmallCNN())
    assert is_prepared(restored)
    restored.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
