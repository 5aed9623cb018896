"""Tensors that int8 runtimes quantize although no layer reads them: residual-add operands and global-pool inputs.

Input sharing (``input_sharing``) rounds a tensor where it is made when layers read it. Two more tensors of a
CNN are stored as int8 codes by the int8 runtimes that are fastest on CPU (OpenVINO, NNCF's placement, oneDNN's
fused ``conv + sum`` kernels): the second operand of a residual add whose operands are both float (the output of
a downsample branch: a fused ``conv + sum`` kernel reads it as int8 codes), and the input of an average pool (the
pool then runs on codes). Left float, each costs a float kernel and a float copy of a feature map (OpenVINO on
ResNet-20, Xeon AMX, batch 64: 0.79x of NNCF's int8 model, 0.97x with both rounded). Rounding them in QAT too
keeps the artifacts computing what was trained:

- ``find_output_roundings(model, example_inputs)`` runs the (input-shared) model once and returns the modules
  whose output is such a tensor: for each element-wise add of two same-shape 4-d tensors of which none is rounded
  yet, every operand but the first (the one the runtime fuses the add into); and the input of each
  ``adaptive_avg_pool2d``/``avg_pool2d`` call. Only tensors read by that one op, made by a module called once
  (the first module that returned the tensor and is not a container, the model itself or a fake-quantized
  layer) and not changed in place since, are listed.
- ``round_outputs(model, names, config)`` rounds the output of each of those modules with a ``FakeQuantizer`` of
  its own (registered in ``model.output_quantizers``; its ``producer`` is the module's name).
- ``remove_output_roundings(model)`` undoes it; ``output_roundings_in_state_dict`` reads them from a checkpoint.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qat_lightning.nn.fake_quantized import FakeQuantizedLayer, _set_class, _unparametrized_class
from qat_lightning.nn.input_sharing import RoundsOutput, _fingerprint, _rounding_class, run_hooked
from qat_lightning.quant import FakeQuantizer, QuantizerConfig, activation_config

CONTAINER = "output_quantizers"
ROUNDING_BITS = 8
_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__}
_POOLS = {F.adaptive_avg_pool2d, F.avg_pool2d}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Trace(TorchFunctionMode):
    """Records, during one forward pass, every op's tensor reads, and the tensors the adds and pools read."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = False  # set while the module hooks compute their own fingerprints
        self.reads: collections.Counter[int] = collections.Counter()
        self.wanted: list[tuple[torch.Tensor, tuple[float, float], int]] = []  # (tensor, fingerprint, outputs seen)
        self.outputs: list[tuple[str, torch.Tensor, tuple[float, float]]] = []  # (module, output, fingerprint)
        self.rounded: set[int] = set()
        self.keep: list[Any] = []  # every tensor read stays alive, so that ``id``s are not reused

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self.quiet:  # the mode is off inside this method; ``quiet`` covers the module hooks
            return func(*args, **kwargs)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func in _ADDS and len(tensors) == 2 and tensors[0].dim() == 4 and tensors[0].shape == tensors[1].shape:
            if not any(id(t) in self.rounded for t in tensors):  # before the add: it may change ``tensors[0]``
                self.wanted.append((tensors[1], _fingerprint(tensors[1]), len(self.outputs)))
        elif func in _POOLS and tensors and tensors[0].dim() == 4:
            self.wanted.append((tensors[0], _fingerprint(tensors[0]), len(self.outputs)))
        result = func(*args, **kwargs)
        if isinstance(result, (torch.Tensor, tuple, list)):  # a computation, not a metadata query (``dim``)
            for t in tensors:
                if t is not result:  # an in-place op (``relu_``) does not read its result for anyone else
                    self.reads[id(t)] += 1
            self.keep.append(tensors)
        return result


