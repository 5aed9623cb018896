"""``torch.compile`` of fake-quantized models: no graph break in the layers, eager numbers, bounded recompiles."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN
from qat_lightning.nn import apply_plan, plan_quantization, quantizers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _prepared(model: nn.Module) -> nn.Module:
    """``model`` as the callback prepares it at 4 bits: LSQ inside, observed 8-bit first and last layers."""
    model = copy.deepcopy(model)
    apply_plan(model, plan_quantization(model, 4, first_last_bits=8))
    return model.train()


def test_fake_quantized_layers_trace_without_graph_breaks():
    model = _prepared(SmallCNN(channels=(8, 16)))
    x = torch.randn(16, 1, 8, 8)
    for phase in ("uncalibrated", "calibrated (LSQ scales learned)"):
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, (phase, [b.reason for b in explained.break_reasons])
        assert explained.graph_count == 1, phase
        model(x)  # calibrate: the next trace takes the LSQ path
    assert all(q.calibrated for q in quantizers(model))


def test_compiled_training_matches_eager():
    # No BatchNorm: compiled BatchNorm reduces in another order, and a last-bit change of a range moves many codes
    # by one step. Here everything but the reductions (LSQ scale gradients) is bit-exact; after 4 steps a few codes
    # may sit one step apart, which moves the parameters by about 1e-4 of their norm.
    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    eager, compiled_model = _prepared(float_model), _prepared(float_model)
    compiled = torch.compile(compiled_model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, compiled_model)]
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for step in range(4):
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), step
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values(), strict=True):
        if not torch.is_tensor(a):  # a quantizer's extra state
            assert a == b, name
        elif a.is_floating_point():
            # the scale gradients are sums in another order: a last-bit change can move a code one step
            assert (b - a).norm() <= 1e-3 * a.norm(), name
        else:
            assert torch.equal(a, b), name
    assert not counters["graph_break"]


def test_compiled_lightning_module_through_every_phase(trainer_kwargs, tmp_path):
    # The README's way: compile the LightningModule, then fit. Five training graphs: float, quantized before and
    # after the first batch (LSQ initialisation), BatchNorm frozen, observers frozen; more fails the fit. Dynamo and
    # AOT autograd as with inductor, without generating kernels (test_compiled_training_matches_eager does).
    model = ImageClassifier(SmallCNN(channels=(8, 16)))
    callback = QuantizationCallback(
        bits=4,
        warmup_steps=1,
        freeze_bn_step=3,
        freeze_observers_step=5,
        convert_dir=tmp_path / "int8",
        formats=["onnx"],
        agreement_batches=1,
    )
    trainer = pl.Trainer(max_steps=7, callbacks=[callback], **{**trainer_kwargs, "limit_train_batches": 4})
    with torch._dynamo.config.patch(recompile_limit=6, fail_on_recompile_limit_hit=True):
        trainer.fit(torch.compile(model, backend="aot_eager"), DigitsDataModule(batch_size=32))

    assert callback.phase == "qat_frozen"
    assert counters["frames"]["ok"] > 0
    # The only graph breaks are Lightning's logging and the metric updates, never in the model.
    reasons = list(counters["graph_break"])
    assert all("_ResultCollection.log" in r or "_update_metrics" in r for r in reasons), reasons
    assert (tmp_path / "int8" / "model_int8.onnx").is_file()  # converted from the uncompiled forward
