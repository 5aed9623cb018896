"""From a trained fake-quant model to deployable files: int8 TorchScript, packed low-bit weights, ONNX QDQ.

- ``convert_model(model, example_inputs, output_dir)``: all files at once, checked against the model.
- ``QuantizationCallback(convert_on_fit_end=True)`` calls it at fit end; ``python -m qat_lightning.convert``
  (or ``qat-lightning-convert``) does it for a saved QAT checkpoint.
- The int8 file needs only torch: ``model = torch.jit.load("model_int8.pt")``.
"""

from qat_lightning.convert.api import Agreement, ConversionResult, compare_predictions, convert_model
from qat_lightning.convert.bn_folding import batchnorm_factor, find_batchnorm_pairs, fold_batchnorm, fold_batchnorms
from qat_lightning.convert.from_trainer import convert_from_trainer
from qat_lightning.convert.int8 import IntegerLayer, to_int8_graph
from qat_lightning.convert.packing import load_packed_weights, pack_codes, save_packed_weights, unpack_codes

__all__ = [
    "Agreement",
    "ConversionResult",
    "IntegerLayer",
    "batchnorm_factor",
    "compare_predictions",
    "convert_from_trainer",
    "convert_model",
    "find_batchnorm_pairs",
    "fold_batchnorm",
    "fold_batchnorms",
    "load_packed_weights",
    "pack_codes",
    "save_packed_weights",
    "to_int8_graph",
    "unpack_codes",
]
