"""``BitWidthMetrics``: accuracy, precision, recall and F1 of the model at several bit widths, every validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torchmetrics import MetricCollection

from qat_lightning.callbacks._tensorboard import TensorBoardWriter, epoch_end_step
from qat_lightning.models.classifier import classification_metrics
from qat_lightning.nn import fake_quantized_layers, is_prepared
from qat_lightning.nn.snapshot import float_snapshot, quantized_snapshot
from qat_lightning.quant import check_bits
from qat_lightning.report import MetricTable, figure_to_rgb

PROGRESS_BAR_KEY = "val_train_bits/acc"
# Row order of the table (as in the ResNet-20 write-up); any other metric follows alphabetically.
_METRIC_ORDER = ("acc", "precision", "recall", "f1")


def _metric_rank(name: str) -> tuple[int, str]:
    return (_METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER), name)


class BitWidthMetrics(Callback):
    r"""Evaluates the current weights at each bit width of ``eval_bits`` and in float, at every validation epoch.

    At the start of each validation epoch (not the sanity check) the callback takes eval-mode copies of the
    LightningModule, one per bit width (see :mod:`qat_lightning.nn.snapshot` for exactly what "at ``b`` bits"
    means), runs them on every batch of the first validation dataloader and logs multiclass accuracy (micro)
    and macro precision, recall and F1 as ``val_<b>bit/acc`` ... and ``val_fp32/acc`` .... In short:

    - a **float** model (FP32 warmup, or no ``QuantizationCallback``) is post-training fake-quantized: weights
      per-channel symmetric at ``b`` bits; with ``quantize_activations``, layer inputs per-tensor asymmetric at
      ``b`` bits over the min/max of the first ``calibration_batches`` training batches of the epoch;
    - a **fake-quantized** model keeps its own quantizers and the ranges they observed, re-gridded to ``b`` bits:
      at its training bit width the numbers equal the model's own validation metrics.

    The model is never modified: copies are evaluated, under an isolated RNG, so training (parameters, BatchNorm
    statistics, observers, fake-quant modules, random streams) is bit-identical with or without this callback.
    The model's own weight bit widths (those its plan gave its fake-quantized layers, read from their
    quantizers) are always evaluated; the accuracy at the lowest of them (at ``fp32`` while the model is float)
    is shown in the progress bar as ``val_train_bits/acc`` (not sent to loggers). At fit end the last epoch's
    table (rows: metrics, columns: bit widths) is written as ``<table_name>.md``, ``.csv`` and ``.png`` to
    ``trainer.log_dir`` and logged to TensorBoard as text and image.

    Batches are read as ``(inputs, targets, ...)`` and predictions are ``model(inputs)`` logits of shape
    ``(N, num_classes)``; override :meth:`unpack_batch` and :meth:`predict` in a subclass for other layouts.

    Args:
        eval_bits: bit widths to evaluate, each 2..16.
        quantize_activations: quantize layer inputs of a float model too (``False``: weights only).
        calibration_batches: training batches per epoch whose inputs calibrate activation ranges.
        table_name: file stem and TensorBoard tag of the fit-end table.

    Attributes:
        train_bits: the weight bit widths of the model's fake-quantized layers at the last validation epoch,
            increasing (empty while the model is float).
        results: ``{bits: {metric: value}}`` of the last validation epoch (``None``: float).
        table: the fit-end :class:`~qat_lightning.report.MetricTable`.
        snapshots: ``{bits: model copy}`` evaluated during the current validation epoch (emptied at its end).

    Cost: each validation batch runs ``len(eval_bits) + 1`` extra forward passes, and each validation epoch
    holds as many copies of the model.

    Example::

        trainer = L.Trainer(callbacks=[QuantizationCallback(bits=4), BitWidthMetrics(eval_bits=(2, 4, 8))])
    """

    def __init__(
        self,
        eval_bits: Sequence[int] = (2, 4, 8, 16),
        quantize_activations: bool = True,
        calibration_batches: int = 4,
        table_name: str = "bit_width_metrics",
    ) -> None:
        if isinstance(eval_bits, (int, str)):
            raise TypeError(f"`eval_bits` must be a sequence of bit widths such as (2, 4, 8), got {eval_bits!r}.")
        self.eval_bits = tuple(sorted({check_bits(b, "eval_bits") for b in eval_bits}))
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be a positive integer, got {calibration_batches!r}.")
        self.quantize_activations = quantize_activations
        self.calibration_batches = calibration_batches
        self.table_name = table_name
        self.train_bits: tuple[int, ...] = ()
        self.results: dict[int | None, dict[str, float]] = {}
        self.table: MetricTable | None = None
        self._calibration_inputs: list[Any] = []
        self.snapshots: dict[int | None, nn.Module] = {}  # the copies evaluated this validation epoch, by bits
        self._metrics: dict[int | None, MetricCollection] = {}
        self._writer = TensorBoardWriter(type(self).__name__, "the bit-width table text and plot")
        self._warned_uncalibrated = False

    @staticmethod
    def prefix(bits: int | None) -> str:
        """Logging prefix of a bit width: ``"val_4bit"``, or ``"val_fp32"`` for ``None`` (float)."""
        return "val_fp32" if bits is None else f"val_{bits}bit"

    @property
    def columns(self) -> tuple[int | None, ...]:
        """The evaluated bit widths, increasing, with the training bit widths included and float (``None``) last."""
        return (*sorted(set(self.eval_bits) | set(self.train_bits)), None)

    # ------------------------------------------------------------------ customisation points

    def unpack_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, targets)`` of a batch; the default reads ``(x, y, ...)`` tuples and lists."""
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(
            f"{type(self).__name__} expects batches of the form (inputs, targets, ...), got {type(batch).__name__}; "
            "override `unpack_batch` in a subclass for other batch layouts."
        )

    def predict(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """Class logits (or probabilities) of shape ``(N, num_classes)`` of ``model`` for ``inputs``."""
        return model(inputs)

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibration_inputs = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.quantize_activations and len(self._calibration_inputs) < self.calibration_batches:
            inputs, _ = self.unpack_batch(batch)
            self._calibration_inputs.append(apply_to_collection(inputs, torch.Tensor, lambda t: t.detach().clone()))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots, self._metrics = {}, {}
        if trainer.sanity_checking:
            return
        self.train_bits = tuple(
            sorted({layer.weight_quantizer.config.bits for _, layer in fake_quantized_layers(pl_module)})
        )
        with isolate_rng():
            self.snapshots = self._take_snapshots(pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.snapshots or dataloader_idx != 0:
            return
        inputs, targets = self.unpack_batch(batch)
        with isolate_rng():
            for bits, snapshot in self.snapshots.items():
                logits = self.predict(snapshot, inputs)
                if bits not in self._metrics:
                    metrics = classification_metrics(logits.shape[-1], prefix=f"{self.prefix(bits)}/")
                    self._metrics[bits] = metrics.to(logits.device)
                self._metrics[bits].update(logits, targets)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshots = {}
        if not self._metrics:
            return
        results: dict[int | None, dict[str, float]] = {}
        for bits in self.columns:
            values = self._metrics[bits].compute()
            pl_module.log_dict(values)
            named = {key.split("/", 1)[1]: float(value) for key, value in values.items()}
            results[bits] = {name: named[name] for name in sorted(named, key=_metric_rank)}
        self.results = results
        # One key for the whole fit (Lightning fixes a key's progress-bar flag), whose column changes when the
        # model gets fake-quantized.
        own = results[min(self.train_bits, default=None)]["acc"]
        pl_module.log(PROGRESS_BAR_KEY, own, prog_bar=True, logger=False)
        self._metrics = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.results:
            return
        self.table = MetricTable.from_columns(self.results)
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        if not trainer.is_global_zero:
            return
        markdown = self.table.to_markdown()
        paths = self.table.save(log_dir or trainer.default_root_dir, self.table_name)
        rank_zero_info(f"{type(self).__name__}: metrics per bit width (written to {paths['md']}):\n{markdown}")
        writer = self._writer(trainer)
        if writer is not None:
            step = epoch_end_step(trainer)
            writer.add_text(self.table_name, markdown, step)
            writer.add_image(f"{self.table_name}/plot", figure_to_rgb(self.table.plot()), step, dataformats="HWC")
            writer.flush()

    # ------------------------------------------------------------------ internals

    def _take_snapshots(self, pl_module: pl.LightningModule) -> dict[int | None, nn.Module]:
        quantize_activations = self.quantize_activations
        if quantize_activations and not is_prepared(pl_module) and not self._calibration_inputs:
            quantize_activations = False
            if not self._warned_uncalibrated:
                self._warned_uncalibrated = True
                rank_zero_warn(
                    f"{type(self).__name__}: no training batch seen yet to calibrate activation ranges, so the "
                    "float model is evaluated with quantized weights and float activations."
                )
        snapshots: dict[int | None, nn.Module] = {}
        for bits in self.columns:
            if bits is None:
                snapshots[bits] = float_snapshot(pl_module)
            else:
                snapshots[bits] = quantized_snapshot(
                    pl_module, bits, self._calibration_inputs, quantize_activations, forward=self.predict
                )
        return snapshots
