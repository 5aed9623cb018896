"""From a trained fake-quant model to a graph of x86 int8 kernels (oneDNN), with the trained scales.

The pipeline reuses torchao's PT2E machinery for the parts it does well (graph capture, Q/DQ insertion,
pattern fusion into ``onednn.qconv_pointwise`` / ``qlinear_pointwise`` with fused ReLU and residual add) and
supplies the quantization parameters itself:

1. Every fake-quantized layer is read out as integer codes + per-channel scale (``IntegerLayer``), then turned
   back into a plain float layer whose weight sits exactly on its grid.
2. BatchNorm is folded into the layer before it; per-channel weight scales are multiplied by
   ``|gamma / sqrt(var + eps)|`` so that the folded weights keep the same integer codes.
3. The model is exported and annotated by torchao's ``X86InductorQuantizer``. Observers in front of a trained
   layer are replaced by the layer's trained input scale and zero point (also across max-pool/flatten, whose
   output shares the input's grid); weight observers get the folded per-channel scales. Observers at points
   the fake-quant model does not quantize are calibrated on example data where the int8 kernels need them
   (the branches of a residual add) and removed where only float layers or the output consume the tensor.
4. ``convert_pt2e`` + torch inductor's freezing passes fuse the Q/DQ graph into oneDNN int8 kernels, which
   requantize to the full ``0..255`` grid; a ``clamp`` on the uint8 codes in front of each kernel trained on a
   ``b < 8``-bit input grid narrows it back (``narrow_inputs``).

Layers that the int8 kernels cannot run (Conv1d/Conv3d, weights or inputs wider than 8 bits, float inputs)
stay float: their weights keep their trained grid values and their inputs keep their fake quantization, so
the result still computes what the trained model computed.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from qat_lightning.convert.bn_folding import LAYER_OPS, find_batchnorm_pairs, fold_batchnorms
from qat_lightning.convert.torchscript import ONEDNN_INT8_OPS
from qat_lightning.nn import FakeQuantizedLayer, fake_quantized_layers, restore_float_layer
from qat_lightning.quant import FakeQuantizer, quant_range

INT8_MAX_BITS = 8
INT8_LAYER_TYPES = (nn.Conv2d, nn.Linear)
# oneDNN's int8 kernels on AVX2 CPUs without VNNI add pairs of u8 x s8 products in 16 bits (vpmaddubsw).
_INT16_MAX = 2**15 - 1
_INT8_MIN, _INT8_MAX = quant_range(8, symmetric=True)
# Ops whose output is on the same grid as their input: their input observer is shared with their output.
_GRID_PRESERVING_OPS = {
    torch.ops.aten.max_pool1d.default,
    torch.ops.aten.max_pool2d.default,
    torch.ops.aten.max_pool3d.default,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
}


@dataclass(frozen=True)
class IntegerLayer:
    """The integer form of one trained layer: ``weight = codes * scale`` and its input's affine grid.

    Attributes:
        name: qualified module name.
        codes: integer weight codes, int32, shape of the weight.
        scale: per-output-channel weight scale, float32, shape ``(C,)``.
        bits: weight bit width.
        input_scale, input_zero_point, input_bits: the per-tensor asymmetric grid of the layer input,
            ``input = (q - zero_point) * scale`` with ``q`` in ``0..2**input_bits - 1``.
    """

    name: str
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    input_scale: float
    input_zero_point: int
    input_bits: int

    def weight(self) -> torch.Tensor:
        """``codes * scale`` (float32), exactly the weight the fake-quant layer used (after any fold)."""
        return self.codes.float() * self.scale.reshape((-1,) + (1,) * (self.codes.dim() - 1))

    def folded(self, factor: torch.Tensor) -> IntegerLayer:
        """The same layer after BatchNorm folding with per-channel ``factor`` (see ``batchnorm_factor``).

        Codes keep their magnitude (their sign flips where ``factor < 0``) and scales become
        ``scale * |factor|``, so ``folded.weight() == weight() * factor`` on the same grid. A code of -128 that
        flips to +128 at 8 bits is clamped to 127 (one step on one weight); channels with ``factor == 0``
        become zero.
        """
        sign = torch.sign(factor).to(torch.int32).reshape((-1,) + (1,) * (self.codes.dim() - 1))
        codes = torch.clamp(self.codes * sign, _INT8_MIN, _INT8_MAX) if self.bits == 8 else self.codes * sign
        scale = torch.where(factor == 0, self.scale, self.scale * factor.abs())
        return dataclasses.replace(self, codes=codes, scale=scale)


def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))


def may_saturate_without_vnni(layer: IntegerLayer) -> bool:
    """Whether two of the layer's largest input x weight products overflow 16 bits (possible on AVX2).

    True for 8-bit inputs with 8-bit weights; a 7-bit input grid (torch's ``reduce_range``) or 7-bit
    weights keep every pair within range.
    """
    return 2 * (2**layer.input_bits - 1) * 2 ** (layer.bits - 1) > _INT16_MAX


def int8_unsupported_reason(layer: FakeQuantizedLayer) -> str | None:
    """Why the int8 kernels cannot run ``layer`` (``None`` if they can)."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if not isinstance(layer, INT8_LAYER_TYPES):
        return f"{layer.float_class.__name__}: the x86 int8 path covers Conv2d and Linear"
    if wq.config.bits > INT8_MAX_BITS:
        return f"{wq.config.bits}-bit weights"
    if not isinstance(iq, FakeQuantizer):
        return "float inputs (no input quantizer)"
    if iq.config.bits > INT8_MAX_BITS:
        return f"{iq.config.bits}-bit inputs"
    if not (wq.calibrated and iq.calibrated):
        return "quantizers never saw data"
    if not (wq.config.symmetric and wq.config.per_channel) or iq.config.symmetric or iq.config.per_channel:
        return "a quantization scheme other than per-channel symmetric weights and per-tensor asymmetric inputs"
    return None


def integer_layer(name: str, layer: FakeQuantizedLayer) -> IntegerLayer:
    """Read the integer form of a fake-quantized layer (the grids its forward pass uses now).

    The codes are read off the fake-quantized weight itself, so they follow the fake-quant kernel's rounding
    (``x * (1 / scale)``) also where ``x / scale`` lands on a tie, as each channel's extreme weight does.
    """
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    scale = wq.scale.detach().float().clone()
    grid_weight = layer.quantized_weight().detach()
    codes = torch.round(grid_weight / scale.reshape((-1,) + (1,) * (grid_weight.dim() - 1))).to(torch.int32)
    return IntegerLayer(
        name=name,
        codes=codes,
        scale=scale,
        bits=wq.config.bits,
        input_scale=float(iq.scale),
        input_zero_point=int(iq.zero_point),
        input_bits=iq.config.bits,
    )


def _export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension (so the int8 model takes any batch size)."""
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)


def _with_batch_of_two(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Export specialises a batch of 1; repeat such inputs so the batch dimension stays symbolic."""
    return tuple(
        torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and len(x) == 1 else x for x in example_inputs
    )


class FrozenInputGrid(nn.Module):
    """A trained per-tensor input quantizer as plain ATen arithmetic (exportable, scriptable, same rounding).

    ``(clamp(round(x * (1 / scale)) + zero_point, qmin, qmax) - zero_point) * scale``, as the fused fake-quant
    kernel computes it; used for layers that stay float so that they still see their trained input grid.
    """

    def __init__(self, quantizer: FakeQuantizer) -> None:
        super().__init__()
        self.scale, self.zero_point = float(quantizer.scale), int(quantizer.zero_point)
        self.quant_min, self.quant_max = quant_range(quantizer.config.bits, quantizer.config.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x * (1.0 / self.scale)) + self.zero_point, self.quant_min, self.quant_max)
        return (q - self.zero_point) * self.scale


