"""Keeping learned quantizer scales in an optimizer group of their own, in every run and every resume."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def give_parameters_own_group(
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler],
    params: Sequence[nn.Parameter],
) -> bool:
    """Put ``params`` (e.g. LSQ scales) in one last parameter group of each optimizer; return if anything moved.

    Scales created after the optimizer (fake quant inserted mid-training) are added; scales that an optimizer
    already holds in its other groups (the model was prepared before ``configure_optimizers``, as when
    resuming) are moved out of them, so the groups, and so the checkpointed optimizer state, have the same
    layout either way. The new group copies the first group's hyper-parameters and current learning rate
    with no weight decay (scales must not be pulled towards 0); each scheduler of that optimizer gets the
    first group's base learning rate for it, so the new group follows the same schedule.
    """
    ids = [id(p) for p in params]
    if not ids:
        return False
    changed = False
    for optimizer in optimizers:
        if [id(p) for p in optimizer.param_groups[-1]["params"]] == ids:
            continue
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in set(ids)]
        first = optimizer.param_groups[0]
        group = {k: v for k, v in first.items() if k != "params"}
        group.update(params=list(params), weight_decay=0.0)
        optimizer.add_param_group(group)
        for scheduler in schedulers:
            if scheduler.optimizer is optimizer:
                scheduler.base_lrs.append(first.get("initial_lr", first["lr"]))
        changed = True
    return changed
