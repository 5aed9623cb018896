"""Diagnostics that help choose bit widths: per-layer sensitivity."""

from qat_lightning.analysis.sensitivity import LayerSensitivity, format_sensitivity, layer_sensitivity

__all__ = ["LayerSensitivity", "format_sensitivity", "layer_sensitivity"]
