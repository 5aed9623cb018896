"""Datamodules over files written in each dataset's real on-disk format, loaded with ``download=False``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qat_lightning.data import CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule, MNISTDataModule
from tests.dataset_files import CIFAR10_CLASSES, write_cifar10, write_image_folder, write_mnist


def standardise(images_hwc: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> float ``(N, C, H, W)``, scaled to [0, 1] and standardised per channel."""
    x = images_hwc.astype(np.float64) / 255.0
    return ((x - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)


def stack(dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).numpy(), np.array(labels)


@pytest.mark.parametrize("datamodule_class", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_formats_load_from_idx_files(tmp_path, datamodule_class):
    written = write_mnist(tmp_path, name=datamodule_class.dataset_class.__name__, n_train=40, n_test=12)
    dm = datamodule_class(root=tmp_path, val_size=0, batch_size=5)
    dm.setup()

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = stack(dm.splits[split])
        expected = standardise(written[prefix][0][..., None], dm.mean, dm.std)
        np.testing.assert_allclose(images, expected, atol=1e-5)
        np.testing.assert_array_equal(labels, written[prefix][1])
    assert dm.splits["val"] is dm.splits["test"]  # val_size=0 validates on the test split
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_held_out_validation_split_is_disjoint_seeded_and_not_augmented(tmp_path):
    written = write_cifar10(tmp_path, per_batch=6, n_test=4)  # 30 training images
    dm = CIFAR10DataModule(root=tmp_path, val_size=7, verify_checksums=False, seed=3)
    dm.setup()

    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) == 23 and len(val) == 7
    assert sorted(train.indices + val.indices) == list(range(30))
    again = CIFAR10DataModule(root=tmp_path, val_size=7, verify_checksums=False, seed=3)
    again.setup()
    assert again.splits["val"].indices == val.indices
    # Validation images are the raw training images, only standardised (no crop, no flip).
    images, labels = stack(val)
    idx = np.array(val.indices)
    np.testing.assert_allclose(images, standardise(written["train"][0][idx], dm.mean, dm.std), atol=1e-5)
    np.testing.assert_array_equal(labels, written["train"][1][idx])


def test_cifar10_loads_pickled_batches(tmp_path):
    written = write_cifar10(tmp_path, per_batch=4, n_test=6)
    dm = CIFAR10DataModule(root=tmp_path, val_size=0, verify_checksums=False, batch_size=4)
    dm.setup()

    assert len(dm.splits["train"]) == 20
    assert dm.splits["test"].classes == CIFAR10_CLASSES
    images, labels = stack(dm.splits["test"])
    np.testing.assert_allclose(images, standardise(written["test"][0], dm.mean, dm.std), atol=1e-5)
    np.testing.assert_array_equal(labels, written["test"][1])
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_cifar10_training_images_are_padded_random_crops_with_flips(tmp_path):
    written = write_cifar10(tmp_path, per_batch=2, n_test=2)
    dm = CIFAR10DataModule(root=tmp_path, val_size=0, verify_checksums=False)
    dm.setup()
    raw = written["train"][0][0]  # (32, 32, 3) uint8
    padded = np.pad(raw, ((4, 4), (4, 4), (0, 0)))  # zero padding, as RandomCrop(padding=4)
    windows = {
        (dy, dx, flip): padded[dy : dy + 32, dx : dx + 32, :][:, :: -1 if flip else 1]
        for dy in range(9)
        for dx in range(9)
        for flip in (False, True)
    }
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        image = dm.splits["train"][0][0].numpy()
        pixels = np.rint((image.transpose(1, 2, 0) * dm.std + dm.mean) * 255).astype(np.uint8)
        matches = [key for key, window in windows.items() if np.array_equal(pixels, window)]
        assert len(matches) == 1, "every training image is one 32x32 window of the padded image, maybe flipped"
        seen.add(matches[0])
    assert len(seen) > 10 and {flip for *_, flip in seen} == {False, True}


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match="MD5 checksums.*data_batch_1.*verify_checksums=False"):
        CIFAR10DataModule(root=tmp_path).setup()


@pytest.mark.parametrize(
    ("datamodule_class", "missing"),
    [
        (MNISTDataModule, "MNIST/raw/train-images-idx3-ubyte"),
        (FashionMNISTDataModule, "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        (CIFAR10DataModule, "cifar-10-batches-py/test_batch"),
    ],
)
def test_missing_dataset_names_root_and_the_download_fix(tmp_path, datamodule_class, missing):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="download=True") as error:
        datamodule_class(root=root).setup()
    assert f"root='{root}'" in str(error.value) and missing in str(error.value)


def test_setup_without_prepare_data_explains_that_download_happens_there(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"call `prepare_data\(\)` before `setup\(\)`"):
        MNISTDataModule(root=tmp_path, download=True).setup()


def test_bad_arguments_are_rejected_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="`batch_size`"):
        MNISTDataModule(root=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="`val_size`"):
        MNISTDataModule(root=tmp_path, val_size=-1)
    with pytest.raises(ValueError, match="`num_workers`"):
        CIFAR10DataModule(root=tmp_path, num_workers=-2)
    write_mnist(tmp_path, n_train=10)
    with pytest.raises(ValueError, match="`val_size`=10 leaves no training images"):
        MNISTDataModule(root=tmp_path, val_size=10).setup()


def test_image_folder_labels_follow_sorted_class_folders_and_eval_crops_the_centre(tmp_path):
    write_image_folder(tmp_path, classes=("dog", "cat", "fish"), per_class=2, size=40)
    dm = ImageFolderDataModule(root=tmp_path, image_size=32, resize_size=36, batch_size=4)
    assert dm.num_classes == 3  # known before setup, from the training folders
    dm.setup()

    assert dm.classes == ["cat", "dog", "fish"]
    images, labels = stack(dm.splits["val"])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    path = tmp_path / "val" / "dog" / "1.png"
    resized = np.asarray(Image.open(path).convert("RGB").resize((36, 36), Image.BILINEAR))
    expected = standardise(resized[None, 2:34, 2:34], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))[0]
    np.testing.assert_allclose(images[3], expected, atol=1e-5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}
    assert dm.splits["test"] is dm.splits["val"]


def test_image_folder_rejects_splits_with_different_classes(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b"))
    (tmp_path / "val" / "b").rename(tmp_path / "val" / "c")
    with pytest.raises(ValueError, match=r"class folders .* differ .*\['b', 'c'\]"):
        ImageFolderDataModule(root=tmp_path).setup()


def test_image_folder_missing_split_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no train split folder .*<root>/<split>/<class>/<image>"):
        ImageFolderDataModule(root=tmp_path).setup()
    with pytest.raises(ValueError, match="`resize_size`=20 is smaller than `image_size`=32"):
        ImageFolderDataModule(root=tmp_path, image_size=32, resize_size=20)
