"""``DigitsDataModule``: a seeded partition of scikit-learn's digits, standardised with training statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from qat_lightning import DigitsDataModule, SmallCNN

IMAGES, LABELS = load_digits(return_X_y=True)  # (1797, 64) pixels 0..16, (1797,) labels


def _setup(**kwargs) -> DigitsDataModule:
    data = DigitsDataModule(**kwargs)
    data.setup("fit")
    return data


def _raw_splits(data: DigitsDataModule) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, float]:
    """Undo the standardisation without knowing its parameters: the training pixels span exactly 0..16."""
    z = {name: split.tensors[0].numpy().reshape(-1, 64).astype(np.float64) for name, split in data.splits.items()}
    std = 16.0 / (z["train"].max() - z["train"].min())
    mean = -z["train"].min() * std
    raw = {name: values * std + mean for name, values in z.items()}
    labels = {name: split.tensors[1].numpy() for name, split in data.splits.items()}
    return raw, labels, mean, std


@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.15, 0.15), (0.1, 0.25)])
def test_split_sizes(val_fraction, test_fraction):
    data = _setup(val_fraction=val_fraction, test_fraction=test_fraction)
    n = len(LABELS)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    assert len(data.splits["val"]) == n_val
    assert len(data.splits["test"]) == n_test
    assert len(data.splits["train"]) == n - n_val - n_test
    x, y = data.splits["train"].tensors
    assert x.shape == (n - n_val - n_test, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_splits_partition_the_dataset_and_use_train_statistics():
    data = _setup()
    raw, labels, mean, std = _raw_splits(data)
    for name, values in raw.items():  # an affine map of integer pixels 0..16 for every split
        np.testing.assert_allclose(values, np.round(values), atol=1e-3, err_msg=name)
        assert values.min() >= -1e-3 and values.max() <= 16 + 1e-3
    # The map is the training split's own mean and (unbiased) standard deviation, not the whole data's.
    assert mean == pytest.approx(raw["train"].mean(), rel=1e-5)
    assert std == pytest.approx(np.round(raw["train"]).std(ddof=1), rel=1e-5)
    assert abs(mean - IMAGES.mean()) > 100 * abs(mean - np.round(raw["train"]).mean())
    z_train = data.splits["train"].tensors[0]
    assert z_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z_train.std().item() == pytest.approx(1.0, abs=1e-5)

    # Every image (all 1,797 are distinct) lands in exactly one split, with its own label.
    dataset = {tuple(row): label for row, label in zip(IMAGES.astype(int), LABELS, strict=True)}
    assert len(dataset) == len(LABELS)
    seen: dict[tuple, str] = {}
    for name, values in raw.items():
        for row, label in zip(np.round(values).astype(int), labels[name], strict=True):
            key = tuple(row)
            assert key not in seen, f"image in both {seen[key]} and {name}"
            assert dataset[key] == label
            seen[key] = name
    assert len(seen) == len(dataset)


def test_seeded_split_is_reproducible():
    torch.manual_seed(123)
    first = _setup(seed=7)
    torch.manual_seed(456)  # the global RNG does not matter
    second = _setup(seed=7)
    other = _setup(seed=8)
    for name in ("train", "val", "test"):
        for a, b in zip(first.splits[name].tensors, second.splits[name].tensors, strict=True):
            assert torch.equal(a, b), name
    assert not torch.equal(first.splits["val"].tensors[1], other.splits["val"].tensors[1])


def test_loaders():
    data = _setup(batch_size=50)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    val_x = torch.cat([batch[0] for batch in data.val_dataloader()])
    assert torch.equal(val_x, data.splits["val"].tensors[0])  # evaluation order is fixed
    test_y = torch.cat([batch[1] for batch in data.test_dataloader()])
    assert torch.equal(test_y, data.splits["test"].tensors[1])
    assert SmallCNN()(x).shape == (50, 10)
    data.setup("test")  # a second setup keeps the same split objects
    assert data.splits["val"].tensors[0] is data.val_dataloader().dataset.tensors[0]


@pytest.mark.parametrize("name", ["val_fraction", "test_fraction"])
@pytest.mark.parametrize("value", [0.0, 0.5, -0.1, 0.7])
def test_bad_fractions(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be in \(0, 0\.5\), got {value}"):
        DigitsDataModule(**{name: value})


def test_bad_batch_size():
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive integer, got 0"):
        DigitsDataModule(batch_size=0)


def test_small_cnn_rejects_input_size():
    with pytest.raises(ValueError, match=r"`input_size` must be divisible by 4"):
        SmallCNN(input_size=10)
