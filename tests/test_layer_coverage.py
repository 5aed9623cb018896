"""Layer coverage: ConvTranspose1d/2d/3d and MultiheadAttention train on their grids, appear in the plan (with
every layer left float and why), convert to files that compute what the fake-quant model computes, and come back
from a checkpoint."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import np_choose_qparams, np_fake_quantize, np_min_max, np_quant_range, np_quantize
from onnx import numpy_helper
from torch import nn

from qat_lightning import QuantizationCallback, convert_model
from qat_lightning.convert import load_packed_weights
from qat_lightning.convert.backends import backend
from qat_lightning.nn import (
    FakeQuantizedConvTranspose1d,
    FakeQuantizedConvTranspose2d,
    FakeQuantizedLayer,
    FakeQuantizedMultiheadAttention,
    FloatLayer,
    apply_plan,
    fake_quantize_layer,
    float_layers,
    format_plan,
    plan_from_state_dict,
    plan_quantization,
    prepare_for_state_dict,
    quantized_snapshot,
    quantizers,
    restore_float,
    unsupported_layers,
)
from qat_lightning.quant import weight_config

EMBEDDING_REASON = "embedding table (lookups are not fake-quantized)"


class AttentionDecoder(nn.Module):
    """Conv encoder, self-attention over the 4x4 feature map, transposed-conv decoder, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.position = nn.Embedding(16, 8)  # learned positions of the 16 tokens, added as a table
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.deconv = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))  # (B, 8, 4, 4)
        tokens = h.flatten(2).transpose(1, 2) + self.position.weight  # (B, 16, 8)
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        h = (tokens + attended).transpose(1, 2).reshape(h.shape)
        return self.head(F.relu(self.deconv(h)).flatten(1))  # deconv: (B, 4, 8, 8)