@dataclass
class FloatModel:
    """A float copy of a fake-quant model, ready for int8 export, and what it records about its layers."""

    model: nn.Module
    int8_layers: dict[str, IntegerLayer]
    float_layers: dict[str, str]  # name -> reason it stays float


@torch.no_grad()
def float_model_for_int8(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> FloatModel:
    """A deep copy of ``model`` with BatchNorm folded and every int8-able layer back to a plain float layer.

    Weights of int8 layers are ``codes * scale`` (exactly their grid values, after folding). Layers the
    int8 kernels cannot run stay float with their weight frozen on its grid and their input quantizer as
    ``FrozenInputGrid``.
    """
    float_model = copy.deepcopy(model).eval()
    int8_layers, float_layers = {}, {}
    for name, layer in list(fake_quantized_layers(float_model)):
        reason = int8_unsupported_reason(layer)
        if reason is None:
            int8_layers[name] = integer_layer(name, layer)
            restore_float_layer(layer)
        else:
            float_layers[name] = reason
            layer.weight = nn.Parameter(layer.quantized_weight().detach(), requires_grad=False)
            layer.weight_quantizer = nn.Identity()
            if isinstance(layer.input_quantizer, FakeQuantizer):
                layer.input_quantizer = FrozenInputGrid(layer.input_quantizer)
    pairs = find_batchnorm_pairs(_export(float_model, example_inputs).graph)
    factors = fold_batchnorms(float_model, pairs)
    for name, factor in factors.items():
        if name in int8_layers:
            int8_layers[name] = int8_layers[name].folded(factor)
    for name, layer in int8_layers.items():
        float_model.get_submodule(name).weight = nn.Parameter(layer.weight(), requires_grad=False)
    return FloatModel(float_model, int8_layers, float_layers)


# ---------------------------------------------------------------------------------------------- PT2E


def _quantizer(float_layer_names: Iterable[str]):  # type: ignore[no-untyped-def]
    """torchao's x86 quantizer with min/max observers (calibration only fills points we have no scale for)."""
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config()
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    config = dataclasses.replace(config, input_activation=act, output_activation=act)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    for name in float_layer_names:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _trained_qparams_observer(scale: torch.Tensor, zero_point: torch.Tensor, per_channel: bool) -> nn.Module:
    """An observer whose ``calculate_qparams`` returns trained parameters instead of observed ones."""
    from torchao.quantization.pt2e.observer import ObserverBase

    class TrainedQParams(ObserverBase):
        trained = True

        def __init__(self) -> None:
            super().__init__(dtype=torch.int8 if per_channel else torch.uint8)
            self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_affine
            self.ch_axis = 0
            self.quant_min, self.quant_max = quant_range(INT8_MAX_BITS, symmetric=per_channel)
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero_point", zero_point.detach().to(torch.int64).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            return self.scale, self.zero_point

    return TrainedQParams()


def _is_observer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    from torchao.quantization.pt2e.observer import ObserverBase

    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ObserverBase)


