"""Distributed data parallel (CPU, gloo, 2 processes): every rank ends with the same quantizer state, and only
rank 0 writes the converted model.

The processes are forked (``ddp_fork``): same collectives and callback hooks as ``ddp``/``ddp_spawn``, without
importing torch and Lightning again in each process (13 s instead of 33 s here).
"""

import json

import lightning.pytorch as pl
import torch

import qat_lightning.convert.api
from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN, is_prepared


class SaveRankState(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {k: v for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


class RecordFileWrites(pl.Callback):
    """In each process, wraps the converter's file writer so that every file it writes is logged with the rank."""

    def __init__(self, log_path):
        self.log_path = log_path

    def setup(self, trainer, pl_module, stage):
        write = qat_lightning.convert.api._StagedFiles.write

        def recorded(files, path, *args, **kwargs):
            with open(self.log_path, "a") as log:
                log.write(json.dumps({"rank": trainer.global_rank, "file": path.name}) + "\n")
            return write(files, path, *args, **kwargs)

        qat_lightning.convert.api._StagedFiles.write = recorded


def test_two_processes_keep_identical_quantizer_state_and_rank_zero_alone_writes_the_int8_model(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    # 2-bit middle layer: LSQ scales (created after DDP wrapped the model); 8-bit first/last: observed ranges
    callback = QuantizationCallback(bits=2, warmup_epochs=1, convert_dir=tmp_path / "int8")
    writes = tmp_path / "writes.jsonl"
    rank0 = _fit_in_two_processes(
        model, tmp_path, [callback, SaveRankState(tmp_path), RecordFileWrites(writes)], max_epochs=3, val_batches=1
    )
    quantizer_keys = [k for k in rank0 if "quantizer" in k]
    assert any(k.endswith("features.4.weight_quantizer.scale") for k in quantizer_keys)  # LSQ scale
    assert any(k.endswith("input_quantizer.observer.min_val") for k in quantizer_keys)

    expected = ["conversion_report.json", "model_int8.onnx", "model_int8.pt2", "model_w2.packed.pt"]
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == expected  # no temporary file left
    recorded = [json.loads(line) for line in writes.read_text().splitlines()]
    assert sorted(r["file"] for r in recorded) == expected and {r["rank"] for r in recorded} == {0}
    program = torch.export.load(tmp_path / "int8" / "model_int8.pt2").module()
    assert program(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_ptq_in_two_processes_ends_with_rank_zeros_scales_and_batch_norm_statistics_everywhere(tmp_path):
    # Each process calibrates (MSE-searched ranges) and re-estimates BatchNorm on its own shard of the batches;
    # afterwards every process must hold rank zero's model, the one rank zero converts and writes.
    pl.seed_everything(0)
    model = ImageClassifier(SmallCNN())
    callback = QuantizationCallback(
        bits=4, mode="ptq", calibration_batches=2, bn_reestimation_batches=2, convert_dir=tmp_path / "int8"
    )
    callbacks = [callback, SaveRankState(tmp_path), SaveRankPredictions(tmp_path)]  # saved after the PTQ
    rank0 = _fit_in_two_processes(model, tmp_path, callbacks, max_epochs=1, val_batches=2)
    assert sum("input_quantizer.scale" in k for k in rank0) == 3 and sum("running_mean" in k for k in rank0) == 2
    assert all(int(v) == 2 for k, v in rank0.items() if "num_batches_tracked" in k)  # re-estimated on 2 batches
    # the written program predicts what every process's fake-quantized model predicted at train end
    program = torch.export.load(tmp_path / "int8" / "model_int8.pt2").module()
    with torch.no_grad():
        written = program(_validation_images()).argmax(1)
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}_predictions.pt"), written)


def _fit_in_two_processes(model, tmp_path, callbacks, max_epochs, val_batches):
    """Fit ``model`` on the digits in two forked CPU processes (4 training batches of 32 per epoch); returns the
    state rank 0 saved at train end (``SaveRankState``) after checking that rank 1 saved the same tensors and that
    ``model``, in this (the main) process, holds them too: Lightning loads rank 0's weights into it non-strictly, and
    ``ImageClassifier`` (``prepare_on_load``) rebuilds the quantizers first, so they are not dropped."""
    trainer = pl.Trainer(
        strategy="ddp_fork",
        accelerator="cpu",
        devices=2,
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=val_batches,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert is_prepared(model)
    main = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    assert main.keys() == rank0.keys()
    for key in rank0:
        assert torch.equal(main[key], rank0[key]), key
    return rank0


def _validation_images() -> torch.Tensor:
    dm = DigitsDataModule()
    dm.setup()
    return dm.splits["val"].tensors[0][:64]


class SaveRankPredictions(pl.Callback):
    """At train end (after the callbacks before it), each process saves its model's classes for 64 images."""

    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            classes = pl_module(_validation_images()).argmax(1)
        pl_module.train(was_training)
        torch.save(classes, self.directory / f"rank{trainer.global_rank}_predictions.pt")
