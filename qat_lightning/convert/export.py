"""Capturing a model with ``torch.export``: a dynamic batch dimension where the model allows it, clear errors."""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model's ``forward`` cannot be captured by ``torch.export``; the message names the reason and the fix."""


def with_batch_of_two(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Export specialises a batch of 1; repeat such inputs so the batch dimension can stay symbolic."""
    return tuple(x.repeat(2, *([1] * (x.dim() - 1))) if x.dim() and len(x) == 1 else x for x in example_inputs)


def _batch_shapes(example_inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if x.dim() else None for x in example_inputs)


def export_program(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export.export(model, example_inputs)`` with a dynamic batch dimension (static if the model needs it).

    Raises:
        ExportError: the model cannot be exported at all; the message has export's reason and what to change.
    """
    example_inputs = tuple(example_inputs)
    doubled = with_batch_of_two(example_inputs)
    try:
        return torch.export.export(model, doubled, dynamic_shapes=_batch_shapes(doubled))
    except Exception as dynamic_error:  # noqa: BLE001 - retried with static shapes below
        log.debug("dynamic-batch export failed: %s", dynamic_error)
        try:
            program = torch.export.export(model, example_inputs)
        except Exception as error:  # noqa: BLE001 - any capture failure gets the same explanation
            raise ExportError(
                f"`torch.export` cannot capture {type(model).__name__}.forward, so it cannot be converted: "
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}. "
                "Fix: make `forward` exportable (no data-dependent Python control flow, `.item()` or "
                "`.tolist()` on tensors, or non-tensor outputs; see https://pytorch.org/docs/stable/export.html), "
                "or set `example_input_array` to the inputs it takes. The trained model and its checkpoints are "
                "unchanged."
            ) from error
        rank_zero_warn(
            f"{type(model).__name__} exports only with a fixed batch of {len(example_inputs[0])} "
            f"(the batch dimension could not stay dynamic: {str(dynamic_error).strip().splitlines()[0]}); "
            "the converted files take that batch size only."
        )
        return program
