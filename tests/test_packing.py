"""Packed low-bit weight files: the bit layout, round trips and the file's contents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qat_lightning import SmallCNN
from qat_lightning.convert import load_packed_weights, pack_codes, save_packed_weights, unpack_codes
from qat_lightning.convert.packing import container_bits, packed_size
from qat_lightning.nn import apply_plan, fake_quantized_layers, plan_quantization


def _np_pack(codes: np.ndarray, width: int) -> np.ndarray:
    """Reference: little end first, each code stored as ``code + 2**(width-1)`` in ``width`` bits."""
    per_byte = 8 // width
    unsigned = codes.astype(np.int64) + 2 ** (width - 1)
    unsigned = np.concatenate([unsigned, np.zeros((-len(unsigned)) % per_byte, dtype=np.int64)])
    rows = unsigned.reshape(-1, per_byte)
    return sum(rows[:, i] << (i * width) for i in range(per_byte)).astype(np.uint8)


def test_known_bytes() -> None:
    # 4 bits: -8 -> 0x0 (low nibble), 7 -> 0xF (high nibble); 2 bits: -2,-1,0,1 -> 0,1,2,3
    assert pack_codes(torch.tensor([-8, 7]), 4).tolist() == [0xF0]
    assert pack_codes(torch.tensor([-2, -1, 0, 1]), 2).tolist() == [0b11100100]
    assert pack_codes(torch.tensor([-2, 1, 0]), 2).tolist() == [0b101100]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_matches_numpy_and_round_trips(bits: int, data: st.DataObject) -> None:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = data.draw(st.lists(st.integers(low, high), min_size=0, max_size=50))
    codes = torch.tensor(values, dtype=torch.int32)

    packed = pack_codes(codes, bits)

    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(values), bits)
    np.testing.assert_array_equal(packed.numpy(), _np_pack(np.array(values, dtype=np.int64), container_bits(bits)))
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)


def test_codes_outside_the_grid_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\] to pack at 4 bits"):
        pack_codes(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="at most 8"):
        container_bits(9)


def _fake_quant_cnn(bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    apply_plan(model, plan_quantization(model, bits, first_last_bits=None))  # every layer at `bits`
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_file_reloads_the_exact_trained_weights(bits: int, tmp_path) -> None:
    model = _fake_quant_cnn(bits)
    path = save_packed_weights(model, tmp_path / "w.packed.pt")

    state = load_packed_weights(path)
    float_model = SmallCNN()
    float_model.load_state_dict(state)  # strict: exactly the float model's keys

    for name, layer in fake_quantized_layers(model):
        assert torch.equal(float_model.get_submodule(name).weight, layer.quantized_weight())
    for key in ("features.1.running_var", "features.1.num_batches_tracked", "classifier.bias"):
        assert torch.equal(state[key], model.state_dict()[key])
    codes_bytes = sum(packed_size(layer.weight.numel(), bits) for _, layer in fake_quantized_layers(model))
    raw = torch.load(path, weights_only=True)
    assert raw["banks"]["codes"].numel() == codes_bytes


def test_low_bit_files_are_smaller(tmp_path) -> None:
    sizes = {b: save_packed_weights(_fake_quant_cnn(b), tmp_path / f"{b}.pt").stat().st_size for b in (2, 4, 8)}
    assert sizes[2] < sizes[4] < sizes[8]


def test_other_files_are_rejected(tmp_path) -> None:
    torch.save({"weight": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not a packed weight file"):
        load_packed_weights(tmp_path / "state.pt")
