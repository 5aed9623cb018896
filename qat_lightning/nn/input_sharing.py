"""Layer inputs rounded where they are made, so that every consumer of a tensor sees the same integer values.

A fake-quantized layer rounds its input inside the layer. When that tensor also feeds something else (the skip
branch of a residual add, a concatenation, a second layer), the other consumer reads it in float. Int8 runtimes
store such a tensor once, quantized: NNCF and PT2E's shared quantization specs round it where it is produced,
every consumer reads the integer copy, and the runtime fuses the rounding into the kernel that produced it
(OpenVINO on ResNet-20, batch 64, Xeon AMX: 7.3 -> 5.3 ms). Sharing makes QAT compute exactly that, without the
user rewriting the model:

- ``find_input_producers(model, example_inputs)`` runs the model once (eval mode, no gradient) and returns, for
  each fake-quantized layer, the module whose output it reads, where that is unambiguous: the innermost module
  that returned that very tensor, both called exactly once, and the tensor not modified in place in between.
- ``share_input_quantizers(model, producers)`` applies the input quantizer of those layers at the output of their
  producer instead (its ``output_quantizer``, held by reference; the producer's class becomes a subclass that
  applies it, the technique of ``fake_quantized.py``). The layers that read one producer share the first one's
  quantizer (they need equal configs, else that producer is left alone) and take their input as it comes.
- ``unshare_input_quantizers(model)`` undoes it.

The quantizer records its producer (``FakeQuantizer.producer``, saved in its extra state), so a checkpoint
rebuilds the same structure (``plan_from_state_dict`` reads it into ``LayerPlan.input_from``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from qat_lightning.nn.fake_quantized import FakeQuantizedLayer, _set_class, _unparametrized_class, is_quantizable
from qat_lightning.quant import FakeQuantizer

log = logging.getLogger(__name__)


class RoundsOutput(nn.Module):
    """Marker base of a producer module whose output goes through ``output_quantizer`` (its class's mixin).

    The quantizer is held by reference, not as a child module: it is registered (and saved) once, as the
    ``input_quantizer`` of the layers that read the output, so state dicts and ``modules()`` hold it once.
    """

    float_class: ClassVar[type[nn.Module]]
    output_quantizer: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = super().forward(*args, **kwargs)
        rounding = self.__dict__.get("output_quantizer")  # absent in copies made by the class (a Sequential slice)
        return output if rounding is None else rounding(output)

    def round_output_with(self, rounding: nn.Module) -> None:
        """Apply ``rounding`` to the output from now on (held by reference, see the class docstring)."""
        self.__dict__["output_quantizer"] = rounding


@functools.cache
def _rounding_class(float_class: type[nn.Module]) -> type[nn.Module]:
    attrs: dict[str, Any] = {"float_class": float_class, "__module__": __name__}
    return type(f"OutputRounded{float_class.__name__}", (RoundsOutput, float_class), attrs)


def _fingerprint(x: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares (float64): tells whether a tensor was modified in place between two moments."""
    x = x.detach().double()
    return float(x.sum()), float((x * x).sum())


def run_hooked(
    model: nn.Module,
    handles: list[torch.utils.hooks.RemovableHandle],
    example_inputs: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
    context: contextlib.AbstractContextManager[Any] | None = None,
) -> None:
    """Run ``model(*example_inputs, **example_kwargs)`` once in eval mode, eagerly even if compiled (the hooks read
    tensors), inside ``context``; then remove ``handles`` and give every module its mode back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with context or contextlib.nullcontext(), torch.compiler.set_stance("force_eager"):
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def find_input_producers(
    model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``{layer: producer}``: the module whose output each quantizable or fake-quantized layer reads.

    Runs ``model(*example_inputs, **example_kwargs)`` once in eval mode (modes are restored; no observer updates),
    eagerly even where it is ``torch.compile``d.
    The producer is the last module that returned the layer's input tensor: the outermost of nested modules
    returning it, and the last of a chain of modules that pass it through (a ``Dropout`` in eval mode), so that the
    rounding happens after them in training too. A layer is left out when it runs more than once, when that module
    runs more than once or is the model itself, when its input is not a module's output (a functional op's
    result, the model input), or when that output was changed in place after the module returned it.
    """
    names = {module: name for name, module in model.named_modules()}
    calls: collections.Counter[str] = collections.Counter()
    outputs: list[tuple[str, torch.Tensor, tuple[float, float]]] = []
    inputs: dict[str, tuple[torch.Tensor, tuple[float, float], int]] = {}

    def record_output(module: nn.Module, args: Any, output: Any) -> None:
        name = names[module]
        calls[name] += 1
        if isinstance(output, torch.Tensor) and not isinstance(module, FakeQuantizer):
            outputs.append((name, output, _fingerprint(output)))

    def record_input(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):  # with the outputs made before it
            inputs[names[module]] = (args[0], _fingerprint(args[0]), len(outputs))

    handles = [m.register_forward_hook(record_output) for m in names]
    handles += [m.register_forward_pre_hook(record_input) for m in names if _is_layer(m)]
    run_hooked(model, handles, example_inputs, example_kwargs)
    producers = {}
    for layer, (tensor, fingerprint, made_before) in inputs.items():
        if calls[layer] != 1:
            continue
        # The last module that returned the tensor: the outermost of nested ones (their hooks fire inner first),
        # and the last of a chain of pass-throughs (a Dropout returns its input as is in eval mode only).
        last = next((entry for entry in reversed(outputs[:made_before]) if entry[1] is tensor), None)
        if last is not None and last[2] == fingerprint and last[0] not in ("", layer) and calls[last[0]] == 1:
            producers[layer] = last[0]
    return producers


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, FakeQuantizedLayer) or is_quantizable(module)