def _replace_observer(gm: torch.fx.GraphModule, old: nn.Module, new: nn.Module) -> None:
    """Swap ``old`` for ``new`` at every call site (torchao shares one observer between several edges)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and gm.get_submodule(node.target) is old:
            setattr(gm, node.target, new)


def _layer_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    nodes = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.target in LAYER_OPS and stack:
            nodes[next(reversed(stack.values()))[0]] = node
    return nodes


def assign_trained_qparams(gm: torch.fx.GraphModule, layers: dict[str, IntegerLayer]) -> list[str]:
    """Give the observers of a prepared PT2E graph the trained scales; return the layers left unannotated.

    Weight observers get the folded per-channel scales. The observer of each layer's input, and every
    observer upstream of it across grid-preserving ops (max-pool, flatten), gets the layer's input scale and
    zero point on the full 8-bit grid (``narrow_inputs`` then clamps to a ``b < 8``-bit grid).
    """
    nodes = _layer_nodes(gm)
    assigned: set[int] = set()
    missing = []
    for name, layer in layers.items():
        node = nodes.get(name)
        if node is None or not (_is_observer(gm, node.args[0]) and _is_observer(gm, node.args[1])):
            missing.append(name)
            continue
        weight_observer = _trained_qparams_observer(layer.scale, torch.zeros_like(layer.scale), per_channel=True)
        _replace_observer(gm, gm.get_submodule(node.args[1].target), weight_observer)
        current = node.args[0]
        while current.op != "placeholder":
            if _is_observer(gm, current):
                observer = gm.get_submodule(current.target)
                if id(observer) not in assigned:
                    scale, zp = torch.tensor(layer.input_scale), torch.tensor(layer.input_zero_point)
                    trained = _trained_qparams_observer(scale, zp, per_channel=False)
                    _replace_observer(gm, observer, trained)
                    assigned.add(id(trained))
            elif current.target not in _GRID_PRESERVING_OPS:
                break
            current = current.args[0]
    _drop_observers_feeding_only_float(gm, set(nodes.values()) - {nodes[n] for n in layers if n in nodes})
    return missing


def _drop_observers_feeding_only_float(gm: torch.fx.GraphModule, float_layer_nodes: set[torch.fx.Node]) -> None:
    """Keep float the tensors that feed only float layers or the output, as they are in the fake-quant model.

    The x86 quantizer quantizes e.g. every conv + ReLU output, whatever consumes it. An untrained observer
    is kept only if the data flow from it reaches a trained observer or an int8 layer without passing a
    float layer (for instance the residual branch of an add whose sum feeds int8 layers).
    """
    from torchao.quantization.pt2e.observer import PlaceholderObserver

    def reaches_int8(node: torch.fx.Node, seen: set[torch.fx.Node]) -> bool:
        for user in node.users:
            if user in seen or user in float_layer_nodes:
                continue
            seen.add(user)
            trained = _is_observer(gm, user) and getattr(gm.get_submodule(user.target), "trained", False)
            if trained or user.target in LAYER_OPS or reaches_int8(user, seen):
                return True
        return False

    for node in gm.graph.nodes:
        if not _is_observer(gm, node) or _is_observer(gm, node.args[0]):
            continue
        observer = gm.get_submodule(node.target)
        if not getattr(observer, "trained", False) and not reaches_int8(node, set()):
            _replace_observer(gm, observer, PlaceholderObserver(dtype=torch.float))


def split_reused_module_calls(graph: torch.fx.Graph) -> None:
    """Give each call of a module that runs more than once (torchvision's ``BasicBlock.relu``) its own name.

    Export tags the second call's ``nn_module_stack`` entry with the same module name; torchao's quantizer
    then merges both calls into one pattern and fails ("Input partition has more than one output node").
    Renaming ``relu`` to ``relu@1`` for the second call (export's own key for it) keeps them apart.
    """
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        key, (name, cls) = next(reversed(stack.items()))
        call = key.rpartition("@")[2]
        if "@" in key and call.isdigit():
            node.meta["nn_module_stack"] = {**stack, key: (f"{name}@{call}", cls)}


def lower_to_onednn(gm: torch.fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """Fuse a converted (Q/DQ) PT2E graph into oneDNN int8 kernels with prepacked weights.

    The same passes as torchao's ``lower_pt2e_quantized_to_x86`` (inductor's freezing patterns and constant
    folding, no code generation), keeping the batch dimension dynamic.
    """
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    exported = _export(gm, example_inputs)
    decompositions = {
        op: fn for op, fn in torch.export.default_decompositions().items() if torch._export.utils._is_cia_op(op)
    }
    lowered = exported.run_decompositions(decompositions).module()
    for node in lowered.graph.nodes:  # the fusion patterns expect permute, not t
        if node.target is torch.ops.aten.t.default:
            node.target, node.args = torch.ops.aten.permute.default, (node.args[0], [1, 0])
    lowered.recompile()
    freezing_passes(lowered, example_inputs)
    constant_fold(lowered)
    for node in list(lowered.graph.nodes):
        if node.target is torch.ops.aten.view.default:  # oneDNN returns channels-last tensors: `view` may fail
            node.target = torch.ops.aten.reshape.default
        elif node.target is torch.ops.aten.max_pool2d_with_indices.default and _only_first_output_used(node):
            (getitem,) = node.users  # indices are never used: plain max_pool2d skips computing them
            node.target = torch.ops.aten.max_pool2d.default
            getitem.replace_all_uses_with(node)
            lowered.graph.erase_node(getitem)
    lowered.recompile()
    return lowered


def _only_first_output_used(node: torch.fx.Node) -> bool:
    return len(node.users) == 1 and all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def pool_on_codes(lowered: torch.fx.GraphModule) -> None:
    """Run max-pool and reshapes between a dequantize and a quantize with the same grid on the uint8 codes.

    ``quantize(max_pool(dequantize(q)))`` equals ``max_pool(q)`` (quantizing is monotone and round-trips
    exactly on its grid), so the two float passes and the float tensor in between are dropped.
    """
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    on_codes = {torch.ops.aten.max_pool2d.default, torch.ops.aten.reshape.default}
    graph = lowered.graph
    for node in list(graph.nodes):
        if node.target is not quantize or tuple(node.args[3:5]) != (0, 255):
            continue
        chain, current = [], node.args[0]
        while isinstance(current, torch.fx.Node) and current.target in on_codes and len(current.users) == 1:
            chain.append(current)
            current = current.args[0]
        if not chain or current.target is not dequantize or len(current.users) != 1:
            continue
        if tuple(current.args[1:5]) != tuple(node.args[1:5]):
            continue
        chain[-1].args = (current.args[0], *chain[-1].args[1:])
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        graph.erase_node(current)
    lowered.recompile()


def narrow_inputs(lowered: torch.fx.GraphModule, layers: dict[str, IntegerLayer]) -> None:
    """Clamp the uint8 input of each int8 kernel whose layer was trained on a ``b < 8``-bit input grid.

    The graph quantizes with the trained scale and zero point on ``0..255``; ``clamp(q, 0, 2**b - 1)`` on the
    codes is then exactly the b-bit quantization (quantizing is monotone). Kernels are matched to layers by
    their input scale and zero point, which are the trained ones.
    """
    narrow = {
        (layer.input_scale, layer.input_zero_point): 2**layer.input_bits - 1
        for layer in layers.values()
        if layer.input_bits < INT8_MAX_BITS
    }
    graph = lowered.graph
    for node in list(graph.nodes):
        grid = (node.args[1], node.args[2]) if node.target in ONEDNN_INT8_OPS else None
        if grid not in narrow:
            continue
        with graph.inserting_before(node):
            clamped = graph.call_function(torch.ops.aten.clamp.default, (node.args[0], 0, narrow[grid]))
        node.args = (clamped, *node.args[1:])
    lowered.recompile()


@dataclass
class Int8Graph:
    """The lowered int8 graph and the bookkeeping the caller reports."""

    graph_module: torch.fx.GraphModule
    int8_layers: dict[str, IntegerLayer]
    float_layers: dict[str, str]


def to_int8_graph(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    calibration_inputs: Iterable[Sequence[torch.Tensor]] = (),
) -> Int8Graph:
    """Convert a trained fake-quant ``model`` (left untouched) into a graph of oneDNN int8 kernels.

    Args:
        model: a model prepared by ``QuantizationCallback``/``apply_plan`` (fake-quantized layers in place).
        example_inputs: one batch of the model's positional inputs; its batch dimension becomes dynamic.
        calibration_inputs: more batches for the few observers that have no trained counterpart (e.g. the
            two branches of a residual add); ``example_inputs`` is always used.

    Returns:
        ``Int8Graph``: a runnable ``torch.fx.GraphModule`` (float in, float out) plus which layers run in int8.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example_inputs = _with_batch_of_two(tuple(example_inputs))
    prepared_float = float_model_for_int8(model, example_inputs)
    float_names = [
        name
        for name, module in prepared_float.model.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and name not in prepared_float.int8_layers
    ]
    exported = _export(prepared_float.model, example_inputs).module()
    split_reused_module_calls(exported.graph)
    prepared = prepare_pt2e(exported, _quantizer(float_names))
    for name in assign_trained_qparams(prepared, prepared_float.int8_layers):
        prepared_float.float_layers[name] = "the x86 quantizer does not annotate it; its input stays float"
        prepared_float.int8_layers.pop(name)
    with torch.no_grad():
        prepared(*example_inputs)
        for batch in calibration_inputs:
            prepared(*batch)
    converted = convert_pt2e(prepared)
    lowered = lower_to_onednn(converted, example_inputs)
    pool_on_codes(lowered)
    narrow_inputs(lowered, prepared_float.int8_layers)
    for name, reason in prepared_float.float_layers.items():
        rank_zero_warn(f"int8 conversion: layer `{name}` stays float ({reason}); it keeps its trained grid values.")
    saturating = [name for name, layer in prepared_float.int8_layers.items() if may_saturate_without_vnni(layer)]
    if saturating and not cpu_has_int8_dot_product():
        rank_zero_warn(
            "int8 conversion: this CPU has no VNNI/AMX, so oneDNN adds pairs of int8 products in 16 bits, which may "
            f"saturate for 8-bit inputs x 8-bit weights ({len(saturating)} layers, e.g. `{saturating[0]}`): here "
            "the int8 model may deviate from the fake-quant model (it is exact on CPUs with VNNI/AMX). For "
            "bit-exact results on such CPUs train with `activation_bits=7` (torch's `reduce_range`) or 7-bit weights."
        )
    return Int8Graph(lowered, prepared_float.int8_layers, prepared_float.float_layers)
