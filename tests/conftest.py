"""Shared test helpers: an independent NumPy reference of the quantization math and tiny-Trainer settings.

The reference is written from the conventions in ``qat_lightning/quant/primitives.py``'s module docstring,
in float32 NumPy, without calling any torch quantization code.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

EPS = np.finfo(np.float32).eps

# The test models are tiny: one thread is faster, and several stall badly when the cores are shared.
torch.set_num_threads(1)


def np_quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Signed grid ``[-2**(b-1), 2**(b-1)-1]`` when symmetric, else unsigned ``[0, 2**b-1]``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def np_min_max(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``x``: scalars, or one per slice along ``axis``."""
    if axis is None:
        return np.float32(x.min()), np.float32(x.max())
    rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    return rows.min(axis=1), rows.max(axis=1)


def np_choose_qparams(min_val, max_val, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32, >= EPS) and zero point (int32) for the range ``[min_val, max_val]`` widened to hold 0."""
    qmin, qmax = np_quant_range(bits, symmetric)
    min_neg = np.minimum(np.asarray(min_val, dtype=np.float32), np.float32(0))
    max_pos = np.maximum(np.asarray(max_val, dtype=np.float32), np.float32(0))
    if symmetric:
        max_abs = np.maximum(-min_neg, max_pos)
        scale = np.maximum(max_abs / np.float32((qmax - qmin) / 2), EPS).astype(np.float32)
        return scale, np.zeros(scale.shape, dtype=np.int32)
    scale = np.maximum((max_pos - min_neg) / np.float32(qmax - qmin), EPS).astype(np.float32)
    zero_point = np.clip(qmin - np.round(min_neg / scale), qmin, qmax).astype(np.int32)
    return scale, zero_point


def _along(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def np_quantize(x, scale, zero_point, bits: int, symmetric: bool, axis: int | None = None) -> np.ndarray:
    """``clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` as int64, with ``x / scale`` computed as
    ``x * (1 / scale)`` in float32 (the convention of PyTorch's quantization kernels, which decides ties)."""
    qmin, qmax = np_quant_range(bits, symmetric)
    inv_scale = np.float32(1.0) / _along(scale, x.ndim, axis).astype(np.float32)
    z = _along(zero_point, x.ndim, axis).astype(np.int64)
    return np.clip(np.round(x.astype(np.float32) * inv_scale).astype(np.float64) + z, qmin, qmax).astype(np.int64)


def np_dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale`` in float32."""
    s = _along(scale, q.ndim, axis).astype(np.float32)
    z = _along(zero_point, q.ndim, axis).astype(np.int64)
    return (q.astype(np.int64) - z).astype(np.float32) * s


def np_fake_quantize(x, scale, zero_point, bits: int, symmetric: bool, axis: int | None = None) -> np.ndarray:
    return np_dequantize(np_quantize(x, scale, zero_point, bits, symmetric, axis), scale, zero_point, axis)


def assert_fake_quant_equal(actual, x, scale, zero_point, bits: int, symmetric: bool, axis: int | None = None):
    """``actual`` equals the NumPy fake quantization of ``x`` bit for bit; returns the NumPy result."""
    expected = np_fake_quantize(x, scale, zero_point, bits, symmetric, axis)
    np.testing.assert_array_equal(np.asarray(actual, dtype=np.float32), expected)
    return expected


@pytest.fixture
def np_ref() -> SimpleNamespace:
    """The NumPy reference functions above, for tests in any file."""
    return SimpleNamespace(
        quant_range=np_quant_range,
        min_max=np_min_max,
        choose_qparams=np_choose_qparams,
        quantize=np_quantize,
        dequantize=np_dequantize,
        fake_quantize=np_fake_quantize,
        assert_fake_quant_equal=assert_fake_quant_equal,
    )


@pytest.fixture
def trainer_kwargs(tmp_path) -> dict:
    """A quiet, CPU-only, short Trainer configuration writing only under ``tmp_path``."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
    )


@pytest.fixture
def lightning_caplog(caplog, monkeypatch):
    """``caplog`` that also sees Lightning's ``rank_zero_info`` records (its logger may not propagate)."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    return caplog


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` where no CUDA GPU is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
