"""``QuantizationCallback``: FP32 warmup, then fake quantization, then frozen BatchNorm and observers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from qat_lightning.calibration import calibrate_for_training
from qat_lightning.callbacks.optimizers import give_parameters_own_group
from qat_lightning.callbacks.progressive import ProgressiveBits
from qat_lightning.callbacks.ptq import PostTrainingQuantization, predict_step_forward
from qat_lightning.convert.backends import DEFAULT_FORMATS, check_formats
from qat_lightning.convert.from_trainer import convert_from_trainer, example_array_inputs
from qat_lightning.nn import (
    FloatLayer,
    LayerPlan,
    QuantizationRecipe,
    apply_plan,
    fake_quantized_layers,
    find_input_producers,
    find_output_roundings,
    float_layers,
    format_plan,
    freeze_batchnorm_stats,
    is_prepared,
    plan_quantization,
    prepare_for_state_dict,
    quantizers,
    round_outputs,
    set_observers_enabled,
    share_input_quantizers,
    unsupported_layers,
    with_input_producers,
)
from qat_lightning.nn.output_rounding import ROUNDING_BITS
from qat_lightning.nn.recipe import recipe_from_arguments
from qat_lightning.quant.config import ObserverName

log = logging.getLogger(__name__)

# torchvision's QAT recipe: BN statistics frozen 3 epochs, observers 4 epochs after fake quant starts.
BN_FREEZE_DELAY_EPOCHS = 3
OBSERVER_FREEZE_DELAY_EPOCHS = 4
# Given the run's length, the default freezes come no earlier than 3/4 of the run (``late_freeze_epochs``): measured
# on the glyphs, a BatchNorm freeze 3 epochs into a 24-epoch 2-bit run dropped validation accuracy to about 30% in 2
# of 3 seeds, and on the digits ResNet-20 8- and 4-bit QAT with the early freezes ended 1-3 images below float.


def late_freeze_epochs(max_epochs: int, bn_epoch: int, observer_epoch: int) -> tuple[int, int]:
    """The default freezes for a run of ``max_epochs`` epochs: BatchNorm at epoch ``3 * max_epochs // 4``
    and observers one epoch later, each no earlier than the epoch given (``bn_epoch``, ``observer_epoch``: the
    defaults without a known run length). E.g. ``(24, 3, 4) -> (18, 19)``, ``(4, 3, 4) -> (3, 4)``."""
    late = 3 * max_epochs // 4
    return max(bn_epoch, late), max(observer_epoch, late + 1)


# Lightning precisions a fake-quant model trains under: the parameters, scales and observers stay float32 (autocast
# runs convolutions and matmuls in 16 bits; the quantizers compute in float32 and return their input's dtype).
SUPPORTED_PRECISIONS: tuple[str, ...] = ("32-true", "bf16-mixed", "16-mixed")


def check_precision(precision: str) -> None:
    """Raise a ``ValueError`` naming the fix unless ``precision`` (``Trainer.precision``) is supported.

    ``"16-true"``/``"bf16-true"`` store the weights and the learned scales in 16 bits (float16 without a grad
    scaler diverges, small scale updates round away) and ``"64-true"`` trains in float64: the int8 conversion at
    fit end needs a float32 model, so each of them fails there. Other plugins (Transformer Engine, bitsandbytes)
    replace or quantize the layers themselves.
    """
    if precision in SUPPORTED_PRECISIONS:
        return
    if precision in ("16-true", "bf16-true"):
        fix = precision.replace("-true", "-mixed")  # bf16-true -> bf16-mixed, 16-true -> 16-mixed
        why = (
            "it keeps the weights and the learned quantization scales in 16 bits, which loses small scale updates "
            "(and float16 without a grad scaler diverges), and the int8 conversion needs float32 weights"
        )
    elif precision == "64-true":
        fix, why = "32-true", "the int8 conversion and its checks read a float32 model"
    else:
        fix, why = "bf16-mixed", "this precision plugin changes the layers or their weights itself"
    hint = " (autocast: the same 16-bit convolutions and matmuls, float32 weights and scales)" * fix.endswith("-mixed")
    raise ValueError(
        f"QuantizationCallback does not support `Trainer(precision={precision!r})`: {why}. Use "
        f"`precision={fix!r}`{hint}; the supported precisions are {', '.join(SUPPORTED_PRECISIONS)}."
    )


def _check_count(value: object, name: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "a non-negative integer" + (" or None" if optional else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


class _Event:
    """A phase change scheduled at an epoch or at an optimizer step (at most one of them)."""

    def __init__(self, name: str, epoch: int | None, step: int | None) -> None:
        if epoch is not None and step is not None:
            raise ValueError(f"Give `{name}_epoch` or `{name}_step`, not both.")
        self.epoch, self.step = epoch, step

    def due(self, epoch: int, step: int) -> bool:
        if self.epoch is not None:
            return epoch >= self.epoch
        return self.step is not None and step >= self.step

    def __repr__(self) -> str:
        if self.epoch is not None:
            return f"epoch {self.epoch}"
        return "never" if self.step is None else f"step {self.step}"


def _warn_layers_in_eval_mode(pl_module: torch.nn.Module) -> None:
    """Warn when fake-quantized layers train in eval mode: their observers never update and BatchNorm uses its
    running statistics. Lightning keeps the mode each module is in when ``fit`` starts, so a model evaluated
    (or deep-copied from an evaluated one) before ``fit`` trains that way without another sign."""
    in_eval = [name for name, layer in fake_quantized_layers(pl_module) if not layer.training]
    if in_eval:
        shown = ", ".join(f"`{n}`" for n in in_eval[:3]) + (" ..." if len(in_eval) > 3 else "")
        rank_zero_warn(
            f"QuantizationCallback: {len(in_eval)} fake-quantized layers ({shown}) are in eval mode during training, "
            "so their observers never update and BatchNorm uses its running statistics. Call `model.train()` "
            "before `trainer.fit(model)` unless you put them in eval mode on purpose."
        )


class QuantizationCallback(Callback):
    r"""Quantization-aware training for any LightningModule, in one line.

    Phases (each change is logged):

    1. FP32 warmup for ``warmup_epochs`` epochs (or ``warmup_steps`` optimizer steps).
    2. Fake quantization is inserted into every ``Conv1d/2d/3d`` and ``Linear`` layer the recipe quantizes, in
       place (see :class:`~qat_lightning.nn.QuantizationRecipe` for its defaults: weights per-channel symmetric
       at ``bits``, inputs per-tensor asymmetric, first and last layer at 8 bits, LSQ at <= 4 bits), with
       straight-through gradients. Parameters stay the same objects, so the optimizer and its state carry on.
       The model's ``forward`` is not touched. The quantizers then start from our PTQ calibration
       (``qat_lightning.calibration.calibrate_for_training``): ``calibration_batches`` training batches run
       through ``predict_step`` without gradient, BatchNorm in eval mode, and every input quantizer and every LSQ
       scale gets the MSE-searched (error-minimising) range, observed weights the current weights' range; so QAT
       of a trained float model starts where PTQ ends. LSQ scales are learned from there; observed input
       ranges move on from there as a moving average. (A ``predict_step`` that cannot run the training batches
       gives a warning, and the quantizers start from the first training batch's range instead.)
    2b. With ``progressive`` (APoT's schedule), the layers at ``bits`` train at each of its widths in turn, for
       ``progressive_epochs`` epochs each, each stage starting from the previous one's clipping ranges
       (``FakeQuantizer.set_bits``), then at ``bits``: ``bits=2, progressive=(4, 3)`` is float, 4, 3, then
       2 bits. Layers at another width (``first_last_bits``, ``layer_bits``) keep it. The freezes below come in
       the final stage.
       Off by default: measured on the glyphs benchmark (README, "A 2-bit recipe for the glyphs") it did not
       beat the same number of epochs at ``bits``.
    3. BatchNorm running statistics are frozen at ``freeze_bn_epoch`` (default: 3 epochs into the final stage
       and no earlier than epoch ``3 * max_epochs // 4``, see ``late_freeze_epochs``).
    4. Observers are frozen at ``freeze_observers_epoch`` (default: 4 epochs into the final stage and no earlier
       than one epoch after that BatchNorm freeze): observed scales stop moving.
    5. At fit end (``convert_on_fit_end``), on rank zero: the model is read out in integer form (BatchNorm
       folded, the trained scales) and written in each of ``formats`` (default: a ``torch.export`` ``.pt2``
       program and an ONNX QDQ file) plus a packed low-bit weight file, in ``<log_dir>/quantized``, each checked
       against the fake-quant model on the validation data (see ``qat_lightning.convert``). A failed conversion
       is logged as an error; the trained model and its checkpoints are left as they are.

    Low bit widths, measured (README, "A 2-bit recipe for the glyphs"; ``CompactCNN`` on the glyphs, first/last
    layer at 8 bits, CPU): what closes the 2-bit gap is the fine-tuning budget. With ``warmup_epochs=0`` on a trained
    float model (92.82%) and AdamW at lr 1e-3 with a cosine decay over the run, W2A2 QAT ends 3.4 points below float
    after 6 epochs, 1.9 after 12 and 0.5 after 24 (1.6x the float run's 15 epochs; ``configs/glyphs_qat2.yaml``), one
    seed. At 12 epochs ``progressive=(4, 3)``, ``WeightNormalization()`` and a BatchNorm freeze 9 epochs in each ended
    within 0.12 points of the defaults, LSQ scales at a 10x smaller learning rate 0.9 points below them, lr 5e-4 2.4
    points below, and lr 3e-3 diverged when BatchNorm froze; so progressive stages and weight normalization stay off.
    In 24-epoch runs a BatchNorm freeze 3 epochs in dropped validation accuracy to about 30% in 2 of 3 seeds: the
    default freezes come in the last quarter of the run instead (``late_freeze_epochs``), which took 2-bit QAT over
    3 seeds from 91.41 +- 0.85% to 92.29 +- 0.44% (float 93.00 +- 0.16%) and 4-bit QAT from 93.41 +- 0.74% to
    93.61 +- 0.42% (float 93.21 +- 0.60%); on the digits ResNet-20 it brought 8- and 4-bit QAT back to float on
    the two seeds the early freezes had cost 1-3 test images.

    A model that arrives already fake-quantized (``fit`` again after a fit) keeps its quantizers and trains on in
    QAT from the first batch (no warmup, no second insertion).

    Precision: ``Trainer(precision=...)`` ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"``. Under autocast the
    quantizers (observers, scales, zero points, rounding) compute in float32 and learned scales stay float32
    Parameters, so the 16-bit grad scaler unscales their gradients; any other precision is refused at setup with
    the one to use instead (see ``check_precision``).

    Set a freeze epoch beyond ``max_epochs`` to never freeze. Schedules may be given in optimizer steps
    instead (``warmup_steps``, ``freeze_bn_step``, ``freeze_observers_step``) for short runs; in step mode a
    freeze happens only when its step is given.

    With ``mode="ptq"`` there are no phases: the model trains in FP32 for the whole fit and, when training ends,
    is fake-quantized and calibrated by :class:`~qat_lightning.callbacks.ptq.PostTrainingQuantization`.

    Args:
        bits, activation_bits, exclude, first_last_bits, layer_bits, learned_scale, per_channel_weights,
            activation_observer, reduce_range: the quantization recipe, as the fields of
            :class:`~qat_lightning.nn.QuantizationRecipe` (same meaning, same defaults); or give ``recipe``.
        warmup_epochs: epochs of FP32 training before fake quantization (0 quantizes from the start).
        freeze_bn_epoch: epoch at which BatchNorm statistics are frozen (``None``: 3 epochs after the final stage
            starts, i.e. warmup + 3 without ``progressive``, and no earlier than epoch ``3 * max_epochs // 4`` of
            the Trainer's ``max_epochs``).
        freeze_observers_epoch: epoch at which observers are frozen, at or after ``warmup_epochs`` (``None``: 4
            epochs after the final stage starts, and no earlier than epoch ``3 * max_epochs // 4 + 1``); equal to
            the warmup only with calibration.
        warmup_steps, freeze_bn_step, freeze_observers_step: the same schedule in optimizer steps;
            ``warmup_steps``, when given, replaces ``warmup_epochs``.
        mode: ``"qat"`` (quantization-aware training) or ``"ptq"``: train in FP32 for the whole fit, then at the
            end calibrate observers on ``calibration_batches`` training batches (no gradient, BatchNorm in
            eval mode), freeze them and re-estimate the BatchNorm statistics (``bn_reestimation_batches``): the
            baseline QAT is compared against. Calibration runs the module's
            ``predict_step(batch, batch_idx)``; scales are observed (``learned_scale=True`` is an error) and
            ``activation_observer=None`` means MSE-searched clipping.
        calibration_batches: training batches calibrated on as fake quantization starts (QAT: the PTQ start
            above; ``0``: none, the quantizers start from the first training batch), or observed in PTQ mode.
        bn_reestimation_batches: PTQ mode: after calibration, recompute every BatchNorm's running statistics on
            this many training batches of the quantized model (or one epoch, if shorter; ``0``: keep the float
            statistics). QAT trains them itself.
        progressive: bit widths the layers at ``bits`` train at before it, strictly decreasing, each above
            ``bits`` (e.g. ``(4, 3)`` for ``bits=2``); ``()``: none. Epoch schedules only.
        progressive_epochs: epochs of each ``progressive`` stage: one integer for all, or one per stage.
        monitor: the validation metric reported for the FP32 and the quantized phase at fit end.
        convert_on_fit_end: write the int8 files (and packed weights) when ``fit`` ends.
        convert_dir: directory for those files (``None``: ``<trainer.log_dir>/quantized``).
        formats: the files to write, any of ``qat_lightning.convert.BACKENDS`` (``"pt2"``, ``"onnx"``, ...).
        agreement_batches: validation batches each file is checked on against the fake-quant model.
        share_inputs: round a layer input where it is produced when other ops read it too (a residual branch):
            every reader sees the integer values the int8 files store, so OpenVINO and oneDNN fuse the rounding
            into the producing kernel (see ``qat_lightning.nn.input_sharing``; traced on
            the model's last call before fake quantization starts, a training or sanity-check validation step, else
            ``example_input_array``). The second operand of a residual add of two float tensors (a downsample
            branch) and the input of an average pool are rounded too, on 8 bits, as int8 runtimes store them
            (``qat_lightning.nn.output_rounding``). ``False``: each layer rounds its own input, nothing else.
        recipe: the whole quantization recipe, instead of its keyword arguments above (any of them set to a value
            other than its default is then an error).

    Attributes:
        recipe: the recipe the plan is made from (for PTQ: with observed scales and the calibration observer).

    Example::

        trainer = L.Trainer(max_epochs=20, callbacks=[QuantizationCallback(bits=4)])
        recipe = QuantizationRecipe(bits=2, layer_bits={"classifier": 4})
        trainer = L.Trainer(max_epochs=20, callbacks=[QuantizationCallback(recipe=recipe)])
    """

    def __init__(
        self,
        bits: int = QuantizationRecipe.bits,
        activation_bits: int | None = QuantizationRecipe.activation_bits,
        warmup_epochs: int = 1,
        freeze_bn_epoch: int | None = None,
        freeze_observers_epoch: int | None = None,
        warmup_steps: int | None = None,
        freeze_bn_step: int | None = None,
        freeze_observers_step: int | None = None,
        exclude: Sequence[str] = QuantizationRecipe.exclude,
        first_last_bits: int | None = QuantizationRecipe.first_last_bits,
        layer_bits: dict[str, int] | None = None,
        learned_scale: bool | None = QuantizationRecipe.learned_scale,
        per_channel_weights: bool = QuantizationRecipe.per_channel_weights,
        activation_observer: ObserverName | None = QuantizationRecipe.activation_observer,
        reduce_range: bool = QuantizationRecipe.reduce_range,
        mode: Literal["qat", "ptq"] = "qat",
        calibration_batches: int = 10,
        bn_reestimation_batches: int = 100,
        progressive: Sequence[int] = (),
        progressive_epochs: int | Sequence[int] = 1,
        monitor: str = "val/acc",
        convert_on_fit_end: bool = True,
        convert_dir: str | Path | None = None,
        formats: Sequence[str] = DEFAULT_FORMATS,
        agreement_batches: int = 100,
        share_inputs: bool = True,
        recipe: QuantizationRecipe | None = None,
    ) -> None:
        if mode not in ("qat", "ptq"):
            raise ValueError(f"`mode` must be 'qat' or 'ptq', got {mode!r}.")
        _check_count(calibration_batches, "calibration_batches", optional=False)
        _check_count(bn_reestimation_batches, "bn_reestimation_batches", optional=False)
        _check_count(agreement_batches, "agreement_batches", optional=False)
        recipe = recipe_from_arguments(
            recipe,
            bits=bits,
            activation_bits=activation_bits,
            exclude=exclude,
            first_last_bits=first_last_bits,
            layer_bits={} if layer_bits is None else layer_bits,
            learned_scale=learned_scale,
            per_channel_weights=per_channel_weights,
            activation_observer=activation_observer,
            reduce_range=reduce_range,
        )
        self.mode = mode
        self._ptq = (
            PostTrainingQuantization(recipe, calibration_batches, bn_reestimation_batches) if mode == "ptq" else None
        )
        self.recipe = self._ptq.recipe if self._ptq is not None else recipe
        for name, value in {
            "warmup_epochs": warmup_epochs,
            "freeze_bn_epoch": freeze_bn_epoch,
            "freeze_observers_epoch": freeze_observers_epoch,
            "warmup_steps": warmup_steps,
            "freeze_bn_step": freeze_bn_step,
            "freeze_observers_step": freeze_observers_step,
        }.items():
            _check_count(value, name, optional=name != "warmup_epochs")
        self.calibration_batches = calibration_batches
        self._progressive = ProgressiveBits(
            recipe.bits, progressive, progressive_epochs, warmup_epochs, mode=mode, warmup_steps=warmup_steps
        )
        # Default freezes move to the last quarter of the run once ``max_epochs`` is known (``setup``).
        self._late_bn = self._late_observers = False
        if warmup_steps is None and mode == "qat":
            self._late_bn = freeze_bn_epoch is None and freeze_bn_step is None
            self._late_observers = freeze_observers_epoch is None and freeze_observers_step is None
        if warmup_steps is None:
            final = self._progressive.final_epoch  # BatchNorm and observers freeze in the final stage
            if freeze_bn_epoch is None and freeze_bn_step is None:
                freeze_bn_epoch = final + BN_FREEZE_DELAY_EPOCHS
            if freeze_observers_epoch is None and freeze_observers_step is None:
                freeze_observers_epoch = final + OBSERVER_FREEZE_DELAY_EPOCHS
            self._progressive.check_freezes(
                freeze_bn_epoch=freeze_bn_epoch,
                freeze_bn_step=freeze_bn_step,
                freeze_observers_epoch=freeze_observers_epoch,
                freeze_observers_step=freeze_observers_step,
            )
            self._insert = _Event("warmup", warmup_epochs, None)
            self._check_order(
                "warmup_epochs",
                warmup_epochs,
                freeze_bn_epoch=freeze_bn_epoch,
                freeze_observers_epoch=freeze_observers_epoch,
            )
        else:
            self._insert = _Event("warmup", None, warmup_steps)
            self._check_order(
                "warmup_steps", warmup_steps, freeze_bn_step=freeze_bn_step, freeze_observers_step=freeze_observers_step
            )
        self._freeze_bn = _Event("freeze_bn", freeze_bn_epoch, freeze_bn_step)
        self._freeze_observers = _Event("freeze_observers", freeze_observers_epoch, freeze_observers_step)
        self._default_freezes = (freeze_bn_epoch, freeze_observers_epoch)  # what the late freezes start from
        self.monitor = monitor
        self.convert_on_fit_end = convert_on_fit_end
        self.convert_dir = convert_dir
        self.formats = check_formats(formats)
        self.agreement_batches = agreement_batches
        self.share_inputs = share_inputs
        self._call_recorder: torch.utils.hooks.RemovableHandle | None = None
        self._last_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.plan: list[LayerPlan] = []
        self.float_layers: list[FloatLayer] = []  # the layers with weights that ``plan`` leaves float, and why
        self.quantized = False
        self.bn_frozen = False
        self.observers_frozen = False
        self._skipped_reported = 0
        self.fp32_score: float | None = None
        self.quantized_score: float | None = None

    def _check_order(self, warmup_name: str, warmup: int, **freezes: int | None) -> None:
        for name, value in freezes.items():
            if value is not None and value < warmup:
                raise ValueError(
                    f"`{name}`={value} is earlier than `{warmup_name}`={warmup}: observers and BatchNorm can "
                    f"only be frozen once fake quantization is in place; use a value >= {warmup}."
                )
            calibrated = self.mode == "qat" and self.calibration_batches > 0
            if name.startswith("freeze_observers") and value == warmup and not calibrated:
                raise ValueError(
                    f"`{name}`={value} equals `{warmup_name}`={warmup}: observers frozen as fake quantization starts "
                    f"never set the scales without calibration (`calibration_batches`=0), so the model would train in "
                    f"float; use a value >= {warmup + 1}, or calibrate."
                )

    @property
    def bits(self) -> int:
        """The recipe's weight bit width (layers it gives their own width excepted): that of the final stage."""
        return self.recipe.bits

    @property
    def stage_bits(self) -> int:
        """The bit width the layers at ``bits`` train at now: a ``progressive`` stage's, else ``bits``."""
        return self._progressive.bits_of(self._progressive.stage)

    @property
    def phase(self) -> str:
        """``"fp32"``, ``"qat"``, ``"qat_bn_frozen"`` or ``"qat_frozen"`` (observers and BN frozen)."""
        if not self.quantized:
            return "fp32"
        if self.observers_frozen:
            return "qat_frozen"
        return "qat_bn_frozen" if self.bn_frozen else "qat"

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_precision(str(trainer.precision))
        self._schedule_late_freezes(trainer.max_epochs)
        if is_prepared(pl_module):  # validate/test after fit, or fit again: the plan was already applied
            if self._ptq is None and not self.quantized:  # a new callback: QAT goes on with the model's quantizers
                self.quantized = True
                self.observers_frozen = not any(q.observer_enabled for q in quantizers(pl_module))
                rank_zero_info("QuantizationCallback: the model is already fake-quantized; its quantizers are kept.")
            return
        self.plan = plan_quantization(pl_module, recipe=self.recipe)
        if not self.plan:
            exclude = self.recipe.exclude
            raise ValueError(
                f"QuantizationCallback found no layer to quantize in {type(pl_module).__name__}: it needs at "
                "least one nn.Conv1d, nn.Conv2d, nn.Conv3d or nn.Linear"
                + (f" not matched by `exclude`={list(exclude)}." if exclude else ".")
            )
        self.float_layers = float_layers(pl_module, self.plan, self.recipe.exclude)
        rank_zero_info(f"QuantizationCallback plan ({self.mode}):\n{format_plan(self.plan, self.float_layers)}")
        # Checkpoints saved during QAT hold quantizer state: rebuild that structure before they load.
        pl_module.register_load_state_dict_pre_hook(self._prepare_for_state_dict)
        if self.share_inputs and self._call_recorder is None:  # the inputs to trace input sharing on

            def remember_call(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._last_call = (args, kwargs)  # a function, not a method: deep copies of the model share it

            self._call_recorder = pl_module.register_forward_pre_hook(remember_call, with_kwargs=True)

    def _schedule_late_freezes(self, max_epochs: int | None) -> None:
        """Move the default QAT freezes to the last quarter of a run of ``max_epochs`` epochs (``late_freeze_epochs``);
        freezes given as arguments, step schedules and open-ended runs keep theirs."""
        if not (self._late_bn or self._late_observers) or max_epochs is None or max_epochs < 1:
            return
        default_bn, default_observers = self._default_freezes
        if self._late_bn and default_bn is not None:
            self._freeze_bn = _Event("freeze_bn", late_freeze_epochs(max_epochs, default_bn, default_bn + 1)[0], None)
        if self._late_observers and default_observers is not None:
            late = late_freeze_epochs(max_epochs, default_observers - 1, default_observers)[1]
            self._freeze_observers = _Event("freeze_observers", late, None)
        rank_zero_info(
            f"QuantizationCallback: {self.bits}-bit run of {max_epochs} epochs: BatchNorm freezes at "
            f"{self._freeze_bn}, observers at {self._freeze_observers}."
        )

    def _prepare_for_state_dict(
        self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        if prepare_for_state_dict(module, state_dict, prefix):
            self.quantized = True
            rank_zero_info("QuantizationCallback: rebuilt fake quantization to load a checkpoint saved during QAT.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming: the model was prepared before `configure_optimizers`, so the learned scales sit in the
        # first group; give them their own group, as in the original run, before the optimizer state loads.
        if is_prepared(pl_module):
            self._group_learned_scales(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume the callback state says which phase we are in: make the model match it.
        if self.quantized and not is_prepared(pl_module):
            self._insert_fake_quant(pl_module, reason="to resume QAT")
        if self.observers_frozen:
            set_observers_enabled(pl_module, False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._advance(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Scales learned by LSQ may be created after DDP wrapped the model, so DDP does not average their
        # gradients: average them here, so every process keeps the same scales.
        if trainer.world_size > 1 and self.quantized:
            grads = [p.grad for q in quantizers(pl_module) for p in q.parameters(recurse=False) if p.grad is not None]
            if grads:
                flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skipped = sum(int(q.observer.skipped) for q in quantizers(pl_module))
        if skipped > self._skipped_reported:
            rank_zero_warn(
                f"QuantizationCallback: {skipped - self._skipped_reported} observations of batches with NaN/Inf "
                f"values were skipped by the observers in epoch {trainer.current_epoch} (ranges and scales keep "
                "their last finite values); check the data or the loss scale."
            )
            self._skipped_reported = skipped

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if self.quantized:
            self.quantized_score = score
        else:
            self.fp32_score = score

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def fmt(score: float | None) -> str:
            return "n/a" if score is None else f"{score:.4f}"

        if self._ptq is not None:
            rank_zero_info(self._ptq.summary(self.monitor, self.fp32_score, self.quantized_score))
        else:
            rank_zero_info(
                f"QuantizationCallback summary: {self.monitor} FP32 phase {fmt(self.fp32_score)}, "
                f"{self.bits}-bit QAT phase {fmt(self.quantized_score)} (last validation of each phase)"
            )
        if self.convert_on_fit_end and trainer.is_global_zero:
            self._convert(trainer, pl_module)

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_prepared(pl_module):
            rank_zero_info("QuantizationCallback: fit ended before fake quantization started; nothing to convert.")
            return
        try:
            convert_from_trainer(trainer, pl_module, self.convert_dir, self.formats, self.agreement_batches)
        except Exception as err:  # the trained model must survive any conversion failure
            log.error(
                "QuantizationCallback: int8 conversion failed (%s: %s). The trained model and its checkpoints are "
                "unchanged; convert a checkpoint later with `python -m qat_lightning.convert`.",
                type(err).__name__,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )

    # ------------------------------------------------------------------ phase changes

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ptq is not None:  # PTQ trains in float for the whole fit
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        if not self.quantized and self._insert.due(epoch, step):
            self._progressive.stage = self._progressive.stage_at(epoch)
            self._insert_fake_quant(pl_module, reason=f"at {self._insert}")
            _warn_layers_in_eval_mode(pl_module)
            self._calibrate(trainer, pl_module)
        if self.quantized:
            self._progressive.advance(epoch, pl_module, self.plan)
        if self.quantized and not self.bn_frozen and self._freeze_bn.due(epoch, step):
            n = freeze_batchnorm_stats(pl_module)
            self.bn_frozen = True
            rank_zero_info(
                f"QuantizationCallback: froze the running statistics of {n} BatchNorm layers at {self._freeze_bn}."
            )
        if self.quantized and not self.observers_frozen and self._freeze_observers.due(epoch, step):
            set_observers_enabled(pl_module, False)
            self.observers_frozen = True
            rank_zero_info(f"QuantizationCallback: froze observers (scales fixed) at {self._freeze_observers}.")
        if self.bn_frozen:  # Lightning puts the model back in train mode after validation
            freeze_batchnorm_stats(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ptq is None or self.quantized:
            return
        self._insert_fake_quant(pl_module, reason="after FP32 training (PTQ)")
        self.quantized_score = self._ptq.calibrate(trainer, pl_module)
        self.observers_frozen = self.bn_frozen = True

    def _insert_fake_quant(self, pl_module: torch.nn.Module, reason: str) -> None:
        plan = self.plan or plan_quantization(pl_module, recipe=self.recipe)
        apply_plan(pl_module, plan)
        if self.share_inputs and not any(p.input_from for p in plan):
            plan = with_input_producers(plan, self._share_inputs(pl_module))
        self.plan = plan
        self.quantized = True
        self._progressive.apply(pl_module, plan)
        if self.observers_frozen:
            set_observers_enabled(pl_module, False)
        rank_zero_info(
            f"QuantizationCallback: inserted fake quantization {reason} into {len(plan)} layers "
            f"({self.stage_bits}-bit unless the plan says otherwise)."
        )
        trainer = getattr(pl_module, "_trainer", None)
        if trainer is not None:
            self._group_learned_scales(trainer, pl_module)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start QAT from the PTQ calibration (``calibrate_for_training``) on ``calibration_batches`` batches."""
        if self.calibration_batches == 0 or trainer.train_dataloader is None:
            return
        try:
            seen = calibrate_for_training(
                pl_module, trainer.train_dataloader, predict_step_forward(trainer, pl_module), self.calibration_batches
            )
        except RuntimeError as err:
            rank_zero_warn(
                f"QuantizationCallback: could not calibrate the quantizers as fake quantization starts ({err} Cause: "
                f"{err.__cause__!r}); they start from the range of the first training batch instead. Set "
                "`calibration_batches=0` to silence this."
            )
            return
        self._broadcast_scales(trainer, pl_module)
        rank_zero_info(
            f"QuantizationCallback: calibrated the quantizers on {seen} training batches (error-minimising ranges)."
        )

    @staticmethod
    def _broadcast_scales(trainer: pl.Trainer, pl_module: torch.nn.Module) -> None:
        """Give every process rank zero's calibrated scales and zero points (each calibrated on its own batches)."""
        if trainer.world_size == 1:
            return
        grids = [(q.scale.detach().cpu(), q.zero_point.cpu()) for q in quantizers(pl_module)]
        grids = trainer.strategy.broadcast(grids, src=0)
        for q, (scale, zero_point) in zip(quantizers(pl_module), grids, strict=True):
            if q.calibrated:
                q.start_from(scale.to(q.scale.device), zero_point.to(q.zero_point.device))

    def _share_inputs(self, pl_module: torch.nn.Module) -> dict[str, str]:
        """Round each shared layer input where it is produced (``share_input_quantizers``), traced on the inputs of
        the model's last call (training or sanity-check validation), else on ``example_input_array``."""
        if self._call_recorder is not None:
            self._call_recorder.remove()
            self._call_recorder = None
        call, self._last_call = self._last_call, None
        example = example_array_inputs(pl_module) if call is None else None
        if example is not None:
            call = (example, {})
        if call is None:
            rank_zero_info(
                "QuantizationCallback: the model was not called before fake quantization started, so each layer "
                "rounds its own input; set `example_input_array` (or keep the sanity-check validation steps) to "
                "round shared inputs where they are produced."
            )
            return {}
        args, kwargs = call
        try:
            shared = share_input_quantizers(pl_module, find_input_producers(pl_module, args, kwargs))
        except Exception as err:  # noqa: BLE001 - sharing is an optimisation: QAT works without it
            rank_zero_warn(
                f"QuantizationCallback: could not trace which module produces each layer input ({type(err).__name__}:"
                f" {err}); each layer rounds its own input, other readers of it (residual branches) get it unrounded. "
                "Set `share_inputs=False` to silence this."
            )
            return {}
        try:
            found = find_output_roundings(pl_module, args, kwargs)
        except Exception as err:  # noqa: BLE001 - also an optimisation
            rank_zero_warn(
                f"QuantizationCallback: could not trace the residual adds and pools ({type(err).__name__}: {err}); "
                "their inputs stay float. Set `share_inputs=False` to silence this."
            )
            found = []
        rounded = round_outputs(pl_module, found, self.recipe.input_config(ROUNDING_BITS))
        rank_zero_info(
            f"QuantizationCallback: {len(shared)} layer inputs are rounded where they are produced, and the outputs "
            f"of {len(rounded)} modules that residual adds or pools read ({', '.join(rounded) or 'none'})."
        )
        return shared

    @staticmethod
    def _group_learned_scales(trainer: pl.Trainer, pl_module: torch.nn.Module) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        scales = [p for q in quantizers(pl_module) for p in q.parameters(recurse=False) if p.requires_grad]
        give_parameters_own_group(trainer.optimizers, schedulers, scales)
        floats = unsupported_layers(pl_module)
        if floats:
            rank_zero_warn(
                f"QuantizationCallback: these layers cannot be fake-quantized and stay float: {', '.join(floats)}."
            )

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "quantized": self.quantized,
            "bn_frozen": self.bn_frozen,
            "observers_frozen": self.observers_frozen,
            "stage": self._progressive.stage,
            "fp32_score": self.fp32_score,
            "quantized_score": self.quantized_score,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("bits", self.bits) != self.bits:
            rank_zero_warn(
                f"QuantizationCallback: the checkpoint was trained at bits={state_dict['bits']} but the callback "
                f"has bits={self.bits}; the checkpoint's quantizers are kept as saved."
            )
        self.quantized = state_dict["quantized"]
        self.bn_frozen = state_dict["bn_frozen"]
        self.observers_frozen = state_dict["observers_frozen"]
        self._progressive.stage = state_dict.get("stage", self._progressive.final_stage if self.quantized else 0)
        self.fp32_score = state_dict.get("fp32_score")
        self.quantized_score = state_dict.get("quantized_score")
