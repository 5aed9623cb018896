"""Eval-mode copies of a model at another bit width: what "the model evaluated at ``b`` bits" means.

The model itself is never touched: every function here deep-copies it first, so its parameters, BatchNorm
statistics, observers and fake-quant modules stay exactly as they were.

- ``float_snapshot``: the current float weights with every fake quantizer removed.
- ``quantized_snapshot`` of a **fake-quantized** model (QAT): each of the model's own quantizers is kept with the
  clipping range it uses now (observed, or learned by LSQ: ``scale * (qmax - qmin)``) and re-gridded to ``b``
  bits; layers the model keeps float stay float. A quantizer already at ``b`` bits is left as it is, so when
  every layer trains at ``b`` bits the snapshot computes exactly what the model computes.
- ``quantized_snapshot`` of a **float** model: post-training fake quantization, as the ResNet-20 write-up did
  with min/max observers. Every quantizable layer (see ``plan_quantization``) gets per-channel symmetric
  ``b``-bit weights (range: the current weights; one range per tensor with ``per_channel=False``) and, with
  ``quantize_activations``, per-tensor asymmetric ``b``-bit inputs whose range is the running min/max over float
  forward passes of ``calibration_inputs``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat_lightning.nn.fake_quantized import FakeQuantizedModule
from qat_lightning.nn.prepare import (
    LayerPlan,
    apply_plan,
    is_prepared,
    plan_quantization,
    quantizers,
    restore_float,
)
from qat_lightning.quant import FakeQuantizer, check_bits

Forward = Callable[[nn.Module, Any], Any]


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


def float_snapshot(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` without fake quantization (its float weights as they are now)."""
    snapshot = copy.deepcopy(model).eval()
    restore_float(snapshot)
    return snapshot


def _ptq_plan(plan: list[LayerPlan], per_channel: bool) -> list[LayerPlan]:
    """``plan`` for post-training calibration: running min/max input observers, weights per channel or not."""
    return [
        dataclasses.replace(
            p,
            weight=dataclasses.replace(p.weight, per_channel=per_channel),
            activation=dataclasses.replace(p.activation, observer="minmax") if p.activation else None,
        )
        for p in plan
    ]


@torch.no_grad()
def _calibrate(snapshot: nn.Module, calibration_inputs: Iterable[Any], forward: Forward) -> None:
    """Record weight ranges, then input ranges over float forward passes (no fake quant) of the inputs."""
    modules = [m for m in snapshot.modules() if isinstance(m, FakeQuantizedModule)]
    for module in modules:
        for name, quantizer in module.weight_quantizers().items():
            quantizer.train()
            quantizer(getattr(module, name))
            quantizer.eval()
            quantizer.fake_quant_enabled = False
    input_quantizers = [q for m in modules for q in m.input_quantizers().values() if isinstance(q, FakeQuantizer)]
    for quantizer in input_quantizers:
        quantizer.train()
        quantizer.fake_quant_enabled = False
    for inputs in calibration_inputs:
        forward(snapshot, inputs)
    for quantizer in input_quantizers:
        quantizer.eval()
    for quantizer in quantizers(snapshot):
        quantizer.fake_quant_enabled = True


def quantized_snapshot(
    model: nn.Module,
    bits: int,
    calibration_inputs: Iterable[Any] = (),
    quantize_activations: bool = True,
    forward: Forward | None = None,
    per_channel: bool = True,
) -> nn.Module:
    """An eval-mode deep copy of ``model`` whose quantizable layers compute at ``bits`` bits.

    See the module docstring for the two cases (fake-quantized or float ``model``).

    Args:
        model: a float or fake-quantized model; left unchanged.
        bits: bit width of weights and (where quantized) layer inputs, 2..16.
        calibration_inputs: inputs of a few batches, each passed as ``forward(snapshot, inputs)``; used only for
            the input ranges of a float model.
        quantize_activations: for a float model, whether layer inputs are quantized too (else weights only).
            A fake-quantized model keeps its own choice.
        forward: how to run the model on one element of ``calibration_inputs`` (default ``model(inputs)``).
        per_channel: for a float model, one weight scale per output channel (default) or one per tensor.
    """
    check_bits(bits)
    snapshot = copy.deepcopy(model).eval()
    if is_prepared(snapshot):
        for quantizer in quantizers(snapshot):
            quantizer.set_bits(bits)
        return snapshot
    calibration_inputs = list(calibration_inputs)
    if quantize_activations and not calibration_inputs:
        raise ValueError(
            "`calibration_inputs` is empty: the input ranges of a float model at "
            f"{bits} bits need at least one batch; pass some inputs or set `quantize_activations=False`."
        )
    activation_bits = bits if quantize_activations else 0
    plan = plan_quantization(snapshot, bits, activation_bits, first_last_bits=None, learned_scale=False)
    apply_plan(snapshot, _ptq_plan(plan, per_channel))
    _calibrate(snapshot, calibration_inputs, forward or _call)
    return snapshot
