"""``convert_model``: one call from a trained fake-quant model to its deployable files, each checked against it.

The model is read out once (``integer_model``), its reference int8 program built once (``reference``), and each
requested backend writes one file from it (``backends``):

- ``<name>_int8.pt2`` (``"pt2"``, default): ``torch.export`` program; ``torch.export.load(path).module()``.
- ``<name>_int8.onnx`` (``"onnx"``, default): ONNX QDQ for ONNX Runtime, OpenVINO, TensorRT.
- ``<name>_int8.pte`` (``"executorch"``, extra ``executorch``): ExecuTorch program lowered to XNNPACK.
- ``<name>_x86.pt2`` (``"x86"``): AOTInductor package of oneDNN int8 kernels (needs a C++ compiler).
- ``<name>_w<bits>.packed.pt`` (``packed=True``): packed low-bit weights of the float architecture.
- ``conversion_report.json``: layers, float layers with reasons, sizes, each file's fidelity.

All files are written to hidden temporary names first and renamed together once every one is complete, so a
conversion that fails or is killed part-way (a model ``torch.export`` cannot capture, a full disk) leaves the
previous files as they were. A backend that cannot translate the model is reported (``ConversionResult.failed``,
the report, a warning) and the others are still written; its file from an earlier conversion is removed, so the
directory never mixes two conversions.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.utils import prune

from qat_lightning.convert.backends import DEFAULT_FORMATS, backend, check_formats
from qat_lightning.convert.export import ExportError
from qat_lightning.convert.fidelity import Fidelity, FidelityMeter, as_logits, disagreement_warning
from qat_lightning.convert.packing import write_packed_weights
from qat_lightning.convert.readout import integer_model
from qat_lightning.convert.reference import ReferenceSource
from qat_lightning.nn import is_prepared, quantizers

log = logging.getLogger(__name__)

Inputs = Sequence[torch.Tensor]
Batch = tuple[Inputs, torch.Tensor | None]
REPORT_NAME = "conversion_report.json"


@dataclass
class ConversionResult:
    """What ``convert_model`` wrote and how closely each file follows the fake-quant model.

    Attributes:
        paths: ``{format: path}`` of every file written (``"packed"`` and ``"report"`` included).
        sizes: file size in bytes per written path.
        int8_layers: layers that run on integer weights and inputs.
        float_layers: fake-quantized layers that stay float in the files, with the reason.
        fidelity: ``{format: Fidelity}`` against the fake-quant model on the checked batches.
        failed: ``{format: error message}`` of the backends that could not write their file.
    """

    paths: dict[str, Path] = field(default_factory=dict)
    sizes: dict[Path, int] = field(default_factory=dict)
    int8_layers: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)
    fidelity: dict[str, Fidelity] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def packed_path(self) -> Path | None:
        return self.paths.get("packed")

    def report(self) -> dict[str, Any]:
        """The JSON-ready summary written as ``conversion_report.json``."""
        return {
            "files": {
                fmt: {"path": p.name, "bytes": self.sizes[p]} for fmt, p in self.paths.items() if p in self.sizes
            },
            "int8_layers": self.int8_layers,
            "float_layers": self.float_layers,
            "fidelity": {fmt: f.as_dict() for fmt, f in self.fidelity.items()},
            "failed": self.failed,
        }


def _staged_name(path: Path) -> Path:
    """``.<stem>.tmp<suffix>``: hidden, and with the suffix that loaders such as ``torch.export.load`` insist on."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


