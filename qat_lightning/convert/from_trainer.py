"""Converting the model a ``Trainer`` just trained: inputs from its dataloaders, files in its log directory."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.compile import to_uncompiled

from qat_lightning.convert.api import Batch, ConversionResult, convert_model
from qat_lightning.convert.backends import DEFAULT_FORMATS, backend

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


def _loaders(dataloaders: Any) -> list[Any]:
    if dataloaders is None:
        return []
    return list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]


def _validation_batches(trainer: pl.Trainer, count: int) -> Iterator[Batch]:
    """Up to ``count`` ``(inputs, labels)`` batches of the validation dataloaders, read one at a time."""
    batches = itertools.chain.from_iterable(_loaders(trainer.val_dataloaders))
    for batch in itertools.islice(batches, count):
        yield model_inputs(batch), _labels(batch)


def example_array_inputs(pl_module: pl.LightningModule) -> tuple[torch.Tensor, ...] | None:
    """``pl_module.example_input_array`` as positional inputs (a tuple or list is several), ``None`` if unset."""
    example = getattr(pl_module, "example_input_array", None)
    if example is None:
        return None
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _example_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor, ...]:
    example = example_array_inputs(pl_module)
    if example is not None:
        return example
    for loader in _loaders(trainer.train_dataloader) + _loaders(trainer.val_dataloaders):
        for batch in loader:
            return model_inputs(batch)
    raise ValueError("No example input: set `example_input_array` on the LightningModule or give a dataloader.")


def convert_from_trainer(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    output_dir: str | Path | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    agreement_batches: int = 100,
) -> ConversionResult:
    """``convert_model`` the trainer's model and check every file against it on the validation data.

    Example inputs: ``pl_module.example_input_array`` if set, else the first training batch (validation batch
    when there is no training dataloader, as after ``Trainer.validate``). Each file's predictions are compared
    with the fake-quant model's on up to ``agreement_batches`` batches of the validation dataloaders (the example
    inputs when there are none); the figures are printed, logged as ``int8/<format>/agreement``,
    ``int8/<format>/relative_error``, ``int8/<format>/val_acc`` (and ``int8/fake_quant_val_acc``) and written to
    ``conversion_report.json`` next to the files.
    """
    example = _example_inputs(trainer, pl_module)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(trainer)
    checks = _validation_batches(trainer, agreement_batches) if trainer.val_dataloaders is not None else None
    with uncompiled(pl_module):
        result = convert_model(pl_module, example, output_dir, formats=formats, check_batches=checks)
    files = ", ".join(f"{p.name} ({size / 1e3:.1f} kB)" for p, size in result.sizes.items())
    rank_zero_info(
        f"qat-lightning: int8 model written to {output_dir}: {files}; {len(result.int8_layers)} layers on int8 "
        f"weights and inputs, {len(result.float_layers)} float."
    )
    for fmt in result.fidelity:
        rank_zero_info(
            f"qat-lightning: load the {fmt} file with `{backend(fmt).LOAD_HINT.format(path=result.paths[fmt])}`."
        )
    _log_fidelity(trainer, result)
    return result


_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextlib.contextmanager
def uncompiled(pl_module: pl.LightningModule) -> Iterator[pl.LightningModule]:
    """``pl_module`` with its own methods for the duration, whether or not it was fitted ``torch.compile``d.

    ``Trainer.fit(torch.compile(module))`` runs ``module`` with ``forward`` and the ``*_step`` methods wrapped in
    the compiler (``lightning.pytorch.utilities.compile.from_compiled``); ``torch.export`` and the checks of the
    converted files must trace and run the plain ones. The compiled methods are put back afterwards.
    """
    if getattr(pl_module, "_compiler_ctx", None) is None:
        yield pl_module
        return
    compiled = {name: pl_module.__dict__[name] for name in _COMPILED_METHODS if name in pl_module.__dict__}
    context = pl_module._compiler_ctx
    to_uncompiled(pl_module)
    try:
        yield pl_module
    finally:
        pl_module.__dict__.update(compiled)
        pl_module._compiler_ctx = context


def _log_fidelity(trainer: pl.Trainer, result: ConversionResult) -> None:
    metrics: dict[str, float] = {}
    for fmt, fidelity in result.fidelity.items():
        metrics[f"int8/{fmt}/agreement"] = fidelity.agreement
        metrics[f"int8/{fmt}/relative_error"] = fidelity.relative_error
        if fidelity.accuracy is not None:
            metrics[f"int8/{fmt}/val_acc"] = fidelity.accuracy
            metrics["int8/fake_quant_val_acc"] = fidelity.reference_accuracy
        rank_zero_info(
            f"qat-lightning: {fmt} file vs fake-quant model on {fidelity.samples} samples: agreement "
            f"{fidelity.agreement:.4f}, relative logit error {fidelity.relative_error:.4f}"
            + (
                f", accuracy {fidelity.accuracy:.4f} (fake-quant {fidelity.reference_accuracy:.4f})"
                if fidelity.accuracy is not None
                else ""
            )
        )
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