def share_input_quantizers(model: nn.Module, producers: Mapping[str, str]) -> dict[str, str]:
    """Apply each listed fake-quantized layer's input quantizer at the output of its producer; return what moved.

    Args:
        model: a fake-quantized model (``apply_plan``).
        producers: ``{layer: producer}`` module names, e.g. from ``find_input_producers``. The layers that read one
            producer share the quantizer of the first of them (in ``model.named_modules()`` order); a producer
            whose layers have different input configs (or a float input), or that is itself a fake-quantized
            layer, is skipped.
    """
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for layer in modules:
        if layer in producers:
            groups[producers[layer]].append(layer)
    shared = {}
    for producer, layers in groups.items():
        target = modules[producer]
        quantizers = [getattr(modules[name], "input_quantizer", None) for name in layers]
        if isinstance(target, (FakeQuantizedLayer, RoundsOutput)) or not all(
            isinstance(q, FakeQuantizer) and q.producer is None and q.config == quantizers[0].config for q in quantizers
        ):
            log.debug("inputs of %s stay quantized in each layer (read from %s)", layers, producer)
            continue
        owner = quantizers[0]
        owner.producer = producer
        for name in layers:
            modules[name].input_quantizer = owner
            shared[name] = producer
        _set_class(target, _rounding_class(_unparametrized_class(target)))
        target.round_output_with(owner)
    return shared


def rounded_producers(model: nn.Module) -> dict[str, RoundsOutput]:
    """``{name: module}`` of every module of ``model`` whose output is rounded by a shared input quantizer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoundsOutput)}


def unshare_input_quantizers(model: nn.Module) -> None:
    """Undo ``share_input_quantizers``: producers get their class back, each layer quantizes its own input again."""
    inputs = {id(getattr(m, "input_quantizer", None)) for m in model.modules()}
    for module in rounded_producers(model).values():
        if id(module.output_quantizer) not in inputs:  # no layer's: an ``output_rounding``, not a shared input
            continue
        del module.__dict__["output_quantizer"]
        _set_class(module, module.float_class)
    seen: set[int] = set()
    for module in model.modules():
        quantizer = getattr(module, "input_quantizer", None)
        if isinstance(quantizer, FakeQuantizer):
            if id(quantizer) in seen:
                module.input_quantizer = quantizer = copy.deepcopy(quantizer)
            seen.add(id(quantizer))
            quantizer.producer = None
