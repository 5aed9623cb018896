"""From a trained fake-quant model to deployable files: ``torch.export`` program, ONNX QDQ, packed low-bit weights.

- ``integer_model(model)``: the one integer read-out (codes, scales, input grids; ``folded(...)`` folds BatchNorm).
- ``convert_model(model, example_inputs, output_dir)``: every requested file from it, each checked against the model.
- ``QuantizationCallback(convert_on_fit_end=True)`` calls it at fit end; ``python -m qat_lightning.convert``
  (or ``qat-lightning-convert``) does it for a saved QAT checkpoint.
- The ``.pt2`` file needs only torch: ``model = torch.export.load("model_int8.pt2").module()``.
"""

from qat_lightning.convert.api import ConversionResult, convert_model, measure_fidelity
from qat_lightning.convert.backends import BACKENDS, DEFAULT_FORMATS
from qat_lightning.convert.bn_folding import batchnorm_factor, find_batchnorm_pairs, fold_batchnorm, fold_batchnorms
from qat_lightning.convert.export import ExportError
from qat_lightning.convert.fidelity import Fidelity, FidelityMeter
from qat_lightning.convert.from_trainer import convert_from_trainer
from qat_lightning.convert.packing import (
    load_packed_weights,
    pack_codes,
    save_packed_weights,
    unpack_codes,
    write_packed_weights,
)
from qat_lightning.convert.readout import InputGrid, IntegerLayer, IntegerModel, integer_model
from qat_lightning.convert.reference import reference_program

__all__ = [
    "BACKENDS",
    "DEFAULT_FORMATS",
    "ConversionResult",
    "ExportError",
    "Fidelity",
    "FidelityMeter",
    "InputGrid",
    "IntegerLayer",
    "IntegerModel",
    "batchnorm_factor",
    "convert_from_trainer",
    "convert_model",
    "find_batchnorm_pairs",
    "fold_batchnorm",
    "fold_batchnorms",
    "integer_model",
    "load_packed_weights",
    "measure_fidelity",
    "pack_codes",
    "reference_program",
    "save_packed_weights",
    "unpack_codes",
    "write_packed_weights",
]
