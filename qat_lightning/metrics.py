"""``ClassAgreement``: the share of samples whose predicted class matches, as a torchmetrics ``Metric``.

Against labels it is top-1 accuracy; against another model's outputs it is the agreement of the two models
(how often a quantized or converted model predicts what its reference predicts). Both arguments may be class
scores (floating point, classes on dim 1, reduced by arg-max) or class indices (integer tensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


def predicted_classes(output: torch.Tensor) -> torch.Tensor:
    """Class indices of ``output``: the arg-max over dim 1 of floating-point scores, integer tensors as they are."""
    if output.is_floating_point():
        if output.dim() < 2:
            raise ValueError(
                f"Class scores need classes on dim 1, got a floating-point tensor of shape {tuple(output.shape)}; "
                "pass class indices as an integer tensor."
            )
        return output.argmax(dim=1)
    return output


class ClassAgreement(Metric):
    """Fraction of samples (elements of the class-index tensors) whose class in ``preds`` equals ``target``'s.

    ``update(preds, target)`` takes scores or indices for either argument (see :func:`predicted_classes`); after
    that reduction both must have the same shape. ``compute()`` is ``nan`` when nothing was compared. Like every
    torchmetrics metric it sums its counts over processes when computed under ``torch.distributed``
    (``sync_on_compute=False`` keeps them per process).

    Example::

        accuracy = ClassAgreement()
        accuracy.update(logits, labels)  # top-1 accuracy
        agreement = ClassAgreement()
        agreement.update(converted_logits, fake_quant_logits)  # do the two models predict the same class?
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Count the samples of one batch whose classes agree."""
        preds, target = predicted_classes(preds), predicted_classes(target)
        if preds.shape != target.shape:
            raise ValueError(
                f"Predicted classes of shape {tuple(preds.shape)} cannot be compared with target classes of shape "
                f"{tuple(target.shape)}."
            )
        self.correct += (preds == target.to(preds.device)).sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        """``correct / total`` as a float tensor (``nan`` before any sample)."""
        return self.correct.double() / self.total
