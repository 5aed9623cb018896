"""Every torchvision classifier family (smallest variant) converts at 8 and 4 bits and its files follow the model.

Models nobody here wrote: random init, small inputs, a few QAT steps (observers and LSQ scales move, BatchNorm
statistics update), then ``convert_model`` with the default formats. Each file is checked by ``convert_model``
itself on held-out batches; the test asserts the figures and reads the report back from disk.

The ``.pt2`` program computes operation for operation what the fake-quant model computes (exactly, but where eager
PyTorch runs a fused kernel that export decomposes, as ``nn.MultiheadAttention``'s fast path). A runtime with its
own float kernels (ONNX Runtime) rounds a few values near a grid boundary the other way, and in a deep random-init
network such flips cascade: the fake-quant model itself moves its logits by up to 10% in one sample when its
convolutions run in float64 (ResNet-18 at 8 bits), or by 6% when its input is perturbed by one part in a million
(EfficientNet-B0 at 4 bits). Each file is loaded back and held, sample by sample, to 2% or 3x that floor (measured
on the same batches), whichever is larger, and to the same top class; one sample in 16 may cascade
(and one more top class may swap than swap in the model's own float64 run).

The default suite runs 8 cases that cover every kind of block (``DEFAULT_CASES``; the suite must stay well under
15 minutes on 2 cores); ``QAT_LIGHTNING_ZOO=full`` runs every family at both widths (about 15 minutes alone).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torchvision
from torch import nn

from qat_lightning import convert_model
from qat_lightning.convert.backends import backend
from qat_lightning.nn import (
    apply_plan,
    find_input_producers,
    find_output_roundings,
    plan_quantization,
    round_outputs,
    share_input_quantizers,
)

# family -> (builder kwargs, input side); the smallest variant of each classification family, at the smallest
# input it takes (Inception needs 75 pixels; MaxVit's windows need every stage's side divisible by the partition).
ZOO: dict[str, tuple[dict, int]] = {
    "alexnet": ({}, 64),
    "convnext_tiny": ({}, 32),
    "densenet121": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "efficientnet_v2_s": ({}, 32),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 32),
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 80),
    "maxvit_t": ({}, 64),
    "mnasnet0_5": ({}, 32),
    "mobilenet_v2": ({}, 32),
    "mobilenet_v3_small": ({}, 32),
    "regnet_x_400mf": ({}, 32),
    "regnet_y_400mf": ({}, 32),
    "resnet18": ({}, 32),
    "resnext50_32x4d": ({}, 32),
    "shufflenet_v2_x0_5": ({}, 32),
    "squeezenet1_1": ({}, 32),
    "swin_t": ({}, 32),
    "vgg11_bn": ({}, 32),
    "vit_b_16": ({"image_size": 32}, 32),
    "wide_resnet50_2": ({}, 32),
}
CLASSES = 10


def _build(family: str, kwargs: dict) -> nn.Module:
    if family == "maxvit_t":  # maxvit_t's widths and depths, with windows of 2 so that 64-pixel inputs fit
        from torchvision.models.maxvit import MaxVit

        return MaxVit(
            input_size=(64, 64),
            stem_channels=64,
            partition_size=2,
            block_channels=[64, 128, 256, 512],
            block_layers=[2, 2, 5, 2],
            head_dim=32,
            stochastic_depth_prob=0.2,
            num_classes=CLASSES,
        )
    return torchvision.models.get_model(family, weights=None, num_classes=CLASSES, **kwargs)


def _qat_model(family: str, bits: int) -> tuple[nn.Module, int]:
    """The family's model fake-quantized at ``bits`` (first/last layer at 8, shared inputs rounded where they are
    produced, residual-add operands and pool inputs rounded, as ``QuantizationCallback`` does) after 3 QAT steps on
    random data.

    BatchNorm averages the statistics of all batches it saw (``momentum=None``), as a trained model's have
    converged; with the default momentum, 3 steps leave them mostly at their initial values, far from the data.
    """
    kwargs, side = ZOO[family]
    torch.manual_seed(0)
    model = _build(family, kwargs)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    apply_plan(model, plan_quantization(model, bits, first_last_bits=8, learned_scale=None))
    # As QuantizationCallback does: inputs read by several ops are rounded once, where they are produced.
    example = (torch.randn(2, 3, side, side),)
    share_input_quantizers(model, find_input_producers(model, example))
    round_outputs(model, find_output_roundings(model, example))  # residual-add operands and pool inputs, at 8 bits
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(3):  # observers, LSQ scales and BatchNorm statistics move
        x, y = torch.randn(8, 3, side, side), torch.randint(0, CLASSES, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        # Random-init nets have gradients of 1e3 (MNASNet's head): clipped as `Trainer(gradient_clip_val=1)` does,
        # or 3 steps at this rate drive some to NaN.
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval(), side


# The default suite's cases: one of each kind of block (plain convs, residual adds, depthwise + squeeze-excite,
# channel shuffle and concatenation, LayerNorm/GELU, attention), both widths; the whole matrix takes 15 minutes.
DEFAULT_CASES = [
    ("alexnet", 8),
    ("convnext_tiny", 4),
    ("efficientnet_b0", 4),
    ("mobilenet_v3_small", 8),
    ("resnet18", 4),
    ("shufflenet_v2_x0_5", 4),
    ("squeezenet1_1", 8),
    ("vit_b_16", 4),
]


def _cases() -> list[tuple[str, int]]:
    if os.environ.get("QAT_LIGHTNING_ZOO") == "full":
        return [(family, bits) for family in sorted(ZOO) for bits in (8, 4)]
    return DEFAULT_CASES


@torch.no_grad()
def _per_sample(model: nn.Module, run, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample relative logit error and top-class agreement of ``run`` (a loaded file) against ``model``."""
    errors, same = [], []
    for (x,), _ in batches:
        expected, actual = model(x), run(x)
        errors.append((actual - expected).norm(dim=1) / expected.norm(dim=1))
        same.append(actual.argmax(1) == expected.argmax(1))
    return torch.cat(errors), torch.cat(same)


