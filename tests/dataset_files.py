"""Small datasets written in the real on-disk formats torchvision reads (no download), for the tests."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as in the MNIST distribution: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, name: str = "MNIST", n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict:
    """Random 28x28 images and labels in ``<root>/<name>/raw/``; returns the arrays written, by split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / name / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / name / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 8, seed: int = 0) -> dict:
    """The python version of CIFAR-10 in ``<root>/cifar-10-batches-py/``: five training batches, a test batch
    (pickled dicts with ``data``, an ``(N, 3072)`` uint8 array of channel-major 32x32 images, and ``labels``)
    and ``batches.meta``. Returns ``{"train": (images, labels), "test": ...}`` with images ``(N, 32, 32, 3)``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": n_test}
    arrays: dict[str, list] = {"train": [], "test": []}
    for name, n in batches.items():
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": [""] * n}, f)
        arrays["test" if name == "test_batch" else "train"].append((data, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return {
        split: (
            np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            np.array([label for _, labels in parts for label in labels]),
        )
        for split, parts in arrays.items()
    }


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 2, size: int = 40, seed: int = 0
) -> None:
    """``<root>/{train,val}/<class>/<i>.png``: random RGB images of ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
