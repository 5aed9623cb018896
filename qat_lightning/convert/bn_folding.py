"""Folding BatchNorm into the convolution or linear layer that feeds it.

In eval mode ``BN(conv(x, w, b)) == conv(x, w', b')`` with, per output channel ``c``,

    ``factor[c] = gamma[c] / sqrt(running_var[c] + eps)``
    ``w'[c] = w[c] * factor[c]``
    ``b'[c] = (b[c] - running_mean[c]) * factor[c] + beta[c]``

The math is in pure functions; ``find_batchnorm_pairs`` reads the pairs off an exported graph (so it follows the
real data flow, not the module order) and ``fold_batchnorms`` applies them to a model in place.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from qat_lightning.nn.input_sharing import RoundsOutput, _rounding_class

# The aten ops of Conv1d/2d/3d and Linear in a ``torch.export`` graph.
LAYER_OPS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
}
_BATCHNORM_OPS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


def batchnorm_factor(bn: nn.Module) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (any of ``nn.normalization.BATCH_NORM_TYPES``),
    float32, shape ``(C,)``, detached."""
    if bn.running_var is None:
        raise ValueError(f"Cannot fold {type(bn).__name__} without running statistics (`track_running_stats=False`).")
    inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
    return inv_std * bn.weight.detach().float() if bn.affine else inv_std


def fold_batchnorm(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    factor: torch.Tensor,
    beta: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the layer that computes ``BN(layer(x))`` in one step.

    Args:
        weight: conv/linear weight, output channels on axis 0, shape ``(C, ...)``.
        bias: layer bias ``(C,)`` or ``None`` (zero).
        running_mean: BatchNorm running mean ``(C,)``.
        factor: ``gamma / sqrt(running_var + eps)`` (see ``batchnorm_factor``), ``(C,)``.
        beta: BatchNorm shift ``(C,)`` or ``None`` (zero, a non-affine BatchNorm).

    Returns:
        ``(weight * factor, (bias - running_mean) * factor + beta)``, float32.
    """
    if factor.shape != (weight.shape[0],):
        raise ValueError(
            f"BatchNorm has {factor.numel()} channels but the layer has {weight.shape[0]} output channels."
        )
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded_weight = weight.float() * factor.reshape(shape)
    b = torch.zeros_like(running_mean, dtype=torch.float32) if bias is None else bias.float()
    folded_bias = (b - running_mean.float()) * factor
    if beta is not None:
        folded_bias = folded_bias + beta.float()
    return folded_weight, folded_bias


def _module_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def find_batchnorm_pairs(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """``(layer_name, batchnorm_name)`` for every conv/linear call whose only user is a BatchNorm call.

    ``graph`` is the graph of ``torch.export.export(model, ...)``; names are those of ``model.named_modules()``.
    A module called more than once (shared weights) is never folded.
    """
    calls = Counter(_module_name(n) for n in graph.nodes if n.target in LAYER_OPS | _BATCHNORM_OPS)
    pairs = []
    for node in graph.nodes:
        if node.target not in LAYER_OPS or len(node.users) != 1:
            continue
        (user,) = node.users
        layer, bn = _module_name(node), _module_name(user)
        if user.target in _BATCHNORM_OPS and user.args[0] is node and layer and bn and calls[layer] == calls[bn] == 1:
            pairs.append((layer, bn))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@torch.no_grad()
def fold_batchnorms(model: nn.Module, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Fold each BatchNorm of ``pairs`` into its layer, in place, and replace it with ``nn.Identity`` (which rounds
    its output where the BatchNorm's output was rounded, see ``input_sharing``).

    The model must be in eval mode (running statistics are used). Returns each folded layer's ``factor``
    (see ``batchnorm_factor``) so that callers can move per-channel weight scales along.
    """
    factors = {}
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        factor = batchnorm_factor(bn)
        weight, bias = fold_batchnorm(
            layer.weight.detach(), layer.bias, bn.running_mean, factor, bn.bias if bn.affine else None
        )
        layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=False)
        _set_submodule(model, bn_name, _identity_like(bn))
        factors[layer_name] = factor
    return factors


def _identity_like(bn: nn.Module) -> nn.Module:
    """``nn.Identity`` in place of a folded BatchNorm, rounding its output as ``bn`` did (``RoundsOutput``)."""
    if not isinstance(bn, RoundsOutput):
        return nn.Identity()
    identity = _rounding_class(nn.Identity)()
    identity.round_output_with(bn.output_quantizer)
    return identity
