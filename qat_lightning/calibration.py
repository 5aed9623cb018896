"""Post-training calibration: run a few batches through a fake-quantized model to set its scales."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat_lightning.nn import quantizers, set_observers_enabled


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any, int], Any], num_batches: int) -> int:
    """Observe ``num_batches`` batches with every quantizer of ``model`` recording, then freeze the scales.

    The rest of the model stays in eval mode (BatchNorm uses and keeps its running statistics); no gradient is
    computed and no parameter changes. ``forward(batch, batch_idx)`` runs the model on one batch.

    Returns:
        The number of batches observed (fewer than ``num_batches`` if ``batches`` ran out).
    """
    was_training = model.training
    model.eval()
    set_observers_enabled(model, True)
    for quantizer in quantizers(model):
        quantizer.train()
    seen = 0
    for batch_idx, batch in enumerate(itertools.islice(batches, num_batches)):
        forward(batch, batch_idx)
        seen += 1
    set_observers_enabled(model, False)
    model.train(was_training)
    return seen
