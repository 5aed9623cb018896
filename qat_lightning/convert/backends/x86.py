"""``<name>_x86.pt2``: the reference int8 program compiled ahead of time for x86 CPUs (oneDNN int8 kernels).

AOTInductor (``torch._inductor.aoti_compile_and_package``, PyTorch's documented ahead-of-time path) compiles the
program with inductor's freezing passes, which fuse each ``dequantize -> conv/linear`` into oneDNN's
``qconv``/``qlinear`` kernels with prepacked weights. ``torch._inductor.aoti_load_package(path)`` runs the package
in a process that has torch alone (no compiler needed to load; writing it needs a C++ compiler).

This is the one backend that leans on internals: in torch 2.14 the int8 fusion patterns are registered by
importing torchao's x86 inductor quantizer, and they apply only under ``torch.no_grad()``. It is optional
(``formats=("x86",)``), gated on the torch versions it was checked with, and
``tests/test_backends.py::test_x86_package_calls_onednn_int8_kernels`` fails loudly if a torch release stops
producing int8 kernels this way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from qat_lightning.convert.export import export_program
from qat_lightning.convert.fidelity import relative_error
from qat_lightning.convert.reference import ReferenceSource, reference_module, with_float_weights
from qat_lightning.nn.convolution_types import CONV_TRANSPOSE_TYPES, CONV_TYPES

NAME = "x86"
FILE_NAME = "{name}_x86.pt2"
LOAD_HINT = "torch._inductor.aoti_load_package('{path}')"  # how a user runs the file, shown at fit end
TESTED_TORCH = ((2, 6), (2, 14))  # oldest and newest (major, minor) checked
MAX_RELATIVE_ERROR = 0.01  # of the package's output against the program's on the example inputs
_FLOAT_KERNEL_TYPES = (*CONV_TRANSPOSE_TYPES, nn.Conv1d)  # see _program


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def requirement() -> str | None:
    oldest, newest = TESTED_TORCH
    if not oldest <= _torch_version() <= newest:
        return (
            f"torch {oldest[0]}.{oldest[1]} to {newest[0]}.{newest[1]} (this is {torch.__version__}, whose inductor "
            "internals the x86 backend was not checked with; use the 'onnx' or 'pt2' formats)"
        )
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return None if compiler else "a C++ compiler (e.g. `apt-get install g++`) to compile the package"


def write(source: ReferenceSource, path: Path) -> None:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401 - registers the int8 fusions

    program = _program(source)
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={"freezing": True})
        expected = program.module()(*source.example_inputs)
        error = relative_error(load(path)(*source.example_inputs), expected)
    if error > MAX_RELATIVE_ERROR:
        raise RuntimeError(
            f"the compiled package computes something else than the int8 program (relative error {error:.3f} on the "
            f"example inputs, more than {MAX_RELATIVE_ERROR}). {mismatch_cause(source)}; use the 'onnx' or 'pt2' "
            "formats for this model"
        )


def mismatch_cause(source: ReferenceSource) -> str:
    """The likely reason why oneDNN's package of ``source`` computes something else than its program."""
    modules = source.integer.model.modules()
    if any(isinstance(m, CONV_TYPES) and m.in_channels == 1 for m in modules):
        return (
            "oneDNN's fused int8 kernels are known to go wrong for convolutions with a single input channel "
            "(grayscale images)"
        )
    cause = "oneDNN's fused int8 kernels requantize in their own float order, and the flipped roundings add up"
    if any(layer.input is not None and layer.input.bits == 8 for layer in source.integer.layers.values()):
        cause += (
            "; on x86 CPUs without VNNI (AVX2 only) they add pairs of 8-bit products in 16 bits, which saturates "
            "on 8-bit inputs: train with `reduce_range=True` (7-bit inputs) for this backend"
        )
    return cause


def _program(source: ReferenceSource) -> torch.export.ExportedProgram:
    """The folded uint8 reference program, with float weights (the same numbers) for the layers inductor's int8
    fusion gets wrong in torch 2.14, each named in a warning: it takes ``dequantize -> conv_transpose`` for an
    ordinary convolution and fails, and it pads a 1-D convolution along a second spatial axis (a ``Conv1d`` of
    length ``L`` and padding ``p`` comes out ``L + 2p`` long). Those layers run as float kernels on their trained
    input grids.
    """
    integer = source.folded()
    floats = [n for n in integer.layers if isinstance(integer.model.get_submodule(n), _FLOAT_KERNEL_TYPES)]
    if not floats:
        return source.program(torch.uint8, fold_batchnorm=True)
    for name in floats:
        rank_zero_warn(
            f"x86: layer `{name}` ({type(integer.model.get_submodule(name)).__name__}) runs as a float kernel on its "
            "trained input grid (inductor's int8 fusion computes it wrongly in this torch)."
        )
    module = with_float_weights(reference_module(integer, torch.uint8), floats)
    return export_program(module, source.example_inputs)


def load(path: Path) -> Callable[..., torch.Tensor]:
    return torch._inductor.aoti_load_package(str(path))
