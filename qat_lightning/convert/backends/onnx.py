"""``<name>_int8.onnx``: the reference int8 program in ONNX QDQ form (``QuantizeLinear``/``DequantizeLinear``).

Written by torch's ``torch.export``-based ONNX exporter from the reference program: int8 weight initializers with
per-channel scales, each integer layer's input on its trained grid (a ``Clip`` in front of ``QuantizeLinear``
narrows the 8-bit container to a ``b < 8``-bit grid). Runs in ONNX Runtime, OpenVINO and TensorRT.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from qat_lightning.convert.backends import onnx_passes
from qat_lightning.convert.reference import ReferenceSource

NAME = "onnx"
FILE_NAME = "{name}_int8.onnx"
LOAD_HINT = "onnxruntime.InferenceSession('{path}')"  # how a user runs the file, shown at fit end
ONNX_OPSET = 18


def requirement() -> str | None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"`pip install {' '.join(missing)}`" if missing else None


def write(source: ReferenceSource, path: Path) -> None:
    program = source.program(torch.uint8)
    names = [f"input{i}" for i in range(len(source.example_inputs))]
    quiet = logging.getLogger("onnxscript").level
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            program,
            source.example_inputs,
            path,
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=names,
            output_names=["output"],
            external_data=False,
            verbose=False,
        )
    finally:
        logging.getLogger("onnxscript").setLevel(quiet)
    import onnx

    proto = onnx.load(str(path))
    onnx_passes.rewrite(proto)
    onnx.save(proto, str(path))


def load(path: Path) -> Callable[..., torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, inputs, strict=True)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run
