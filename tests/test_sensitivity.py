"""Layer sensitivity report."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from qat_lightning.analysis import format_sensitivity, layer_sensitivity
from qat_lightning.quant import sqnr_db


def test_sqnr_db_matches_numpy():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=1000)
    noisy = ref + rng.normal(scale=0.1, size=1000)
    expected = 10 * np.log10((ref**2).sum() / ((ref - noisy) ** 2).sum())
    assert float(sqnr_db(torch.tensor(ref), torch.tensor(noisy))) == pytest.approx(expected)
    assert float(sqnr_db(torch.tensor(ref), torch.tensor(ref))) == math.inf


def test_sensitivity_ranks_the_layer_that_matters_most():
    torch.manual_seed(0)
    # layer "0" gets one input feature 100x larger than the others (its weights shrunk to match): a per-tensor
    # 2-bit input grid then rounds every other feature to zero, while layer "2" sees ordinary activations
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:, 0] /= 100.0
    x = torch.randn(256, 16)
    x[:, 0] *= 100.0
    y = model(x).argmax(1)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    results = layer_sensitivity(model, batches[:2], batches, bits=2)

    assert [r.name for r in results] == ["0", "2"]  # most sensitive (lowest SQNR) first
    assert results[0].sqnr_db < results[1].sqnr_db
    for r in results:
        # the labels are the float model's predictions, so the float accuracy is 1.0
        assert r.accuracy_drop == pytest.approx(1.0 - r.accuracy)
        assert 0.0 <= r.accuracy <= 1.0
    # the float model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
    text = format_sensitivity(results)
    assert text.splitlines()[0].split() == ["layer", "bits", "sqnr_db", "acc_%", "drop_pts"]
    assert text.splitlines()[1].split()[0] == "0"
