"""Datamodules used by the shipped configs."""

from qat_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
