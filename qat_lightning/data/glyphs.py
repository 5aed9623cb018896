"""Procedurally rendered glyphs: 32x32 grayscale images of 12 shape classes under random affine transforms,
clutter, occlusion and noise, generated deterministically from a seed (no download, a few seconds)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from qat_lightning.data.vision import VisionDataModule

GLYPH_CLASSES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "square_outline",
    "triangle",
    "triangle_outline",
    "plus",
    "star",
    "crescent",
    "bars",
    "half_disk",
    "corner",
)


def _length(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def _box(x: torch.Tensor, y: torch.Tensor, half_w: float | torch.Tensor, half_h: float | torch.Tensor) -> torch.Tensor:
    dx, dy = x.abs() - half_w, y.abs() - half_h
    return _length(dx.clamp(min=0), dy.clamp(min=0)) + torch.maximum(dx, dy).clamp(max=0)


def _triangle(x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance to an equilateral triangle of circumradius ``r``, centred, pointing up (+y)."""
    k = math.sqrt(3.0)
    side = r * k  # side length
    x, y = x.abs() - side / 2, y + r / 2  # fold onto the right half; y = 0 on the base
    flip = x + k * y > 0
    x, y = torch.where(flip, (x - k * y) / 2, x), torch.where(flip, (-k * x - y) / 2, y)
    x = x - x.clamp(-side, 0.0)
    return -_length(x, y) * torch.sign(y)


