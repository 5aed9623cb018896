"""Distributed data parallel (CPU, gloo, 2 processes): every rank ends with the same quantizer state."""

import lightning.pytorch as pl
import torch

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN


class SaveRankState(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {k: v for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_processes_keep_identical_weights_ranges_and_learned_scales(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    # 2-bit middle layer: LSQ scales (created after DDP wrapped the model); 8-bit first/last: observed ranges
    callback = QuantizationCallback(bits=2, warmup_epochs=1)
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=3,
        limit_train_batches=4,
        limit_val_batches=1,
        callbacks=[callback, SaveRankState(tmp_path)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    quantizer_keys = [k for k in rank0 if "quantizer" in k]
    assert any(k.endswith("features.4.weight_quantizer.scale") for k in quantizer_keys)  # LSQ scale
    assert any(k.endswith("input_quantizer.observer.min_val") for k in quantizer_keys)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
