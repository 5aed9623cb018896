"""The public normalization classes stand in for torch's private bases: this fails when torch adds one."""

import inspect

import pytest
import torch
from torch import nn

from qat_lightning.calibration import reestimate_batch_norm
from qat_lightning.nn import freeze_batchnorm_stats
from qat_lightning.nn.normalization import BATCH_NORM_TYPES, INSTANCE_NORM_TYPES, NORMALIZATION_TYPES


def _public_subclasses(base: type) -> set[type]:
    return {cls for _, cls in inspect.getmembers(nn, inspect.isclass) if issubclass(cls, base) and cls is not base}


def test_every_public_batch_and_instance_norm_of_torch_is_listed():
    batchnorm = pytest.importorskip("torch.nn.modules.batchnorm")  # the private module: a rename fails below
    assert _public_subclasses(batchnorm._BatchNorm) == set(BATCH_NORM_TYPES)
    assert _public_subclasses(batchnorm._NormBase) == set(BATCH_NORM_TYPES) | set(INSTANCE_NORM_TYPES)
    assert {nn.LayerNorm, nn.GroupNorm} <= set(NORMALIZATION_TYPES)


def test_a_users_batchnorm_subclass_and_sync_batchnorm_are_batchnorms():
    class ScaledBatchNorm2d(nn.BatchNorm2d):  # as zoo code writes them (e.g. a BatchNorm fused with an activation)
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4))
    model.train()
    assert freeze_batchnorm_stats(model) == 2 and not model[1].training and not model[3].training
    model[1].momentum = 0.5
    batches = [torch.randn(2, 3, 5, 5) + 3]
    model.eval()
    # SyncBatchNorm runs its local statistics on CPU without a process group (one process)
    assert reestimate_batch_norm(model, batches, lambda batch, i: model(batch), 1) == 1
    assert model[1].momentum == 0.5 and int(model[1].num_batches_tracked) == 1
    with torch.no_grad():
        expected = model[0](batches[0]).mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected)