def glyph_distance(label: int, x: torch.Tensor, y: torch.Tensor, stroke: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of the glyph ``GLYPH_CLASSES[label]`` in its own frame, where the
    glyph fits in the unit disk (exact distances except for the star, whose scaled radial gap has the right sign);
    ``stroke`` is the half-width of outlines and bars, broadcast with ``x``."""
    if not 0 <= label < len(GLYPH_CLASSES):
        raise ValueError(f"label must be in 0..{len(GLYPH_CLASSES) - 1}, got {label}.")
    name = GLYPH_CLASSES[label]
    r = _length(x, y)
    if name == "disk":
        return r - 0.8
    if name == "ring":
        return (r - 0.75).abs() - stroke
    if name == "square":
        return _box(x, y, 0.6, 0.6)
    if name == "square_outline":
        return _box(x, y, 0.6, 0.6).abs() - stroke
    if name == "triangle":
        return _triangle(x, y, 0.9)
    if name == "triangle_outline":
        return _triangle(x, y, 0.9).abs() - stroke
    if name == "plus":
        return torch.minimum(_box(x, y, 0.85, stroke * 1.6), _box(x, y, stroke * 1.6, 0.85))
    if name == "star":
        angle = torch.atan2(y, x)
        return (r - 0.85 * (0.62 + 0.38 * torch.cos(5 * angle))) * 0.6
    if name == "crescent":
        return torch.maximum(r - 0.8, -(_length(x - 0.4, y) - 0.65))
    if name == "bars":
        return torch.minimum(_box(x, y - 0.4, 0.75, stroke * 1.6), _box(x, y + 0.4, 0.75, stroke * 1.6))
    if name == "half_disk":
        return torch.maximum(r - 0.85, y - 0.1)
    return torch.minimum(_box(x + 0.45, y, stroke * 1.6, 0.75), _box(x, y + 0.6, 0.75, stroke * 1.6))  # corner


CHUNK = 256  # images rendered at once: their pixel arrays (256 x 1024 floats) stay in the CPU cache


def _segment_coverage(
    px: torch.Tensor, py: torch.Tensor, a: torch.Tensor, b: torch.Tensor, width: torch.Tensor, pixel: float
) -> torch.Tensor:
    """Anti-aliased coverage (0..1) of line segments from ``a`` to ``b`` (``(n, 2)``) of half-width ``width``."""
    ab = b - a
    t = ((px - a[:, :1]) * ab[:, :1] + (py - a[:, 1:]) * ab[:, 1:]) / (ab.pow(2).sum(1, keepdim=True) + 1e-6)
    t = t.clamp(0, 1)
    d = _length(px - a[:, :1] - t * ab[:, :1], py - a[:, 1:] - t * ab[:, 1:])
    return (0.5 - (d - width) / pixel).clamp(0, 1)


def render_glyphs(
    n: int, seed: int, size: int = 32, noise: float = 0.2, clutter: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` glyph images and labels, the same for the same arguments: every draw comes from one CPU generator
    seeded with ``seed``, independent of the global RNG and of the thread count (float32 math on the CPU).

    Each image: a glyph of a uniformly drawn class, rotated by any angle, scaled to 45-90% of the half-image
    (the glyphs fill the unit disk of their own frame), stretched by up to 20% along one axis and sheared by up to
    0.2, shifted by up to 30% of the half-image (so it may leave the frame); drawn with a random contrast and
    polarity over a random linear background gradient, with ``clutter`` random line segments (over the glyph too)
    and additive Gaussian noise of standard deviation ``noise`` (the glyph's contrast is 0.5-1).

    Returns:
        images ``(n, 1, size, size)`` float32 and labels ``(n,)`` int64.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    labels = torch.randint(len(GLYPH_CLASSES), (n,), generator=g)
    params = {
        "angle": uniform(0, 2 * math.pi, n, 1),
        "scale": uniform(0.45, 0.9, n, 1),
        "stretch": uniform(0.8, 1.2, n, 1),
        "shear": uniform(-0.2, 0.2, n, 1),
        "shift": uniform(-0.3, 0.3, n, 2),
        "stroke": uniform(0.09, 0.2, n, 1),
        "level": uniform(-0.3, 0.3, n, 1),
        "slope": uniform(-0.4, 0.4, n, 2),
        "contrast": uniform(0.5, 1.0, n, 1) * torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0),
        "starts": uniform(-1.1, 1.1, n, clutter, 2),
        "ends": uniform(-1.1, 1.1, n, clutter, 2),
        "widths": uniform(0.03, 0.09, n, clutter),
        "intensities": uniform(-0.6, 0.6, n, clutter),
    }
    images = noise * torch.randn(n, size * size, generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    px, py = px.reshape(1, -1), py.reshape(1, -1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small memory-bound element-wise ops: one thread is fastest, and safe on busy CPUs
    try:
        for start in range(0, n, CHUNK):
            rows = slice(start, start + CHUNK)
            images[rows] += _render_chunk(labels[rows], {k: v[rows] for k, v in params.items()}, px, py, 2.0 / size)
    finally:
        torch.set_num_threads(threads)
    return images.reshape(n, 1, size, size), labels


def _render_chunk(
    labels: torch.Tensor, p: dict[str, torch.Tensor], px: torch.Tensor, py: torch.Tensor, pixel: float
) -> torch.Tensor:
    """The noise-free images ``(len(labels), pixels)`` of ``render_glyphs`` for one chunk of its draws."""
    # Glyph frame: undo the shift, the rotation, the shear and the anisotropic scale.
    dx, dy = px - p["shift"][:, :1], py - p["shift"][:, 1:]
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    u = u - p["shear"] * v
    u, v = u / (p["scale"] * p["stretch"]), v / (p["scale"] / p["stretch"])
    distance = torch.empty_like(u)
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        distance[idx] = glyph_distance(label, u[idx], v[idx], p["stroke"][idx])
    coverage = (0.5 - distance * p["scale"] / pixel).clamp(0, 1)  # about one pixel of anti-aliasing
    image = p["level"] + p["slope"][:, :1] * px + p["slope"][:, 1:] * py + p["contrast"] * coverage
    for k in range(p["starts"].shape[1]):
        line = _segment_coverage(px, py, p["starts"][:, k], p["ends"][:, k], p["widths"][:, k : k + 1], pixel)
        image += p["intensities"][:, k : k + 1] * line
    return image


class GlyphsDataModule(VisionDataModule):
    """Rendered glyphs (see ``render_glyphs``): 32x32 grayscale images of the 12 ``GLYPH_CLASSES``, generated
    from ``seed`` in a few seconds at ``setup`` and kept in memory; nothing is downloaded or written.

    A harder embedded benchmark than the 8x8 digits: noise, clutter and glyphs cut by the frame make some images
    ambiguous, so a float model stays well below 100% and low-bit methods differ. The splits are disjoint
    draws of one generated sequence (training first, then validation, then test), independent of the global
    RNG; images are standardised with the training split's mean and standard deviation.

    Args:
        batch_size: images per batch.
        train_size, val_size, test_size: images in each split (each a positive integer).
        seed: seed of the generator.
        noise: standard deviation of the additive pixel noise (the glyphs' contrast is 0.5-1).
        num_workers: data-loading worker processes (0 loads in the main process).
    """

    num_classes = len(GLYPH_CLASSES)
    in_channels = 1
    input_size = 32

    def __init__(
        self,
        batch_size: int = 128,
        train_size: int = 12000,
        val_size: int = 2000,
        test_size: int = 5000,
        seed: int = 0,
        noise: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not 0.0 <= noise < float("inf"):
            raise ValueError(f"`noise` must be a finite non-negative standard deviation, got {noise!r}.")
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        sizes = {"train": hp.train_size, "val": hp.val_size, "test": hp.test_size}
        images, labels = render_glyphs(sum(sizes.values()), hp.seed, size=self.input_size, noise=hp.noise)
        train = images[: hp.train_size]
        images = (images - train.mean()) / train.std()
        bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
        self.splits = {
            name: TensorDataset(images[lo:hi], labels[lo:hi])
            for name, lo, hi in zip(sizes, bounds[:-1], bounds[1:], strict=True)
        }
