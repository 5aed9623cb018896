"""``convert_model``: one call from a trained fake-quant model to its deployable files, checked against the model.

Files written to ``output_dir`` (all written to hidden temporary names first and renamed together once every
one is complete, so a conversion that fails or is killed part-way leaves the previous files as they were and
never a half-written file under a final name):

- ``<name>_int8.pt``: TorchScript, oneDNN int8 kernels; ``torch.jit.load(path)`` runs it, no training code.
- ``<name>_w<bits>.packed.pt``: packed low-bit weights (``load_packed_weights``); ``<bits>`` is the narrowest
  layer's width, each layer is packed at its own.
- ``<name>_qdq.onnx`` (``onnx=True``): ONNX QDQ model for ONNX Runtime.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from qat_lightning.convert.int8 import to_int8_graph
from qat_lightning.convert.packing import save_packed_weights
from qat_lightning.convert.torchscript import load_script, save_script, script_int8
from qat_lightning.nn import fake_quantized_layers, is_prepared, quantizers

log = logging.getLogger(__name__)

Inputs = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Agreement:
    """Predictions (arg-max over dim 1) of a converted model against those of its reference.

    Attributes:
        agreement: fraction of samples where both predict the same class.
        reference_accuracy, candidate_accuracy: accuracies when labels were given, else ``None``.
        samples: number of samples compared.
    """

    agreement: float
    reference_accuracy: float | None
    candidate_accuracy: float | None
    samples: int


@dataclass
class ConversionResult:
    """What ``convert_model`` wrote and how closely the int8 file follows the fake-quant model.

    Attributes:
        int8_path, packed_path, onnx_path: the files (``None`` when not written).
        sizes: file size in bytes per written path.
        int8_layers: layers that run on int8 kernels.
        float_layers: layers that stay float, with the reason.
        max_abs_diff: largest absolute output difference, int8 file vs fake-quant model, on the example batch
            (``nan`` for models that do not return a single tensor).
        agreement: predictions of the int8 file vs the fake-quant model on validation data, when measured
            (``convert_from_trainer`` does).
    """

    int8_path: Path
    packed_path: Path | None = None
    onnx_path: Path | None = None
    sizes: dict[Path, int] = field(default_factory=dict)
    int8_layers: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float = float("nan")
    agreement: Agreement | None = None


class _StagedFiles:
    """Files written under hidden temporary names (``.<name>.tmp``), renamed to their own names together when the
    ``with`` block ends normally and removed when it raises. A kill part-way leaves at most a temporary file,
    which the next conversion overwrites; it never touches the files of the previous conversion.
    """

    def __init__(self) -> None:
        self.sizes: dict[Path, int] = {}
        self._staged: list[tuple[Path, Path]] = []

    def write(self, path: Path, write: Callable[[Path], object]) -> Path:
        """Run ``write(tmp)`` on the temporary name ``tmp`` of ``path``; return ``tmp``."""
        tmp = path.with_name(f".{path.name}.tmp")
        self._staged.append((tmp, path))
        write(tmp)
        return tmp

    def __enter__(self) -> _StagedFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            if exc_type is None:
                for tmp, path in self._staged:
                    os.replace(tmp, path)
                    self.sizes[path] = path.stat().st_size
        finally:
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)


def _lowest_bits(model: nn.Module) -> int:
    """The narrowest weight grid of the model (its 8-bit first/last layers are packed at 8 bits inside)."""
    return min(layer.weight_quantizer.config.bits for _, layer in fake_quantized_layers(model))


def _inference_copy(model: nn.Module) -> nn.Module:
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
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, prune.BasePruningMethod):
                hook.remove(module)
                del module._forward_pre_hooks[key]
    return reference.cpu().eval()


def _outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def convert_model(
    model: nn.Module,
    example_inputs: Inputs,
    output_dir: str | Path,
    *,
    calibration_inputs: Iterable[Inputs] = (),
    name: str = "model",
    packed: bool = True,
    onnx: bool = False,
) -> ConversionResult:
    """Convert a trained fake-quant ``model`` into an int8 TorchScript file (and packed / ONNX files).

    ``model`` is only read: the conversion works on a CPU deep copy (pruning masks applied), BatchNorm folded,
    with the trained scales (see ``qat_lightning.convert.int8``). The written int8 file is loaded back and run on
    ``example_inputs`` before ``convert_model`` returns.

    Args:
        model: a model with fake-quantized layers (``QuantizationCallback`` after warmup, or ``apply_plan``).
        example_inputs: one batch of ``model``'s positional inputs (its batch dimension becomes dynamic).
        output_dir: directory for the files (created if missing).
        calibration_inputs: more batches, used only for the few quantization points that the fake-quant
            model does not have (for instance the branches of a residual add).
        name: file name stem.
        packed: also write the packed low-bit weight file.
        onnx: also write an ONNX QDQ file (needs the ``onnx`` extra).

    Returns:
        ``ConversionResult`` with the paths, sizes and per-layer outcome.

    Raises:
        ValueError: ``model`` has no fake-quantized layer, none of its quantizers has seen data, or
            ``example_inputs`` is not a sequence of tensors.
    """
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
    if isinstance(example_inputs, torch.Tensor) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ValueError("`example_inputs` must be a tuple of tensors (the model's positional inputs), e.g. `(x,)`.")
    example_inputs = tuple(x.detach().cpu() for x in example_inputs)
    calibration = [tuple(x.detach().cpu() for x in batch) for batch in calibration_inputs]
    reference = _inference_copy(model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    graph = to_int8_graph(reference, example_inputs, calibration)
    scripted = script_int8(graph.graph_module)
    result = ConversionResult(
        int8_path=output_dir / f"{name}_int8.pt",
        int8_layers=sorted(graph.int8_layers),
        float_layers=dict(graph.float_layers),
    )
    with _StagedFiles() as files:
        int8_tmp = files.write(result.int8_path, lambda p: save_script(scripted, str(p)))
        loaded_out = _outputs(load_script(str(int8_tmp)), example_inputs)
        reference_out = _outputs(reference, example_inputs)
        if isinstance(loaded_out, torch.Tensor) and isinstance(reference_out, torch.Tensor):
            result.max_abs_diff = float((loaded_out - reference_out).abs().max())
        if packed:
            result.packed_path = output_dir / f"{name}_w{_lowest_bits(reference)}.packed.pt"
            files.write(result.packed_path, lambda p: save_packed_weights(reference, p))
        if onnx:
            from qat_lightning.convert.onnx_export import export_onnx_qdq

            result.onnx_path = output_dir / f"{name}_qdq.onnx"
            files.write(result.onnx_path, lambda p: export_onnx_qdq(reference, example_inputs, p))
    result.sizes.update(files.sizes)
    for path, size in result.sizes.items():
        log.info("qat-lightning convert: wrote %s (%.1f kB)", path, size / 1e3)
    return result


def compare_predictions(
    reference: Callable[..., torch.Tensor],
    candidate: Callable[..., torch.Tensor],
    batches: Iterable[tuple[Inputs, torch.Tensor | None]],
) -> Agreement:
    """How often ``candidate`` predicts the same class as ``reference`` (and both accuracies, given labels).

    Args:
        reference, candidate: callables mapping a batch's inputs to ``(N, classes)`` logits.
        batches: ``(inputs, labels)`` pairs; ``labels`` may be ``None``.
    """
    same = total = ref_correct = cand_correct = labelled = 0
    with torch.no_grad():
        for inputs, labels in batches:
            ref = reference(*inputs).argmax(dim=1)
            cand = candidate(*inputs).argmax(dim=1)
            same += int((ref == cand).sum())
            total += len(ref)
            if labels is not None:
                ref_correct += int((ref == labels).sum())
                cand_correct += int((cand == labels).sum())
                labelled += len(labels)
    if total == 0:
        raise ValueError("`batches` is empty: nothing to compare.")
    return Agreement(
        agreement=same / total,
        reference_accuracy=ref_correct / labelled if labelled else None,
        candidate_accuracy=cand_correct / labelled if labelled else None,
        samples=total,
    )
