"""The metric-per-bit-width table: rows are metrics, columns bit widths (float last), as Markdown, CSV or a plot."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FLOAT_BITS = 32  # where the float column sits on the plot's bit axis


def bit_width_label(bits: int | None) -> str:
    """``"4-bit"`` for 4, ``"fp32"`` for ``None`` (float)."""
    return "fp32" if bits is None else f"{bits}-bit"


@dataclass(frozen=True)
class MetricTable:
    """Values of several metrics at several bit widths.

    Args:
        bits: the columns: bit widths in increasing order, ``None`` (float) last.
        values: metric name -> one value per column (e.g. accuracy as a fraction in [0, 1]).
    """

    bits: tuple[int | None, ...]
    values: Mapping[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        for metric, row in self.values.items():
            if len(row) != len(self.bits):
                raise ValueError(f"Row {metric!r} has {len(row)} values for {len(self.bits)} bit widths.")

    @classmethod
    def from_columns(cls, columns: Mapping[int | None, Mapping[str, float]]) -> MetricTable:
        """Build from ``{bits: {metric: value}}`` (``None`` for float); every column must have the same metrics."""
        bits = tuple(sorted(b for b in columns if b is not None)) + ((None,) if None in columns else ())
        metrics: Sequence[str] = list(next(iter(columns.values()), {}))
        for b in bits:
            if list(columns[b]) != list(metrics):
                raise ValueError(f"Column {bit_width_label(b)} has metrics {list(columns[b])}, expected {metrics}.")
        return cls(bits, {m: tuple(float(columns[b][m]) for b in bits) for m in metrics})

    @property
    def labels(self) -> list[str]:
        """Column headers: ``"2-bit"``, ..., ``"fp32"``."""
        return [bit_width_label(b) for b in self.bits]

    def to_markdown(self, digits: int = 4) -> str:
        """A GitHub/TensorBoard Markdown table with values rounded to ``digits`` decimals."""
        lines = [
            "| metric | " + " | ".join(self.labels) + " |",
            "|---|" + "---:|" * len(self.bits),
        ]
        lines += [f"| {m} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for m, row in self.values.items()]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV text with a ``metric`` column and one column per bit width, values at full precision."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["metric", *self.labels])
        for metric, row in self.values.items():
            writer.writerow([metric, *(repr(v) for v in row)])
        return buffer.getvalue()

    def plot(self) -> Figure:
        """Each metric against the bit width (log2 axis, float drawn at 32 bits), one line per metric."""
        from matplotlib.figure import Figure

        x = [FLOAT_BITS if b is None else b for b in self.bits]
        figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
        axes = figure.add_subplot()
        for metric, row in self.values.items():
            axes.plot(x, row, marker="o", label=metric)
        axes.set_xscale("log", base=2)
        axes.set_xticks(x, self.labels)
        axes.minorticks_off()
        axes.set_xlabel("bit width")
        axes.set_ylabel("value")
        axes.set_ylim(0.0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend()
        axes.set_title("Metrics vs bit width")
        return figure

    def save(self, directory: str | Path, name: str) -> dict[str, Path]:
        """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` into ``directory``; return the paths by suffix."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {suffix: directory / f"{name}.{suffix}" for suffix in ("md", "csv", "png")}
        paths["md"].write_text(self.to_markdown())
        paths["csv"].write_text(self.to_csv())
        self.plot().savefig(paths["png"])
        return paths


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render a Matplotlib figure to an ``(H, W, 3)`` uint8 RGB array (no pyplot, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