class _StagedFiles:
    """Files written under hidden temporary names (``.<stem>.tmp<suffix>``), renamed to their own names together
    when the ``with`` block ends normally and removed when it raises. A kill part-way leaves at most a temporary file,
    which the next conversion overwrites; it never touches the files of the previous conversion.
    """

    def __init__(self) -> None:
        self.sizes: dict[Path, int] = {}
        self._staged: list[tuple[Path, Path]] = []
        self._stale: list[Path] = []

    def drop(self, path: Path) -> None:
        """Remove ``path`` (a previous conversion's file) with the renames, so that no old file outlives them."""
        self._stale.append(path)

    def write(self, path: Path, write: Callable[[Path], object]) -> Path:
        """Run ``write(tmp)`` on the temporary name ``tmp`` of ``path``; return ``tmp`` (removed if it raises)."""
        tmp = _staged_name(path)
        try:
            write(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._staged.append((tmp, path))
        return tmp

    def size(self, path: Path) -> int:
        """Bytes of the staged file for ``path``."""
        return _staged_name(path).stat().st_size

    def __enter__(self) -> _StagedFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is None:
                for tmp, path in self._staged:
                    os.replace(tmp, path)
                    self.sizes[path] = path.stat().st_size
                for path in self._stale:
                    path.unlink(missing_ok=True)
        finally:
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)


def _lowest_bits(bits: Iterable[int]) -> int:
    """The narrowest weight grid of the model (its 8-bit first/last layers are packed at 8 bits inside)."""
    return min(bits, default=8)


