"""``WeightNormalization``: train Conv/Linear layers weight-normalized, hand back plain weights at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from qat_lightning.nn.weight_norm import (
    WEIGHT_NORM_TYPES,
    apply_weight_norm,
    fold_weight_norm_state_dict,
    is_weight_normalized,
    remove_weight_norm,
)


class WeightNormalization(Callback):
    r"""Weight normalization (``w = g * v / ||v||``) during training, folded into plain weights at fit end.

    The weight-normalization write-up found that long float training grows weights and widens their range
    until post-training quantization fails, and that weight-normalized training quantizes far better.

    - ``setup`` (fit): ``torch.nn.utils.parametrizations.weight_norm`` is applied to every layer of
      ``layer_types`` whose name (as in ``model.named_modules()``) matches ``include`` and not ``exclude``. This
      runs before the optimizer is built, so it trains ``g`` and ``v``; ``QuantizationCallback`` later
      fake-quantizes the normalized weight and keeps the same Parameters.
    - ``on_fit_end`` (and on an exception): the normalization is folded into plain ``weight`` Parameters, so
      the trained, converted or exported model has no parametrization. Place this callback before any
      callback that converts the model at fit end, or call :func:`qat_lightning.nn.remove_weight_norm` first.
    - Checkpoints saved during training hold ``g`` and ``v``; the callback lets the folded model load them
      (e.g. ``trainer.test(ckpt_path="best")``). Without the callback use
      :func:`qat_lightning.nn.fold_weight_norm_state_dict` on the checkpoint's state dict.

    Args:
        include: glob patterns of layer names to normalize (default: all).
        exclude: glob patterns of layer names to leave alone.
        layer_types: layer classes to normalize (default: ``Conv1d/2d/3d`` and ``Linear``).
        dim: the dimension the norm keeps (0: one magnitude per output channel).
    """

    def __init__(
        self,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type[nn.Module]] = WEIGHT_NORM_TYPES,
        dim: int = 0,
    ) -> None:
        for name, patterns in (("include", include), ("exclude", exclude)):
            if isinstance(patterns, str):
                raise TypeError(f"`{name}` must be a sequence of glob patterns such as ['backbone.*'], got a string.")
        bad = [t for t in layer_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"`layer_types` must hold nn.Module subclasses such as nn.Conv2d, got {bad!r}.")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.layer_types = tuple(layer_types)
        self.dim = dim
        self.layers: list[str] = []
        self._hooked: set[int] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if id(pl_module) not in self._hooked:
            pl_module.register_load_state_dict_pre_hook(self._fold_checkpoint)
            self._hooked.add(id(pl_module))
        if stage != "fit":
            return
        added = apply_weight_norm(pl_module, self.include, self.exclude, self.layer_types, self.dim)
        self.layers = [name for name, m in pl_module.named_modules() if is_weight_normalized(m)]
        if not self.layers:
            raise ValueError(
                f"WeightNormalization found no layer of types {[t.__name__ for t in self.layer_types]} in "
                f"{type(pl_module).__name__} matching `include`={list(self.include)} and not "
                f"`exclude`={list(self.exclude)}; adjust the patterns (names as in `model.named_modules()`)."
            )
        rank_zero_info(f"WeightNormalization: weight-normalized {len(added)} layers (dim={self.dim}): {added}.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold(pl_module, "at fit end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fold(pl_module, "after an exception")

    def _fold(self, pl_module: pl.LightningModule, when: str) -> None:
        folded = remove_weight_norm(pl_module)
        if folded:
            rank_zero_info(f"WeightNormalization: folded the weight norm of {len(folded)} layers {when}.")

    def _fold_checkpoint(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        plain = [name for name, m in module.named_modules() if not is_weight_normalized(m)]
        fold_weight_norm_state_dict(state_dict, self.dim, [prefix + (f"{name}." if name else "") for name in plain])
