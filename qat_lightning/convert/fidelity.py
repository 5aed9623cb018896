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
        self._same = self._classified = self._samples = self._ref_correct = self._correct = self._labelled = 0
        self._error_sq = self._reference_sq = 0.0

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
        ref_class, cand_class = reference.argmax(dim=1), candidate.argmax(dim=1)
        self._same += int((ref_class == cand_class).sum())
        self._classified += len(ref_class)
        if labels is not None and labels.shape == ref_class.shape:
            labels = labels.cpu()
            self._ref_correct += int((ref_class == labels).sum())
            self._correct += int((cand_class == labels).sum())
            self._labelled += len(labels)

    def result(self) -> Fidelity:
        if self._samples == 0:
            raise ValueError("No batch was compared.")
        norm = math.sqrt(self._reference_sq)
        return Fidelity(
            agreement=self._same / self._classified if self._classified else math.nan,
            relative_error=math.sqrt(self._error_sq) / norm if norm else math.sqrt(self._error_sq),
            samples=self._samples,
            reference_accuracy=self._ref_correct / self._labelled if self._labelled else None,
            accuracy=self._correct / self._labelled if self._labelled else None,
        )
