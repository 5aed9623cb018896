"""Backends: each turns the reference int8 program into one deployable file and runs that file back.

A backend is a module with ``NAME``, ``FILE_NAME`` (a format string with ``{name}``), ``LOAD_HINT`` (how a user
runs the file, a format string with ``{path}``), ``requirement()`` (``None`` when its dependencies are importable,
else the install command), ``write(source, path)`` and ``load(path)`` (a callable from the model's inputs to its
output tensor). Each is optional and deletable on its own: only this
table names them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "pt2": "qat_lightning.convert.backends.pt2",
    "onnx": "qat_lightning.convert.backends.onnx",
    "x86": "qat_lightning.convert.backends.x86",
    "executorch": "qat_lightning.convert.backends.executorch",
}
DEFAULT_FORMATS: tuple[str, ...] = ("pt2", "onnx")


def backend(name: str) -> ModuleType:
    """The backend module called ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown format {name!r}; `formats` takes any of {tuple(BACKENDS)}.")
    return importlib.import_module(BACKENDS[name])


def check_formats(formats: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``formats`` as a tuple, each known and with its dependencies installed (else a ``ValueError`` naming the fix)."""
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    for name in formats:
        missing = backend(name).requirement()
        if missing:
            raise ValueError(f"Format {name!r} needs packages that are not installed: {missing}.")
    return formats
