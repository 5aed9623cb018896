"""Lightning callbacks: they only orchestrate (schedules, logging, checkpoint state)."""

from qat_lightning.callbacks.bit_width_metrics import BitWidthMetrics
from qat_lightning.callbacks.quantization import QuantizationCallback
from qat_lightning.callbacks.weight_histograms import WeightHistograms
from qat_lightning.callbacks.weight_normalization import WeightNormalization

__all__ = ["BitWidthMetrics", "QuantizationCallback", "WeightHistograms", "WeightNormalization"]