class SequenceDecoder(nn.Module):
    """Conv1d encoder, grouped ConvTranspose1d upsampling (8 -> 16 steps), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.deconv = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1, groups=2)  # weight (6, 2, 4)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.deconv(F.relu(self.conv(x)))).flatten(1))


CASES = {
    "conv_transpose2d_attention": (AttentionDecoder, (3, 8, 8)),
    "conv_transpose1d": (SequenceDecoder, (2, 8)),
}


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(24, *self.input_shape), torch.randint(0, 3, (24,)))
        return torch.utils.data.DataLoader(data, batch_size=8)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _assert_weight_on_its_grid(quantized: torch.Tensor, weight: torch.Tensor, quantizer, axis: int) -> None:
    """The quantizer's per-channel scale is NumPy's symmetric scale of ``weight`` along ``axis``, and the weight
    the layer computes with is NumPy's fake quantization: integer codes in the quantizer's bit range."""
    bits = quantizer.config.bits
    w = _np(weight)
    scale, zero_point = np_choose_qparams(*np_min_max(w, axis), bits, symmetric=True)
    np.testing.assert_array_equal(_np(quantizer.scale), scale)
    codes = _np(quantized) / np.expand_dims(scale, [d for d in range(w.ndim) if d != axis])
    np.testing.assert_allclose(codes, np.round(codes), rtol=0, atol=1e-4)
    qmin, qmax = np_quant_range(bits, symmetric=True)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    assert len(np.unique(np.round(codes))) > 2**bits // 2  # the grid is used, not a couple of levels
    np.testing.assert_array_equal(_np(quantized), np_fake_quantize(w, scale, zero_point, bits, True, axis))


def _fit(case: str, trainer_kwargs: dict) -> tuple[_Classifier, QuantizationCallback, pl.Trainer]:
    net_class, input_shape = CASES[case]
    module = _Classifier(net_class(), input_shape)
    callback = QuantizationCallback(bits=4, warmup_epochs=0, learned_scale=False, convert_on_fit_end=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], **trainer_kwargs)
    trainer.fit(module)
    return module, callback, trainer


@pytest.mark.parametrize("case", list(CASES))
def test_qat_trains_on_the_grids_plans_converts_and_reloads(case, trainer_kwargs, tmp_path):
    module, callback, trainer = _fit(case, trainer_kwargs)
    net = module.net
    assert trainer.global_step == 6 and all(torch.isfinite(p).all() for p in module.parameters())

    # The plan lists the new layers at the default width (first and last layer at 8 bits), and what stays float.
    planned = {p.name: (p.layer_type, p.weight.bits, p.weight.channel_axis) for p in callback.plan}
    deconv_type = type(net.deconv).float_class.__name__
    assert planned["net.deconv"] == (deconv_type, 4, 1)
    if case == "conv_transpose2d_attention":
        assert planned["net.attn"] == ("MultiheadAttention", 4, 0)
        assert callback.float_layers == [FloatLayer("net.position", "Embedding", EMBEDDING_REASON)]
        assert isinstance(net.attn, FakeQuantizedMultiheadAttention) and isinstance(
            net.deconv, FakeQuantizedConvTranspose2d
        )
    else:
        assert callback.float_layers == []
        assert isinstance(net.deconv, FakeQuantizedConvTranspose1d)
    assert list(planned) == [n for n, _ in module.named_modules() if n in planned]  # module order, nothing else

    # Weights on their grids: refresh the weight scales on the trained weights (one train-mode forward, no step).
    x = torch.randn(5, *module.input_shape)
    with torch.no_grad():
        module.train()(x)
    module.eval()
    deconv = net.deconv
    assert deconv.weight_quantizer.scale.shape == (deconv.weight.shape[1],)  # out_channels / groups
    _assert_weight_on_its_grid(deconv.quantized_weight(), deconv.weight, deconv.weight_quantizer, axis=1)
    if case == "conv_transpose2d_attention":
        attn = net.attn
        grid = attn.quantized_weights()["in_proj_weight"]
        _assert_weight_on_its_grid(grid, attn.in_proj_weight, attn.in_proj_weight_quantizer, axis=0)
        out_proj = attn.out_proj
        _assert_weight_on_its_grid(out_proj.quantized_weight(), out_proj.weight, out_proj.weight_quantizer, axis=0)
        assert attn.query_quantizer.calibrated and out_proj.input_quantizer.calibrated
        assert not attn.key_quantizer.calibrated  # self-attention: the key is the query, rounded once

    # Conversion: both files written, read back with their own runtimes, computing what the fake-quant model does.
    result = convert_model(net, (torch.randn(4, *module.input_shape),), tmp_path / "int8", formats=("pt2", "onnx"))
    assert result.failed == {}
    expected_int8 = {"net.conv", "net.deconv", "net.head"} | ({"net.attn.out_proj"} if "attention" in case else set())
    assert {f"net.{n}" for n in result.int8_layers} == expected_int8
    if case == "conv_transpose2d_attention":
        assert list(result.float_layers) == ["attn"] and "in-projection runs in float" in result.float_layers["attn"]
    with torch.no_grad():
        reference = net(x)
        from_pt2 = torch.export.load(str(result.paths["pt2"])).module()(x)
    session = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(from_pt2, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(from_onnx, _np(reference), rtol=0, atol=1e-4)
    assert np.abs(_np(reference)).max() > 1e-2  # the comparison is not between two vanishing outputs

    # The ONNX ConvTranspose is integer: int8 codes dequantized along axis 1 with the trained per-channel scales.
    proto = onnx.load(str(result.paths["onnx"]))
    produced = {out: node for node in proto.graph.node for out in node.output}
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    (transpose,) = [n for n in proto.graph.node if n.op_type == "ConvTranspose"]
    dequantize = produced[transpose.input[1]]
    assert dequantize.op_type == "DequantizeLinear" and {a.name: a.i for a in dequantize.attribute}["axis"] == 1
    codes = initializers[dequantize.input[0]]
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(initializers[dequantize.input[1]], _np(deconv.weight_quantizer.scale))
    np.testing.assert_array_equal(
        codes, np_quantize(_np(deconv.quantized_weight()), _np(deconv.weight_quantizer.scale), 0, 4, True, axis=1)
    )

    # The packed file holds the ConvTranspose codes with their axis: it reloads the exact trained weights.
    float_net = CASES[case][0]()
    float_net.load_state_dict(load_packed_weights(result.paths["packed"]))
    assert torch.equal(float_net.deconv.weight, deconv.quantized_weight())

    # Checkpoint round trip: a fresh float model rebuilds the same structure and computes the same outputs.
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    saved_plan = plan_from_state_dict(state)
    assert [p.name for p in saved_plan] == list(planned)  # the attention module is one entry, without out_proj
    assert [p.weight for p in saved_plan] == [p.weight for p in callback.plan]
    restored = _Classifier(CASES[case][0](), module.input_shape)
    assert prepare_for_state_dict(restored, state)
    restored.load_state_dict(state)  # strict
    assert [type(m) for m in restored.modules()] == [type(m) for m in module.modules()]
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), reference)


@pytest.mark.parametrize("fmt", ["executorch", "x86"])
def test_optional_backends_convert_attention_and_conv_transpose(fmt, tmp_path):
    if backend(fmt).requirement() is not None:
        pytest.skip(backend(fmt).requirement())
    net = AttentionDecoder()
    apply_plan(net, plan_quantization(net, 4, first_last_bits=8, reduce_range=True))  # exact in oneDNN on any x86
    with torch.no_grad():
        for _ in range(3):
            net.train()(torch.randn(16, 3, 8, 8))
    x = torch.randn(6, 3, 8, 8)
    result = convert_model(net.eval(), (x[:4],), tmp_path, formats=[fmt], packed=False, check_batches=[((x,), None)])
    assert result.failed == {} and result.paths[fmt].stat().st_size > 0
    assert result.fidelity[fmt].relative_error < 1e-5 and result.fidelity[fmt].agreement == 1.0


@pytest.mark.parametrize("fmt", ["executorch", "x86"])
def test_optional_backends_convert_conv1d_into_conv_transpose1d_and_the_file_reads_back(fmt, tmp_path):
    """A Conv1d feeding a ConvTranspose1d converts; the file, loaded back, computes the fake-quant model on a batch
    the conversion never saw. x86 runs both as float kernels on their trained grids and names them."""
    if backend(fmt).requirement() is not None:
        pytest.skip(backend(fmt).requirement())
    torch.manual_seed(0)
    net = SequenceDecoder()
    apply_plan(net, plan_quantization(net, 4, first_last_bits=8))
    with torch.no_grad():
        for _ in range(3):
            net.train()(torch.randn(16, 2, 8))
    x = torch.randn(6, 2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert_model(net.eval(), (x[:4],), tmp_path, formats=[fmt], packed=False)
    assert result.failed == {}
    messages = [str(w.message) for w in caught]
    if fmt == "x86":
        for name, kind in (("conv", "Conv1d"), ("deconv", "ConvTranspose1d")):
            assert any(f"layer `{name}` ({kind}) runs as a float kernel" in m for m in messages), messages
    run = backend(fmt).load(result.paths[fmt])
    y = torch.randn(5, 2, 8)
    with torch.no_grad():
        expected = net(y)
    got = run(y)
    assert (got - expected).norm() / expected.norm() < 1e-5 and torch.equal(got.argmax(1), expected.argmax(1))


def test_format_plan_shows_the_new_layers_and_every_float_layer_with_its_reason():
    model = AttentionDecoder()
    exclude = ["head"]
    plan = plan_quantization(model, 4, exclude=exclude, first_last_bits=8, learned_scale=False)
    floats = float_layers(model, plan, exclude)
    assert floats == [
        FloatLayer("position", "Embedding", EMBEDDING_REASON),
        FloatLayer("head", "Linear", "excluded by pattern 'head'"),
    ]
    rows = [line.split(maxsplit=4) for line in format_plan(plan, floats).splitlines()[2:]]
    assert rows == [
        ["conv", "Conv2d", "8", "8", "moving_average"],
        ["attn", "MultiheadAttention", "4", "4", "moving_average"],
        ["deconv", "ConvTranspose2d", "8", "8", "moving_average"],  # the last planned layer
        ["position", "Embedding", "float", "float", EMBEDDING_REASON],
        ["head", "Linear", "float", "float", "excluded by pattern 'head'"],
    ]
    apply_plan(model, plan)
    assert float_layers(model, plan, exclude) == floats  # the same on the prepared model
    assert float_layers(model, plan)[1] == FloatLayer("head", "Linear", "not in the plan")
    assert unsupported_layers(model) == ["position (Embedding)"]


def test_plan_lists_other_weight_layers_as_unsupported_types():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4), nn.PReLU(), nn.BatchNorm1d(4), nn.LayerNorm(4))
    plan = plan_quantization(model, 4, first_last_bits=None, learned_scale=False)
    assert [p.name for p in plan] == ["0"]
    assert float_layers(model, plan) == [
        FloatLayer("1", "LSTM", "unsupported type `LSTM`"),
        FloatLayer("2", "PReLU", "unsupported type `PReLU`"),
    ]


def _attention_args(batch_first: bool, kdim: int, vdim: int, cross: bool, batched: bool):
    query = torch.randn(3, 5, 8)
    key = torch.randn(3, 4, kdim) if cross else query
    value = torch.randn(3, 4, vdim) if cross else query
    if not batched:
        return query[0], key[0] if cross else query[0], value[0] if cross else query[0]
    if not batch_first:
        query = query.transpose(0, 1)
        key, value = (key.transpose(0, 1), value.transpose(0, 1)) if cross else (query, query)
    return query, key, value


ATTENTION_OPTIONS = [
    dict(),
    dict(batch_first=True),
    dict(kdim=5, vdim=6),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, bias=False),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
]


@pytest.mark.parametrize("options", ATTENTION_OPTIONS, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_attention_with_rounding_off_computes_what_torch_computes(options, batched):
    stock = nn.MultiheadAttention(8, 2, **options).eval()
    attention = copy.deepcopy(stock)
    apply_plan(attention, plan_quantization(attention, 4, first_last_bits=None, learned_scale=False))
    for quantizer in quantizers(attention):
        quantizer.fake_quant_enabled = False
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    batch_first = options.get("batch_first", False)
    for cross in (True, False) if kdim == vdim == 8 else (True,):
        args = _attention_args(batch_first, kdim, vdim, cross, batched)
        source = 4 if cross else 5
        shape = (3 * 2, 5, source) if batched else (2, 5, source)
        blocked = (torch.arange(5)[:, None] + torch.arange(source)) % 3 == 0  # never a whole row
        padding = (torch.arange(source) == source - 1).expand(3, source)  # the last key of every sample
        masks = [
            {},
            {"attn_mask": blocked},
            {"attn_mask": torch.randn(shape)},
            {"key_padding_mask": padding if batched else padding[0]},
            {"attn_mask": torch.randn(5, source), "key_padding_mask": padding.float() * -1e4 if batched else None},
        ]
        for mask in masks:
            for need_weights, average in ((True, True), (True, False), (False, True)):
                kwargs = dict(mask, need_weights=need_weights, average_attn_weights=average)
                with torch.no_grad():
                    out, weights = attention(*args, **kwargs)
                    expected, expected_weights = stock(*args, **kwargs)
                torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, equal_nan=True)
                if need_weights:
                    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6, equal_nan=True)
                else:
                    assert weights is None and expected_weights is None


def test_attention_rounds_inputs_weights_and_the_out_projection_input():
    """Against torch's own attention on NumPy-rounded inputs and weights, with the attention output (before the
    out-projection, read with an identity out-projection) rounded by NumPy on the out_proj input grid."""
    attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
    apply_plan(attention, plan_quantization(attention, 4, first_last_bits=None, learned_scale=False))
    query, memory = torch.randn(4, 5, 8), torch.randn(4, 7, 6)
    with torch.no_grad():
        attention.train()(query, memory, memory)  # observe (no dropout: p=0)
    attention.eval()
    assert attention.key_quantizer.calibrated and not attention.value_quantizer.calibrated  # value is the key

    def rounded(x: torch.Tensor, quantizer) -> torch.Tensor:
        c = quantizer.config
        axis = c.channel_axis if c.per_channel else None
        return torch.from_numpy(
            np_fake_quantize(_np(x), _np(quantizer.scale), _np(quantizer.zero_point), c.bits, c.symmetric, axis)
        )

    q, k = rounded(query, attention.query_quantizer), rounded(memory, attention.key_quantizer)
    weights = [
        rounded(getattr(attention, n), getattr(attention, f"{n}_quantizer"))
        for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    ]
    before_out, _ = F.multi_head_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), 8, 2, None, attention.in_proj_bias, None, None,
        False, 0.0, torch.eye(8), None, training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=weights[0], k_proj_weight=weights[1], v_proj_weight=weights[2],
    )  # fmt: skip
    out_proj = attention.out_proj
    expected = F.linear(
        rounded(before_out.transpose(0, 1), out_proj.input_quantizer),
        rounded(out_proj.weight, out_proj.weight_quantizer),
        out_proj.bias,
    )
    with torch.no_grad():
        out, _ = attention(query, memory, memory, need_weights=False)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-5)
    assert not torch.allclose(out, F.linear(before_out.transpose(0, 1), out_proj.weight, out_proj.bias), atol=1e-3)


def test_learned_scales_of_attention_get_gradients():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    apply_plan(attention, plan_quantization(attention, 4, learned_scale=True))
    x = torch.randn(2, 5, 8)
    attention(x, x, x)[0].sum().backward()  # the first batch initialises the scales from the observers
    attention.zero_grad()
    attention(x, x, x)[0].square().sum().backward()
    scales = {
        "in_proj_weight": attention.in_proj_weight_quantizer.scale,
        "query": attention.query_quantizer.scale,
        "out_proj.weight": attention.out_proj.weight_quantizer.scale,
        "out_proj.input": attention.out_proj.input_quantizer.scale,
    }
    for name, scale in scales.items():
        assert isinstance(scale, nn.Parameter) and scale.grad is not None and scale.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose1d(4, 6, 3, stride=2),
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
        nn.ConvTranspose3d(2, 3, 2),
    ],
)
def test_conv_transpose_with_rounding_off_is_the_float_layer(layer):
    stock = copy.deepcopy(layer)
    apply_plan(layer, plan_quantization(layer, 4, first_last_bits=None, learned_scale=False))
    for quantizer in quantizers(layer):
        quantizer.fake_quant_enabled = False
    spatial = len(layer.kernel_size)
    x = torch.randn(2, layer.in_channels, *([5] * spatial))
    output_size = [12] * spatial if spatial < 3 else None  # stride 2 allows 11 (the default) or 12 steps
    torch.testing.assert_close(layer(x, output_size), stock(x, output_size), rtol=0, atol=0)
    if output_size:
        assert layer(x, output_size).shape[2:] == (12,) * spatial


def test_per_channel_config_on_the_wrong_axis_is_refused():
    with pytest.raises(
        ValueError, match=r"ConvTranspose2d weights hold their output channels on axis 1.*channel_axis=0"
    ):
        fake_quantize_layer(nn.ConvTranspose2d(2, 3, 3), weight_config(4), None)


@pytest.mark.parametrize("options", [dict(), dict(kdim=5, vdim=6)], ids=["packed", "separate"])
def test_attention_state_dict_rebuilds_the_structure_and_restore_float_undoes_it(options):
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, **options))
    float_keys = set(model.state_dict())
    apply_plan(model, plan_quantization(model, 4, first_last_bits=None, learned_scale=False))
    with torch.no_grad():
        model.train()[1](
            torch.randn(5, 2, 8), torch.randn(3, 2, options.get("kdim", 8)), torch.randn(3, 2, options.get("vdim", 8))
        )
    state = model.state_dict()
    assert float_keys < set(state)  # the float keys are kept, the quantizers' added
    [entry] = [p for p in plan_from_state_dict(state) if p.name == "1"]
    assert entry.weight == model[1].out_proj.weight_quantizer.config and entry.activation.bits == 4

    fresh = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, **options))
    assert prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    assert isinstance(fresh[1], FakeQuantizedMultiheadAttention) and isinstance(fresh[1].out_proj, FakeQuantizedLayer)
    rebuilt, trained = fresh[1].quantized_weights(), model[1].quantized_weights()
    assert rebuilt.keys() == trained.keys() and all(torch.equal(rebuilt[k], trained[k]) for k in trained)

    params = dict(model.named_parameters())
    restore_float(model)
    assert (
        type(model[1]) is nn.MultiheadAttention
        and type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    )
    assert set(model.state_dict()) == float_keys and all(p is params[n] for n, p in model.named_parameters())


def test_transformer_encoder_runs_its_fake_quantized_layers_in_eval_mode_without_autograd():
    """torch's fused encoder kernel reads the float weights; a prepared encoder must not take it."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
    float_encoder = copy.deepcopy(encoder).eval()
    apply_plan(encoder, plan_quantization(encoder, 4, first_last_bits=None, learned_scale=False))
    x, padding = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -1] = True  # a padding mask is what sends the float encoder down its nested-tensor path
    encoder.train()(x, src_key_padding_mask=padding)
    encoder.eval()
    with_autograd = encoder(x, src_key_padding_mask=padding)  # grad enabled: torch's own path never fuses
    with torch.no_grad():
        without = encoder(x, src_key_padding_mask=padding)
        float_out = float_encoder(x, src_key_padding_mask=padding)
    torch.testing.assert_close(without, with_autograd.detach(), rtol=0, atol=0)
    assert (without - float_out).abs().max() > 1e-2  # on the 4-bit grids, not the float weights

    restore_float(encoder)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in encoder.layers)
    assert type(encoder.layers[0].self_attn) is nn.MultiheadAttention


def test_float_model_snapshot_calibrates_the_attention_weights():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.randn(2, 5, 8)
    snapshot = quantized_snapshot(model, 4, [x], forward=lambda m, inputs: m[0](inputs, inputs, inputs))
    attention = snapshot[0]
    assert attention.in_proj_weight_quantizer.calibrated and attention.query_quantizer.calibrated
    scale, _ = np_choose_qparams(*np_min_max(_np(model[0].in_proj_weight), 0), 4, symmetric=True)
    np.testing.assert_array_equal(_np(attention.in_proj_weight_quantizer.scale), scale)
