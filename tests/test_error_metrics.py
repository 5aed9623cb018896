"""Quantization error functions and the metric table, against NumPy/the csv module/theory."""

from __future__ import annotations

import csv
import io
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from qat_lightning.quant import choose_qparams, fake_quantize, max_abs_error, sqnr_db
from qat_lightning.report import MetricTable, figure_to_rgb


@pytest.mark.parametrize("shape", [(7,), (4, 3, 3, 3), (10, 20)])
def test_sqnr_and_max_abs_error_match_numpy(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(shape, generator=gen)
    approximation = reference + 0.05 * torch.randn(shape, generator=gen)
    r, a = reference.double().numpy(), approximation.double().numpy()
    expected_sqnr = 10 * np.log10(np.sum(r**2) / np.sum((r - a) ** 2))
    assert float(sqnr_db(reference, approximation)) == pytest.approx(expected_sqnr, rel=1e-12)
    assert float(max_abs_error(reference, approximation)) == pytest.approx(np.max(np.abs(r - a)), rel=1e-12)


def test_sqnr_limits() -> None:
    x = torch.randn(5)
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert max_abs_error(x, x.clone()) == 0


def test_uniform_grid_gains_about_six_db_per_bit() -> None:
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scale, zero_point = choose_qparams(x.min(), x.max(), 8, symmetric=True)
    sqnr8 = float(sqnr_db(x, fake_quantize(x, scale, zero_point, 8, symmetric=True)))
    scale, zero_point = choose_qparams(x.min(), x.max(), 4, symmetric=True)
    sqnr4 = float(sqnr_db(x, fake_quantize(x, scale, zero_point, 4, symmetric=True)))
    # Uniform data on a uniform grid: SQNR = 20*log10(levels) => 4 more bits add 20*log10(255/15) = 24.6 dB.
    assert sqnr8 - sqnr4 == pytest.approx(20 * math.log10(255 / 15), abs=0.2)


def test_error_functions_reject_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="same shape"):
        max_abs_error(torch.ones(3), torch.ones(3, 1))


COLUMNS = {
    None: {"acc": 0.97, "f1": 0.965},
    4: {"acc": 0.9, "f1": 0.88},
    2: {"acc": 0.125, "f1": 1 / 3},
}


def test_metric_table_orders_columns_and_writes_markdown_and_csv(tmp_path) -> None:
    table = MetricTable.from_columns(COLUMNS)
    assert table.bits == (2, 4, None)
    assert table.labels == ["2-bit", "4-bit", "fp32"]
    assert table.to_markdown().splitlines() == [
        "| metric | 2-bit | 4-bit | fp32 |",
        "|---|---:|---:|---:|",
        "| acc | 0.1250 | 0.9000 | 0.9700 |",
        "| f1 | 0.3333 | 0.8800 | 0.9650 |",
    ]
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0] == ["metric", "2-bit", "4-bit", "fp32"]
    parsed = {row[0]: [float(v) for v in row[1:]] for row in rows[1:]}
    assert parsed == {m: [COLUMNS[b][m] for b in (2, 4, None)] for m in ("acc", "f1")}

    paths = table.save(tmp_path / "out", "table")
    assert paths["md"].read_text() == table.to_markdown()
    assert paths["csv"].read_text() == table.to_csv()
    image = matplotlib.image.imread(paths["png"])
    assert image.shape[0] > 100 and image.shape[1] > 100
    rgb = figure_to_rgb(table.plot())
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3 and rgb.std() > 0


def test_metric_table_rejects_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="has metrics"):
        MetricTable.from_columns({4: {"acc": 0.5}, None: {"acc": 0.9, "f1": 0.8}})
    with pytest.raises(ValueError, match="2 values for 3 bit widths"):
        MetricTable((2, 4, None), {"acc": (0.1, 0.2)})
