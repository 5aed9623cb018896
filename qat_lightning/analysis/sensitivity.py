"""Layer sensitivity: how much quantizing one layer alone costs, to choose per-layer bit widths."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qat_lightning.calibration import calibrate
from qat_lightning.metrics import ClassAgreement
from qat_lightning.nn import apply_plan, plan_quantization
from qat_lightning.quant import sqnr_db

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LayerSensitivity:
    """Effect of quantizing only ``name`` (weights and input) at ``bits`` bits.

    Attributes:
        sqnr_db: signal-to-quantization-noise ratio of the model's outputs against the float model's, in dB
            (higher is better; ``inf`` when the outputs are identical).
        accuracy: top-1 accuracy (0..1) of the model with only this layer quantized.
        accuracy_drop: float accuracy minus ``accuracy``, in points of the 0..1 scale.
    """

    name: str
    bits: int
    sqnr_db: float
    accuracy: float
    accuracy_drop: float


Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence[Batch], run: Forward) -> torch.Tensor:
    model.eval()
    return torch.cat([run(model, x) for x, _ in batches])


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    accuracy = ClassAgreement(sync_on_compute=False)
    accuracy.update(logits, targets)
    return float(accuracy.compute())


def layer_sensitivity(
    model: nn.Module,
    calibration: Sequence[Batch],
    evaluation: Sequence[Batch],
    bits: int,
    forward: Forward | None = None,
) -> list[LayerSensitivity]:
    """Quantize each Conv/Linear layer of a float classifier alone (PTQ at ``bits``) and measure the damage.

    The BatchNorm statistics stay the float model's: unlike our PTQ, no re-estimation, which on a few calibration
    batches moves every BatchNorm of the model and would drown the one layer's effect.

    Args:
        model: a float model mapping inputs to ``(N, classes)`` logits; not modified.
        calibration: ``(input, target)`` batches to calibrate the quantizers on.
        evaluation: ``(input, target)`` batches to compare outputs and accuracy on.
        bits: bit width of the quantized layer (weights per channel, input per tensor with MSE range).
        forward: ``forward(model, inputs) -> logits``; defaults to ``model(inputs)``.

    Returns:
        One ``LayerSensitivity`` per layer, most sensitive (lowest SQNR) first.
    """
    run = forward or (lambda m, x: m(x))
    ref_logits = _logits(copy.deepcopy(model), evaluation, run)
    targets = torch.cat([y for _, y in evaluation])
    float_acc = _accuracy(ref_logits, targets)
    results = []
    for layer in plan_quantization(model, bits, first_last_bits=None, activation_observer="mse", learned_scale=False):
        candidate = copy.deepcopy(model)
        apply_plan(candidate, [layer])
        calibrate(candidate, calibration, lambda batch, i, m=candidate: run(m, batch[0]), len(calibration))
        logits = _logits(candidate, evaluation, run)
        acc = _accuracy(logits, targets)
        results.append(LayerSensitivity(layer.name, bits, float(sqnr_db(ref_logits, logits)), acc, float_acc - acc))
    return sorted(results, key=lambda r: r.sqnr_db)


def format_sensitivity(results: Sequence[LayerSensitivity]) -> str:
    """The report as a text table: layer, bits, SQNR (dB), accuracy and accuracy drop (percentage points)."""
    rows = [("layer", "bits", "sqnr_db", "acc_%", "drop_pts")]
    rows += [
        (r.name, str(r.bits), f"{r.sqnr_db:.1f}", f"{100 * r.accuracy:.2f}", f"{100 * r.accuracy_drop:.2f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
