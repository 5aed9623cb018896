"""``PostTrainingQuantization``: what ``QuantizationCallback(mode="ptq")`` does when float training ends."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from qat_lightning.calibration import calibrate_post_training
from qat_lightning.metrics import ClassAgreement
from qat_lightning.nn import QuantizationRecipe


class PostTrainingQuantization:
    """Calibrates the quantizers of a model trained in float: the baseline QAT is measured against.

    ``QuantizationCallback(mode="ptq")`` trains in FP32 for the whole fit, fake-quantizes the model with
    :attr:`recipe` when training ends and calls :meth:`calibrate`: every quantizer observes
    ``calibration_batches`` training batches (no gradient, BatchNorm in eval mode) through the module's
    ``predict_step(batch, batch_idx)`` and is frozen; then every BatchNorm recomputes its running statistics on
    ``bn_reestimation_batches`` training batches of the quantized model
    (:func:`~qat_lightning.calibration.reestimate_batch_norm`); the model is then scored on the validation data.
    Under a multi-process strategy (DDP) each process calibrates on its own batches, then every process takes rank
    zero's scales and statistics (:func:`broadcast_buffers`), so all hold the model rank zero writes.

    Args:
        recipe: the quantization recipe. Calibration learns nothing, so its scales are observed ranges
            (``learned_scale`` ``None`` or ``False``; ``True`` is an error) and ``activation_observer=None``
            means MSE-searched clipping of the inputs.
        calibration_batches: training batches observed.
        bn_reestimation_batches: training batches the BatchNorm statistics are recomputed on after calibration
            (the float model's statistics do not fit the shifted activations of the quantized one); ``0``: keep
            them.
    """

    def __init__(
        self, recipe: QuantizationRecipe, calibration_batches: int, bn_reestimation_batches: int = 100
    ) -> None:
        if recipe.learned_scale:
            raise ValueError(
                "`learned_scale`=True needs training, but mode='ptq' only calibrates observed ranges after it; "
                "use learned_scale=None or False, or mode='qat'."
            )
        self.recipe = dataclasses.replace(
            recipe, learned_scale=False, activation_observer=recipe.activation_observer or "mse"
        )
        self.calibration_batches = calibration_batches
        self.bn_reestimation_batches = bn_reestimation_batches

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """Observe the training batches with every quantizer of the fake-quantized ``pl_module``, then freeze them
        and re-estimate the BatchNorm statistics.

        Returns:
            The top-1 accuracy of ``predict_step`` on the validation batches, or ``None`` without validation data
            of the form ``(input, target)`` with predictions matching the targets.
        """

        predict = predict_step_forward(trainer, pl_module)
        observed, averaged = calibrate_post_training(
            pl_module, trainer.train_dataloader, predict, self.calibration_batches, self.bn_reestimation_batches
        )
        broadcast_buffers(trainer, pl_module)
        rank_zero_info(f"QuantizationCallback: calibrated observers on {observed} training batches and froze them.")
        if averaged:
            rank_zero_info(
                f"QuantizationCallback: re-estimated the BatchNorm statistics on {averaged} training batches."
            )
        if trainer.val_dataloaders is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            return _accuracy(trainer.val_dataloaders, predict)
        finally:
            pl_module.train(was_training)

    def summary(self, monitor: str, fp32_score: float | None, quantized_score: float | None) -> str:
        """The fit-end line: the last FP32 validation ``monitor`` and the PTQ model's validation accuracy."""
        return (
            f"QuantizationCallback summary: {monitor} FP32 {_format(fp32_score)} (last validation); "
            f"{self.recipe.bits}-bit PTQ validation accuracy {_format(quantized_score)} (predict_step vs targets; "
            "run trainer.validate/test for every metric)"
        )


def broadcast_buffers(trainer: pl.Trainer, pl_module: torch.nn.Module) -> None:
    """Give every process rank zero's buffers (quantizer scales, zero points and observer ranges, BatchNorm
    statistics), in place; nothing to do in one process.

    DDP keeps parameters equal across processes but calibrates each on its own batches (and does not know
    quantizer buffers created after it wrapped the model), so the calibrated scales and re-estimated statistics
    differ between processes until this runs.
    """
    if trainer.world_size == 1:
        return
    buffers = dict(pl_module.named_buffers())
    received = trainer.strategy.broadcast({name: b.detach().cpu() for name, b in buffers.items()}, src=0)
    with torch.no_grad():
        for name, value in received.items():
            buffers[name].copy_(value)


def predict_step_forward(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[Any, int], Any]:
    """``forward(batch, batch_idx)`` for calibration: the module's ``predict_step`` on the batch moved to its device;
    a failure is re-raised as a ``RuntimeError`` that says what to implement."""

    def predict(batch: Any, batch_idx: int) -> Any:
        try:
            return pl_module.predict_step(trainer.strategy.batch_to_device(batch), batch_idx)
        except Exception as err:
            raise RuntimeError(
                f"Calibration runs `{type(pl_module).__name__}.predict_step(batch, batch_idx)` on training "
                "batches and it failed; implement `predict_step` so that it runs the model on your batch "
                "format (e.g. `return self(batch[0])` for `(input, target)` batches)."
            ) from err

    return predict


def _format(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


@torch.no_grad()
def _accuracy(dataloader: Any, predict: Any) -> float | None:
    accuracy: ClassAgreement | None = None
    for batch_idx, batch in enumerate(dataloader):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return None
        predictions = predict(batch, batch_idx)
        if accuracy is None:
            accuracy = ClassAgreement().to(predictions.device)
        try:
            accuracy.update(predictions, batch[1])
        except ValueError:  # not class predictions for these targets (e.g. a regression model): no accuracy
            return None
    return None if accuracy is None else float(accuracy.compute())
