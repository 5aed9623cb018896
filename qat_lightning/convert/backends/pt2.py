"""``<name>_int8.pt2``: the reference int8 program, saved with ``torch.export.save``.

Its quantize/dequantize steps are plain ATen arithmetic (the ``plain_aten`` flavour of the reference program)
and its weights int8 codes with per-channel scales, so ``torch.export.load(path).module()`` runs it in a process
that has torch alone, on any device torch supports, with the numbers of the validated fake-quant model. The
archive's entries are deflated (``torch.export.load`` reads them as they are).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from qat_lightning.convert.reference import ReferenceSource

NAME = "pt2"
FILE_NAME = "{name}_int8.pt2"
LOAD_HINT = "torch.export.load('{path}').module()"  # how a user runs the file, shown at fit end
# Node metadata that only helps debugging: dropping it keeps the file close to the size of its int8 weights.
_DEBUG_META = ("stack_trace", "source_fn_stack", "from_node", "nn_module_stack", "torch_fn", "original_aten")


def requirement() -> str | None:
    return None


def write(source: ReferenceSource, path: Path) -> None:
    program = source.program(torch.uint8, plain_aten=True)
    for node in program.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    program.example_inputs = None  # the file needs no sample inputs
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    _deflate(buffer, path)


def _deflate(archive: io.BytesIO, path: Path) -> None:
    """Write the ``torch.export.save`` zip archive ``archive`` to ``path`` with its entries deflated.

    The archive stores its entries uncompressed; the graph's JSON (one record per node and per intermediate
    tensor) is then as large as a small model's int8 weights, and deflates about tenfold. ``torch.export.load``
    reads deflated entries.
    """
    archive.seek(0)
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():  # same names and timestamps: the same program gives the same bytes
            deflated = zipfile.ZipInfo(entry.filename, date_time=entry.date_time)
            deflated.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(deflated, source.read(entry.filename))


def load(path: Path) -> Callable[..., torch.Tensor]:
    return torch.export.load(path).module()
