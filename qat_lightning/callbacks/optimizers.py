"""Adding parameters created mid-training (learned quantizer scales) to the optimizers already running."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def add_new_parameters_to_optimizers(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    module: nn.Module,
) -> int:
    """Add ``module``'s trainable parameters that no optimizer holds yet to every optimizer, as a new group.

    The group copies the first group's hyper-parameters and current learning rate, with no weight decay
    (scales must not be pulled towards 0); each scheduler of that optimizer gets the first group's base
    learning rate for it, so the new group follows the same schedule. Returns how many parameters were added.
    """
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    new = [p for p in module.parameters() if p.requires_grad and id(p) not in held]
    if not new:
        return 0
    for optimizer in optimizers:
        first = optimizer.param_groups[0]
        group = {k: v for k, v in first.items() if k != "params"}
        group.update(params=new, weight_decay=0.0)
        optimizer.add_param_group(group)
        for scheduler in schedulers:
            if scheduler.optimizer is optimizer:
                scheduler.base_lrs.append(first.get("initial_lr", first["lr"]))
    return len(new)
