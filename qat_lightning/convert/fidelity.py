"""How closely a converted file follows the fake-quant model it came from: arg-max agreement and logit error.

``FidelityMeter`` accumulates batch by batch (memory stays bounded whatever the number of batches):

- ``agreement``: fraction of samples whose arg-max over dim 1 is the same in both (``nan`` for 1-d outputs);
- ``relative_error``: ``||candidate - reference|| / ||reference||`` over all logits seen (L2 norms);
- the accuracies of both against labels, when labels are given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qat_lightning.metrics import ClassAgreement


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a converted file with the fake-quant model over ``samples`` samples (see module docstring)."""

    agreement: float
    relative_error: float
    samples: int
    reference_accuracy: float | None = None
    accuracy: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MIN_AGREEMENT = 0.99
"""Below this arg-max agreement with the fake-quant model a converted file is reported with a warning."""


def disagreement_warning(fmt: str, fidelity: Fidelity) -> str | None:
    """The warning for a ``fmt`` file whose arg-max agreement is below ``MIN_AGREEMENT`` (``None`` otherwise, and
    for outputs without classes, whose agreement is ``nan``)."""
    if not fidelity.agreement < MIN_AGREEMENT:
        return None
    return (
        f"int8 conversion: the {fmt!r} file predicts the fake-quant model's class on {fidelity.agreement:.1%} of "
        f"{fidelity.samples} check samples only (relative logit error {fidelity.relative_error:.3f}). Its runtime "
        "computes the float parts with its own kernels, so a value at a grid boundary can round the other way, and "
        "a model that amplifies such flips (one barely trained, or with BatchNorm statistics of a few batches) then "
        "predicts differently (a model that draws random numbers in eval mode differs anyway). Check it on more "
        "validation batches (`agreement_batches`) before shipping it; the 'pt2' file computes what the model "
        "computes, operation for operation."
    )


def as_logits(output: Any) -> torch.Tensor:
    """The ``(N, classes)`` tensor of a model output: the output itself, or the first tensor of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot compare model outputs of type {type(output).__name__}: expected a tensor of logits.")


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``||candidate - reference|| / ||reference||`` (L2 over all elements; the denominator at least 1e-12)."""
    return float((candidate - reference).norm() / reference.norm().clamp(min=1e-12))


class FidelityMeter:
    """Accumulates ``Fidelity`` over batches of reference and candidate logits."""

    def __init__(self) -> None:
        self._samples = 0
        self._error_sq = self._reference_sq = 0.0
        # Counted on this process only: conversions run on rank zero alone.
        self._agreement, self._reference_accuracy, self._accuracy = (
            ClassAgreement(sync_on_compute=False) for _ in range(3)
        )

    def update(self, reference: torch.Tensor, candidate: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add one batch: ``reference`` and ``candidate`` logits of shape ``(N, ...)``, optional ``labels`` ``(N,)``."""
        reference, candidate = reference.detach().float().cpu(), candidate.detach().float().cpu()
        if reference.shape != candidate.shape:
            raise ValueError(
                f"Output shapes differ: reference {tuple(reference.shape)}, converted {tuple(candidate.shape)}."
            )
        self._error_sq += float((candidate - reference).double().pow(2).sum())
        self._reference_sq += float(reference.double().pow(2).sum())
        self._samples += len(reference)
        if reference.dim() < 2:
            return
        self._agreement.update(candidate, reference)
        if labels is not None and not labels.is_floating_point() and labels.shape == reference.argmax(dim=1).shape:
            self._reference_accuracy.update(reference, labels.cpu())
            self._accuracy.update(candidate, labels.cpu())

    def result(self) -> Fidelity:
        if self._samples == 0:
            raise ValueError("No batch was compared.")
        norm = math.sqrt(self._reference_sq)
        labelled = self._accuracy.update_count > 0
        return Fidelity(
            agreement=float(self._agreement.compute()) if self._agreement.update_count else math.nan,
            relative_error=math.sqrt(self._error_sq) / norm if norm else math.sqrt(self._error_sq),
            samples=self._samples,
            reference_accuracy=float(self._reference_accuracy.compute()) if labelled else None,
            accuracy=float(self._accuracy.compute()) if labelled else None,
        )
