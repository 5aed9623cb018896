"""Loading a local weights file into a model, with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, path: str | os.PathLike, prefix: str = "backbone.", hint: str = "") -> nn.Module:
    """Load the weights in ``path`` into ``model`` (in place, every key must match) and return ``model``.

    The file is either a plain state dict (``torch.save(model.state_dict(), path)``, torchvision's ``.pth``
    files) or a Lightning checkpoint of a module that holds ``model`` as the attribute named by ``prefix``
    (``ImageClassifier`` keeps it in ``backbone``), whose entries under ``prefix`` are used.

    Raises:
        FileNotFoundError: ``path`` does not exist (``hint`` is appended to the message).
        ValueError: the file's keys or shapes do not match ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file '{path}' not found. {hint}".rstrip())
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    source = "state dict"
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        checkpoint = state_dict["state_dict"]
        state_dict = {k.removeprefix(prefix): v for k, v in checkpoint.items() if k.startswith(prefix)}
        source = f"Lightning checkpoint (entries under '{prefix}')"
        if not state_dict:
            raise ValueError(
                f"'{path}' is a Lightning checkpoint without entries under '{prefix}' (its keys start with "
                f"{sorted({k.split('.')[0] for k in checkpoint})}); pass as `prefix` the attribute holding the model."
            )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # torch reports missing/unexpected keys and shape mismatches this way
        raise ValueError(
            f"The weights in '{path}' ({source}) do not fit {type(model).__name__}; build the model with the "
            f"settings the file was saved with (e.g. `num_classes`, `depth`, `width_mult`). {error}"
        ) from error
    log.info("Loaded %d tensors from '%s' into %s.", len(state_dict), path, type(model).__name__)
    return model