def inference_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode, with ``torch.nn.utils.prune`` masks applied for good (in the copy).

    A layer pruned with its mask kept (``ModelPruning(make_pruning_permanent=False)``) holds its masked weight as
    a non-leaf tensor, which ``copy.deepcopy`` refuses: the copy gets it detached, then loses the pruning
    reparametrization, which leaves a plain weight Parameter holding zeros where the mask has them.
    """
    derived = {
        id(v): v.detach()
        for m in model.modules()
        for v in vars(m).values()
        if isinstance(v, torch.Tensor) and not v.is_leaf
    }
    reference = copy.deepcopy(model, memo=derived)
    for module in reference.modules():
        for name in _pruned_tensors(module):
            prune.remove(module, name)
    return reference.cpu().eval()


def _pruned_tensors(module: nn.Module) -> list[str]:
    """The names of ``module``'s own tensors that ``torch.nn.utils.prune`` reparametrizes: each is held as the
    parameter ``<name>_orig`` and the buffer ``<name>_mask``."""
    parameters = dict(module.named_parameters(recurse=False))
    return [
        name.removesuffix("_mask")
        for name, _ in module.named_buffers(recurse=False)
        if name.endswith("_mask") and name.removesuffix("_mask") + "_orig" in parameters
    ]


def _check_model(model: nn.Module, example_inputs: Inputs) -> None:
    if not is_prepared(model):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no fake-quantized layer: train it with QuantizationCallback "
            "(past its warmup) or prepare it with `apply_plan` before converting."
        )
    if not any(q.calibrated for q in quantizers(model)):
        raise ValueError(
            f"`model` ({type(model).__name__}) is fake-quantized but none of its quantizers has seen data, so it has "
            "no scales to convert: run a few batches through it in train mode (or train it with "
            "QuantizationCallback past its warmup, or load a QAT checkpoint) before converting."
        )
    non_finite = [
        name for name, value in model.state_dict().items() if torch.is_tensor(value) and not value.isfinite().all()
    ]
    if non_finite:
        shown = ", ".join(f"`{n}`" for n in non_finite[:5]) + (
            f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else ""
        )
        raise ValueError(
            f"`model` ({type(model).__name__}) holds NaN or infinite values in {shown}: training diverged, and no "
            "integer model can follow it. Resume from an earlier checkpoint with a lower learning rate or clipped "
            "gradients (`Trainer(gradient_clip_val=1.0)`), then convert."
        )
    if isinstance(example_inputs, torch.Tensor) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ValueError("`example_inputs` must be a tuple of tensors (the model's positional inputs), e.g. `(x,)`.")


def convert_model(
    model: nn.Module,
    example_inputs: Inputs,
    output_dir: str | Path,
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    packed: bool = True,
    check_batches: Iterable[Batch] | None = None,
    name: str = "model",
) -> ConversionResult:
    """Convert a trained fake-quant ``model`` into deployable int8 files, each loaded back and checked.

    ``model`` is only read: the conversion works on a CPU deep copy (pruning masks applied), with the
    trained scales. Every written file is loaded back and run on ``check_batches`` (default: the
    example inputs) next to the fake-quant model; its ``Fidelity`` is in the result and in the JSON report.

    Args:
        model: a model with fake-quantized layers (``QuantizationCallback`` after warmup, or ``apply_plan``).
        example_inputs: one batch of ``model``'s positional inputs (its batch dimension becomes dynamic).
        output_dir: directory for the files (created if missing).
        formats: backends to write, any of ``"pt2"``, ``"onnx"``, ``"executorch"``, ``"x86"``.
        packed: also write the packed low-bit weight file.
        check_batches: ``(inputs, labels or None)`` pairs the files are checked on, streamed one at a time.
        name: file name stem.

    Raises:
        ValueError: ``model`` has no fake-quantized layer, none of its quantizers has seen data, it holds NaN or
            infinite weights or scales (diverged training), ``example_inputs`` is not a sequence of tensors, or
            a format is unknown or lacks its packages.
        ExportError: ``model.forward`` cannot be captured by ``torch.export`` (nothing is written).
    """
    _check_model(model, example_inputs)
    formats = check_formats(tuple(formats))
    example_inputs = tuple(x.detach().cpu() for x in example_inputs)
    reference = inference_copy(model)
    integer = integer_model(reference)
    source = ReferenceSource(integer, example_inputs)
    source.program(torch.uint8)  # an unexportable model fails here, before any file is written
    for layer, reason in integer.float_layers.items():
        rank_zero_warn(f"int8 conversion: layer `{layer}` stays float ({reason}); it keeps its trained grid values.")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = ConversionResult(int8_layers=sorted(integer.layers), float_layers=dict(integer.float_layers))
    runners: dict[str, Callable[..., Any]] = {}
    with _StagedFiles() as files:
        for fmt in formats:
            module = backend(fmt)
            path = output_dir / module.FILE_NAME.format(name=name)
            try:
                tmp = files.write(path, lambda p, m=module: m.write(source, p))
                runners[fmt] = module.load(tmp)
            except (ExportError, OSError):  # the model cannot be captured, or the disk fails: no file at all
                raise
            except Exception as error:  # noqa: BLE001 - one backend's failure must not cost the other files
                result.failed[fmt] = f"{type(error).__name__}: {str(error).strip()[:2000]}"
                rank_zero_warn(f"int8 conversion: the {fmt!r} file could not be written ({result.failed[fmt]}).")
                files.drop(path)
                continue
            result.paths[fmt] = path
        if packed:
            bits = _lowest_bits(layer.bits for layer in integer.weight_codes.values())
            path = output_dir / f"{name}_w{bits}.packed.pt"
            files.write(path, lambda p: write_packed_weights(reference.state_dict(), integer.weight_codes, p))
            result.paths["packed"] = path
        batches = check_batches if check_batches is not None else [(example_inputs, None)]
        result.fidelity = measure_fidelity(reference, runners, batches)
        for fmt, fidelity in result.fidelity.items():
            if (warning := disagreement_warning(fmt, fidelity)) is not None:
                rank_zero_warn(warning)
        result.sizes = {path: files.size(path) for path in result.paths.values()}
        report_path = output_dir / REPORT_NAME
        result.paths["report"] = report_path
        files.write(report_path, lambda p: p.write_text(json.dumps(result.report(), indent=2)))
    result.sizes.update(files.sizes)
    for path, size in result.sizes.items():
        log.info("qat-lightning convert: wrote %s (%.1f kB)", path, size / 1e3)
    return result


@torch.no_grad()
def measure_fidelity(
    reference: Callable[..., Any], candidates: dict[str, Callable[..., Any]], batches: Iterable[Batch]
) -> dict[str, Fidelity]:
    """``Fidelity`` of each candidate against ``reference`` over ``batches`` of ``(inputs, labels or None)``.

    Batches are read one at a time (nothing is kept but the running sums), inputs moved to the CPU.
    """
    meters = {fmt: FidelityMeter() for fmt in candidates}
    for inputs, labels in batches:
        inputs = tuple(x.detach().cpu() for x in inputs)
        expected = as_logits(reference(*inputs))
        for fmt, run in candidates.items():
            meters[fmt].update(expected, as_logits(run(*inputs)), labels)
    return {fmt: meter.result() for fmt, meter in meters.items()}
