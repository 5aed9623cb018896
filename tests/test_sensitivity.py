"""Layer sensitivity report."""

import copy
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


def test_sensitivity_reestimates_batch_norm_after_calibrating_as_ptq_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 16)
    with torch.no_grad():  # the float model's statistics fit its own activations, as after training
        h = model[0](x)
        model[1].running_mean.copy_(h.mean(0))
        model[1].running_var.copy_(h.var(0))
    model.eval()
    y = model(x).argmax(1)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    calibration = batches[:2]

    kept = {r.name: r for r in layer_sensitivity(model, calibration, batches, bits=2, bn_reestimation=False)}
    reestimated = {r.name: r for r in layer_sensitivity(model, calibration, batches, bits=2)}

    # independently: quantize layer "0" alone, calibrate it, then set the BatchNorm statistics by hand to the
    # average of the per-batch mean and unbiased variance of its input over the calibration batches
    from qat_lightning.calibration import calibrate
    from qat_lightning.nn import apply_plan, plan_quantization

    candidate = copy.deepcopy(model)
    plan = plan_quantization(candidate, 2, first_last_bits=None, activation_observer="mse", learned_scale=False)
    apply_plan(candidate, [p for p in plan if p.name == "0"])
    calibrate(candidate, calibration, lambda batch, i: candidate(batch[0]), len(calibration))
    with torch.no_grad():
        reference = torch.cat([model(xb) for xb, _ in batches])
        float_statistics_sqnr = float(sqnr_db(reference, torch.cat([candidate(xb) for xb, _ in batches])))
        inputs = [candidate[0](xb) for xb, _ in calibration]
        candidate[1].running_mean.copy_(torch.stack([h.mean(0) for h in inputs]).mean(0))
        candidate[1].running_var.copy_(torch.stack([h.var(0, unbiased=True) for h in inputs]).mean(0))
        logits = torch.cat([candidate(xb) for xb, _ in batches])
    expected_accuracy = (logits.argmax(1) == y).float().mean().item()
    expected_sqnr = float(sqnr_db(reference, logits))

    assert reestimated["0"].accuracy == pytest.approx(expected_accuracy)
    assert reestimated["0"].sqnr_db == pytest.approx(expected_sqnr, rel=1e-4)
    assert kept["0"].sqnr_db == pytest.approx(float_statistics_sqnr, rel=1e-4)
    assert abs(reestimated["0"].sqnr_db - kept["0"].sqnr_db) > 0.1
