"""``ClassAgreement``: accuracy and model agreement on torchmetrics, checked against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qat_lightning.metrics import ClassAgreement, predicted_classes


def test_accuracy_over_batches_equals_numpy():
    torch.manual_seed(0)
    batches = [(torch.randn(n, 10), torch.randint(0, 10, (n,))) for n in (7, 32, 1)]
    metric = ClassAgreement()
    for logits, labels in batches:
        metric.update(logits, labels)
    logits = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    expected = (logits.argmax(axis=1) == labels).sum() / len(labels)
    assert 0 < expected < 1
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


def test_agreement_of_two_models_and_of_class_indices_equals_numpy():
    torch.manual_seed(1)
    reference = torch.randn(50, 4)
    candidate = reference + 0.7 * torch.randn(50, 4)  # mostly the same arg-max, not always
    metric = ClassAgreement()
    metric.update(candidate, reference)
    expected = np.mean(candidate.numpy().argmax(1) == reference.numpy().argmax(1))
    assert 0.5 < expected < 1
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)

    indices = ClassAgreement()
    indices.update(torch.tensor([0, 2, 2, 1]), torch.tensor([0, 2, 1, 1]))
    assert float(indices.compute()) == 0.75


def test_dense_predictions_count_every_position():
    torch.manual_seed(2)
    scores, labels = torch.randn(3, 5, 4, 6), torch.randint(0, 5, (3, 4, 6))
    metric = ClassAgreement()
    metric.update(scores, labels)
    assert float(metric.compute()) == pytest.approx(np.mean(scores.numpy().argmax(1) == labels.numpy()), abs=1e-12)
    assert int(metric.total) == 3 * 4 * 6


def test_nothing_compared_is_nan():
    with pytest.warns(UserWarning, match="before the ``update`` method"):
        assert math.isnan(float(ClassAgreement().compute()))


def test_shapes_that_cannot_be_compared_are_errors_with_the_shapes():
    with pytest.raises(ValueError, match=r"Predicted classes of shape \(4,\) cannot be compared with .* \(4, 2\)"):
        ClassAgreement().update(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"classes on dim 1, got a floating-point tensor of shape \(4,\)"):
        predicted_classes(torch.randn(4))