@torch.no_grad()
def find_output_roundings(
    model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: Mapping[str, Any] | None = None
) -> list[str]:
    """Names of the modules whose output int8 runtimes quantize though no layer reads it (module docstring).

    Runs ``model(*example_inputs, **example_kwargs)`` once in eval mode (modes are restored; no observer updates).
    Call it after ``share_input_quantizers``: a tensor that sharing rounds already counts as rounded.
    """
    names = {module: name for name, module in model.named_modules()}
    calls: collections.Counter[str] = collections.Counter()
    trace = _Trace()

    def record_output(module: nn.Module, args: Any, output: Any) -> None:
        name = names[module]
        calls[name] += 1
        if isinstance(output, torch.Tensor):
            trace.quiet = True
            trace.outputs.append((name, output, _fingerprint(output)))
            if isinstance(module, RoundsOutput):
                trace.rounded.add(id(output))
            trace.quiet = False

    run_hooked(model, [m.register_forward_hook(record_output) for m in names], example_inputs, example_kwargs, trace)
    modules = dict(model.named_modules())
    found: list[str] = []
    for tensor, fingerprint, made_before in trace.wanted:
        if trace.reads[id(tensor)] != 1 or id(tensor) in trace.rounded:
            continue
        # The first module that returned the tensor (not changed in place since) and can round it.
        made = (n for n, t, f in trace.outputs[:made_before] if t is tensor and f == fingerprint)
        name = next((n for n in made if _can_round(n, modules[n], calls[n])), None)
        if name is not None and name not in found:
            found.append(name)
    return found


def _can_round(name: str, module: nn.Module, calls: int) -> bool:
    unfit = (*_CONTAINERS, FakeQuantizedLayer, FakeQuantizer, RoundsOutput)
    return bool(name) and calls == 1 and not isinstance(module, unfit)


def round_outputs(model: nn.Module, names: Iterable[str], config: QuantizerConfig | None = None) -> list[str]:
    """Round the output of each module of ``names`` with a ``FakeQuantizer(config)`` of its own; return the names.

    The quantizer is registered in ``model.output_quantizers`` (a ``ModuleDict``, key: the module name with ``/``
    for ``.``), so that ``model.train()``/``eval()`` reach it but a BatchNorm put in eval mode to freeze its
    statistics does not; the module holds it by reference (``RoundsOutput``) and its ``producer`` names the module.

    Args:
        model: a fake-quantized model.
        names: module names, e.g. from ``find_output_roundings``.
        config: a per-tensor config; default ``activation_config(ROUNDING_BITS)`` (8 bits, the runtimes' int8
            container: these tensors are added or averaged, never multiplied, so no narrower grid is needed).
    """
    config = config or activation_config(ROUNDING_BITS)
    names = list(names)
    if names and _container(model) is None:
        model.add_module(CONTAINER, nn.ModuleDict())
    for name in names:
        module = model.get_submodule(name)
        quantizer = FakeQuantizer(config)
        quantizer.producer = name
        quantizer.train(model.training)
        model.get_submodule(CONTAINER)[name.replace(".", "/")] = quantizer
        _set_class(module, _rounding_class(_unparametrized_class(module)))
        module.round_output_with(quantizer)  # type: ignore[operator]
    return names


def _container(model: nn.Module) -> nn.ModuleDict | None:
    """``model``'s child ``output_quantizers`` (``round_outputs`` adds it), or ``None``."""
    return dict(model.named_children()).get(CONTAINER)  # type: ignore[return-value]


def output_roundings(model: nn.Module) -> dict[str, FakeQuantizer]:
    """``{module name: quantizer}`` of the output roundings ``round_outputs`` gave ``model``."""
    container = _container(model)
    return {} if container is None else {q.producer: q for q in container.values()}  # type: ignore[misc]


def remove_output_roundings(model: nn.Module) -> None:
    """Undo ``round_outputs``: the modules get their class back and ``model.output_quantizers`` goes."""
    for name in output_roundings(model):
        module = model.get_submodule(name)
        del module.__dict__["output_quantizer"]
        _set_class(module, module.float_class)  # type: ignore[attr-defined]
    drop_output_quantizers(model)


def drop_output_quantizers(model: nn.Module) -> None:
    """Remove ``model.output_quantizers`` (if ``round_outputs`` added it); the modules keep their rounding classes
    and the quantizers they apply."""
    if _container(model) is not None:
        delattr(model, CONTAINER)


def output_roundings_in_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, QuantizerConfig]:
    """``{module name: config}`` of the output roundings a state dict was saved with (names relative to ``prefix``)."""
    start = f"{prefix}{CONTAINER}."
    return {
        extra["producer"]: QuantizerConfig(**extra["config"])
        for key, extra in state_dict.items()
        if key.startswith(start) and key.endswith("._extra_state") and key.count(".") == start.count(".") + 1
    }
