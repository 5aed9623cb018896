"""Converting the model a ``Trainer`` just trained: inputs from its dataloaders, files in its log directory."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from qat_lightning.convert.api import ConversionResult, compare_predictions, convert_model
from qat_lightning.convert.torchscript import load_script

log = logging.getLogger(__name__)

OUTPUT_SUBDIR = "quantized"


def model_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs in a batch: the batch itself, or the first item of a ``(x, y)`` batch."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise ValueError(
        f"Cannot tell the model inputs in a batch of type {type(batch).__name__}: set "
        "`example_input_array` on the LightningModule to one input batch."
    )


def _labels(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1].cpu()
    return None


def default_output_dir(trainer: pl.Trainer) -> Path:
    """``<log_dir>/quantized`` (the run's logger directory, else ``default_root_dir``)."""
    return Path(trainer.log_dir or trainer.default_root_dir) / OUTPUT_SUBDIR


def convert_from_trainer(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    output_dir: str | Path | None = None,
    onnx: bool = False,
    calibration_batches: int = 4,
    agreement_batches: int = 100,
) -> ConversionResult:
    """``convert_model`` the trainer's model and check the int8 file against it on the validation data.

    Example inputs: ``pl_module.example_input_array`` if set, else the first training batch (validation
    batch when there is no training dataloader, as after ``Trainer.validate``); up to
    ``calibration_batches`` of these batches calibrate the quantization points without trained scales.
    The int8 file's predictions are compared with the fake-quant model's on (up to ``agreement_batches``
    batches of) the validation dataloader, when there is one; the agreement and both accuracies are logged
    as ``int8/agreement``, ``int8/val_acc`` and ``int8/fake_quant_val_acc``.
    """
    batches = _first_batches(trainer.train_dataloader or trainer.val_dataloaders, calibration_batches)
    if pl_module.example_input_array is not None:
        example = pl_module.example_input_array
        example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    elif batches:
        example = model_inputs(batches[0])
    else:
        raise ValueError("No example input: set `example_input_array` on the LightningModule or give a dataloader.")
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(trainer)
    result = convert_model(
        pl_module,
        example,
        output_dir,
        calibration_inputs=[model_inputs(b) for b in batches],
        onnx=onnx,
    )
    files = ", ".join(f"{p.name} ({size / 1e3:.1f} kB)" for p, size in result.sizes.items())
    rank_zero_info(
        f"qat-lightning: int8 model written to {output_dir}: {files}; {len(result.int8_layers)} layers on int8 "
        f"kernels, {len(result.float_layers)} float. Load it with `torch.jit.load('{result.int8_path}')`."
    )
    if trainer.val_dataloaders is not None:
        _report_agreement(
            trainer, pl_module, result, [b for loader in _loaders(trainer.val_dataloaders) for b in loader]
        )
    return result


def _loaders(dataloaders: Any) -> list[Any]:
    return list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]


def _first_batches(dataloaders: Any, count: int) -> list[Any]:
    if dataloaders is None:
        return []
    return list(itertools.islice(itertools.chain.from_iterable(_loaders(dataloaders)), count))


def _report_agreement(
    trainer: pl.Trainer, pl_module: pl.LightningModule, result: ConversionResult, batches: list[Any]
) -> None:
    int8 = load_script(str(result.int8_path))
    was_training = pl_module.training
    pl_module.eval()
    try:
        device = pl_module.device
        agreement = compare_predictions(
            lambda *x: pl_module(*(t.to(device) for t in x)).cpu(),
            int8,
            [(tuple(t.cpu() for t in model_inputs(b)), _labels(b)) for b in batches],
        )
    finally:
        pl_module.train(was_training)
    metrics = {"int8/agreement": agreement.agreement}
    if agreement.candidate_accuracy is not None:
        metrics["int8/val_acc"] = agreement.candidate_accuracy
        metrics["int8/fake_quant_val_acc"] = agreement.reference_accuracy
    rank_zero_info(
        "qat-lightning: int8 vs fake-quant on "
        f"{agreement.samples} validation samples: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    result.agreement = agreement
