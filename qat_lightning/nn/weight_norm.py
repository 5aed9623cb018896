"""Weight normalization of Conv/Linear layers, and folding it back into plain weights (in place).

``apply_weight_norm`` uses ``torch.nn.utils.parametrizations.weight_norm``: ``weight = g * v / ||v||`` with the
norm over every dimension but ``dim`` (the output channels by default), trained through the Parameters
``parametrizations.weight.original0`` (``g``) and ``original1`` (``v``). Folding computes the weight once and
stores it as a plain ``weight`` Parameter, so the model has no parametrization left. Both work on float and on
fake-quantized layers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

WEIGHT_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_G_KEY = "parametrizations.weight.original0"
_V_KEY = "parametrizations.weight.original1"
# The parametrization class ``weight_norm`` registers, found through the public function (torch's class is private).
_WEIGHT_NORM_CLASS = type(weight_norm(nn.Linear(1, 1)).parametrizations.weight[0])


def is_weight_normalized(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed by a weight-norm parametrization."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, _WEIGHT_NORM_CLASS) for p in module.parametrizations.weight
    )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_weight_norm(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    layer_types: Sequence[type[nn.Module]] = WEIGHT_NORM_TYPES,
    dim: int = 0,
) -> list[str]:
    """Weight-normalize, in place, every layer of ``layer_types`` whose name matches ``include`` and not ``exclude``.

    Args:
        model: the model; layers already weight-normalized are left as they are.
        include, exclude: glob patterns over names from ``model.named_modules()`` (the root module is ``""``).
        layer_types: the layer classes (and their subclasses) to normalize.
        dim: the dimension kept by the norm (0: one magnitude ``g`` per output channel).

    Returns:
        The names of the layers normalized by this call. The layers' ``weight`` Parameters are replaced by
        ``g`` and ``v``: build optimizers after this call.
    """
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, tuple(layer_types))
        and _matches(name, include)
        and not _matches(name, exclude)
        and not is_weight_normalized(module)
    ]
    for _, module in selected:
        weight_norm(module, "weight", dim=dim)
    return [name for name, _ in selected]


def remove_weight_norm(model: nn.Module) -> list[str]:
    """Fold weight normalization into plain ``weight`` Parameters, in place; return the names of the layers.

    The weights keep their values (``g * v / ||v||``, computed once). Each folded layer gets a new ``weight``
    Parameter that no existing optimizer holds. Calling it on a model without weight norm does nothing.
    """
    folded = [(name, module) for name, module in model.named_modules() if is_weight_normalized(module)]
    for _, module in folded:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return [name for name, _ in folded]


def fold_weight_norm_state_dict(
    state_dict: dict[str, Any], dim: int = 0, layers: Iterable[str] | None = None
) -> list[str]:
    """Replace, in place, each layer's ``parametrizations.weight.original0/1`` entries by its ``weight``.

    Makes a checkpoint saved during weight-normalized training loadable into the same model without weight
    norm (``weight = g * v / ||v||``, the parametrization's own formula, so values are bit-identical).

    Args:
        state_dict: a model's state dict (e.g. ``checkpoint["state_dict"]``).
        dim: the ``dim`` the weight norm was applied with.
        layers: key prefixes of the layers to fold (e.g. ``"backbone.features.0."``); ``None`` folds all.

    Returns:
        The key prefixes of the layers folded.
    """
    found = [key[: -len(_G_KEY)] for key in state_dict if key.endswith(_G_KEY)]
    wanted = None if layers is None else set(layers)
    found = [p for p in found if p + _V_KEY in state_dict and (wanted is None or p in wanted)]
    for layer in found:
        g = state_dict.pop(layer + _G_KEY)
        v = state_dict.pop(layer + _V_KEY)
        state_dict[layer + "weight"] = _normalized_weight(g, v, dim)
    return found


@torch.no_grad()
def _normalized_weight(g: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``g * v / ||v||`` (norm over every dimension but ``dim``), computed by the weight-norm parametrization
    itself on a holder of ``v``'s shape, so the values are those training saw, bit for bit."""
    holder = nn.Module()
    holder.weight = nn.Parameter(v.clone())
    weight_norm(holder, dim=dim)
    holder.parametrizations.weight.original0.copy_(g)
    return holder.weight.detach()
