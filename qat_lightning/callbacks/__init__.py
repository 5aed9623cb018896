"""Lightning callbacks: they only orchestrate (schedules, logging, checkpoint state)."""

from qat_lightning.callbacks.quantization import QuantizationCallback

__all__ = ["QuantizationCallback"]