@torch.no_grad()
def _float_order_floor(model: nn.Module, batches: list) -> tuple[float, int]:
    """How far the fake-quant model moves from itself when only float rounding changes, and in how many samples its
    top class then changes.

    The error is the larger of its relative logit change under 1e-6 relative input noise (over all samples) and the
    largest per-sample relative change when it runs in float64: its convolutions then round differently, as another
    runtime's kernels do, and a value near a grid boundary may take the other code (the quantizers still round in
    float32). The count is the float64 run's top-class changes.
    """
    generator = torch.Generator().manual_seed(1)
    noise = norm = 0.0
    for (x,), _ in batches:
        clean = model(x)
        noise += float((model(x * (1 + 1e-6 * torch.randn(x.shape, generator=generator))) - clean).pow(2).sum())
        norm += float(clean.pow(2).sum())
    in_float64 = copy.deepcopy(model).double()
    errors, same = _per_sample(model, lambda x: in_float64(x.double()).float(), batches)
    return max((noise / norm) ** 0.5, float(errors.max())), int((~same).sum())


@pytest.mark.zoo
@pytest.mark.parametrize(("family", "bits"), _cases())
def test_torchvision_family_converts_and_files_follow_the_model(family: str, bits: int, tmp_path) -> None:
    model, side = _qat_model(family, bits)
    batches = [((torch.randn(8, 3, side, side),), None) for _ in range(2)]
    result = convert_model(model, batches[0][0], tmp_path, check_batches=batches, packed=False)

    assert result.failed == {}
    assert set(result.fidelity) == {"pt2", "onnx"}
    floor, float64_flips = _float_order_floor(model, batches)
    for fmt, fidelity in result.fidelity.items():
        assert fidelity.samples == 16
        errors, same = _per_sample(model, backend(fmt).load(result.paths[fmt]), batches)
        assert bool(errors.isfinite().all()), (fmt, errors)  # a diverged model or file would compare NaN to NaN
        assert fidelity.agreement == pytest.approx(float(same.float().mean()))  # the report says what the file does
        # A value that rounds the other way in one sample can cascade through a random-init network: one sample in
        # 16 may go beyond the bound, and one more top class may swap than swap in the model's own float64 run.
        bound = max(0.02, 3 * floor)
        beyond, swapped = int((errors > bound).sum()), int((~same).sum())
        assert beyond <= 1 and swapped <= 1 + float64_flips, (fmt, errors.max(), floor, swapped, float64_flips)
    report = json.loads((tmp_path / "conversion_report.json").read_text())
    assert report["float_layers"] == result.float_layers
    assert sorted(report["int8_layers"]) == result.int8_layers and result.int8_layers
