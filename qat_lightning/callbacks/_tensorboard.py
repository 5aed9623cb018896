"""Finding the trainer's TensorBoard ``SummaryWriter`` (histograms, text and images need it directly)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


class TensorBoardWriter:
    """The ``experiment`` of the trainer's first ``TensorBoardLogger``, or ``None``.

    Warns once (per owner) when the trainer has loggers but none for TensorBoard; with ``logger=False`` nothing
    is logged anyway and it stays silent.

    Args:
        owner: name used in the warning, e.g. the callback's class name.
        what: what is skipped without TensorBoard, e.g. ``"weight histograms"``.
    """

    def __init__(self, owner: str, what: str) -> None:
        self.owner = owner
        self.what = what
        self._warned = False

    def __call__(self, trainer: pl.Trainer) -> Any | None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if trainer.loggers and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{self.owner}: no TensorBoardLogger among the trainer's loggers, so {self.what} are not logged; "
                "use `Trainer(logger=TensorBoardLogger(...))` (the default when tensorboard is installed)."
            )
        return None


def epoch_end_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs epoch-end metrics at: that of the epoch's last optimizer step (0-indexed)."""
    return max(trainer.global_step - 1, 0)
