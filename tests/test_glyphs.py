"""``GlyphsDataModule`` and ``render_glyphs``: deterministic, the documented shapes and splits, the right glyphs."""

from __future__ import annotations

import math

import pytest
import torch

from qat_lightning import CompactCNN, GlyphsDataModule
from qat_lightning.data.glyphs import GLYPH_CLASSES, glyph_distance, render_glyphs

SIZES = {"train_size": 300, "val_size": 40, "test_size": 120}


def _setup(**kwargs) -> GlyphsDataModule:
    data = GlyphsDataModule(**{**SIZES, **kwargs})
    data.setup("fit")
    return data


def test_same_seed_same_tensors_whatever_the_global_rng():
    torch.manual_seed(1)
    first = _setup(seed=3)
    torch.manual_seed(2)
    second = _setup(seed=3)
    other = _setup(seed=4)
    for name in ("train", "val", "test"):
        for a, b in zip(first.splits[name].tensors, second.splits[name].tensors, strict=True):
            assert torch.equal(a, b), name
        assert not torch.equal(first.splits[name].tensors[0], other.splits[name].tensors[0]), name


def test_shapes_classes_splits_and_standardisation():
    data = _setup(batch_size=50)
    for name, key in (("train", "train_size"), ("val", "val_size"), ("test", "test_size")):
        x, y = data.splits[name].tensors
        assert x.shape == (SIZES[key], 1, 32, 32) and x.dtype == torch.float32, name
        assert y.shape == (SIZES[key],) and y.dtype == torch.int64, name
        assert y.min() >= 0 and y.max() < data.num_classes == len(GLYPH_CLASSES) == 12
    # Splits are the consecutive parts of one generated sequence, standardised with the training part.
    raw, labels = render_glyphs(sum(SIZES.values()), seed=0)
    mean, std = raw[:300].mean(), raw[:300].std()
    x = torch.cat([data.splits[name].tensors[0] for name in ("train", "val", "test")])
    torch.testing.assert_close(x, (raw - mean) / std)
    assert torch.equal(torch.cat([data.splits[name].tensors[1] for name in ("train", "val", "test")]), labels)
    # Every class is drawn, about equally often (300 draws of 12 classes: 25 each on average).
    counts = torch.bincount(data.splits["train"].tensors[1], minlength=12)
    assert counts.min() >= 10 and counts.max() <= 45, counts
    batch_x, batch_y = next(iter(data.train_dataloader()))
    assert batch_x.shape == (50, 1, 32, 32) and CompactCNN()(batch_x).shape == (50, 12)


def _inside_triangle(x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Points inside the upward equilateral triangle of circumradius ``r``: on the inner side of its 3 edges."""
    corners = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, -math.pi / 6)]
    inside = torch.ones_like(x, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1], strict=True):
        inside &= (bx - ax) * (y - ay) - (by - ay) * (x - ax) > 0  # counter-clockwise: interior on the left
    return inside


def test_glyph_distance_signs_match_the_shapes():
    x, y = torch.rand(2, 5000) * 2.4 - 1.2
    stroke = torch.full_like(x, 0.1)
    r = torch.sqrt(x * x + y * y)
    expected_inside = {
        "disk": r < 0.8,
        "ring": (r - 0.75).abs() < 0.1,
        "square": (x.abs() < 0.6) & (y.abs() < 0.6),
        "triangle": _inside_triangle(x, y, 0.9),
        "half_disk": (r < 0.85) & (y < 0.1),
    }
    for name, inside in expected_inside.items():
        distance = glyph_distance(GLYPH_CLASSES.index(name), x, y, stroke)
        assert torch.equal(distance < 0, inside), name
    # The triangle's distance is exact: at a corner 0, at the centre the inradius r/2.
    tri = GLYPH_CLASSES.index("triangle")
    corners = torch.tensor([0.0, 0.9 * math.cos(-math.pi / 6)]), torch.tensor([0.9, 0.9 * math.sin(-math.pi / 6)])
    torch.testing.assert_close(glyph_distance(tri, *corners, stroke[:2]), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(glyph_distance(tri, torch.zeros(1), torch.zeros(1), stroke[:1]), torch.tensor([-0.45]))
    with pytest.raises(ValueError, match=r"label must be in 0\.\.11, got 12"):
        glyph_distance(12, x, y, stroke)


def test_noise_is_added_with_the_given_deviation_over_the_same_glyphs():
    clean, labels = render_glyphs(400, seed=5, noise=0.0, clutter=0)
    noisy, noisy_labels = render_glyphs(400, seed=5, noise=0.5, clutter=0)
    assert torch.equal(labels, noisy_labels)
    difference = noisy - clean
    assert difference.mean().abs() < 0.01
    torch.testing.assert_close(difference.std().item(), 0.5, atol=0.005, rtol=0)
    # The glyph is drawn with its contrast over an affine background: each clean image has its largest
    # second difference along rows where the glyph's edge is, and none elsewhere.
    second_difference = (clean[..., 2:] - 2 * clean[..., 1:-1] + clean[..., :-2]).abs()
    assert (second_difference < 1e-5).float().mean() > 0.6
    assert (second_difference.amax(dim=(1, 2, 3)) > 0.2).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": 0}, r"`train_size` must be a positive integer, got 0"),
        ({"test_size": 2.5}, r"`test_size` must be a positive integer, got 2\.5"),
        ({"noise": -0.1}, r"`noise` must be a finite non-negative standard deviation, got -0\.1"),
        ({"noise": float("nan")}, r"`noise` must be a finite non-negative standard deviation, got nan"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlyphsDataModule(**kwargs)


def test_compact_cnn():
    model = CompactCNN(in_channels=1, num_classes=12)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 12)
    assert CompactCNN(3, 5, channels=(8, 8), convs_per_stage=1)(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"`convs_per_stage` must be a positive integer, got 0"):
        CompactCNN(convs_per_stage=0)
    with pytest.raises(ValueError, match=r"`channels` must name at least one stage"):
        CompactCNN(channels=())


def test_compact_cnn_loads_the_float_weights_a_qat_run_starts_from(tmp_path):
    source = CompactCNN(channels=(8, 16))
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    checkpoint = {"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "fp32.ckpt")
    loaded = CompactCNN(channels=(8, 16), weights_path=tmp_path / "fp32.ckpt")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    with pytest.raises(ValueError, match=r"(?s)do not fit CompactCNN.*size mismatch for classifier.weight"):
        CompactCNN(channels=(8, 16), num_classes=5, weights_path=tmp_path / "fp32.ckpt")
