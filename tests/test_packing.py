"""2-bit packing: round trips, the exact bit layout, and compatibility with stock transformers' unpacker."""

import pytest
import torch
from transformers.integrations.bitnet import unpack_weights

from bitconvert.packing import pack_ternary, packed_rows, unpack_ternary


@pytest.mark.parametrize("out_features", [1, 2, 3, 4, 5, 13, 64, 67])
@pytest.mark.parametrize("in_features", [1, 7, 64])
def test_round_trip_any_shape(out_features, in_features):
    torch.manual_seed(out_features * 100 + in_features)
    ternary = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
    packed = pack_ternary(ternary)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_rows(out_features), in_features)
    assert torch.equal(unpack_ternary(packed, out_features), ternary)


def test_bit_layout_by_hand():
    # out = 8 rows, R = 2: row i*2 + r sits in bits 2i of packed row r; codes are w + 1.
    ternary = torch.tensor([[-1], [0], [1], [1], [0], [-1], [1], [0]], dtype=torch.int8)
    codes = [int(value) + 1 for value in ternary.flatten()]  # [0, 1, 2, 2, 1, 0, 2, 1]
    expected_row0 = codes[0] | codes[2] << 2 | codes[4] << 4 | codes[6] << 6
    expected_row1 = codes[1] | codes[3] << 2 | codes[5] << 4 | codes[7] << 6
    assert pack_ternary(ternary).flatten().tolist() == [expected_row0, expected_row1]
    assert [expected_row0, expected_row1] == [0b10_01_10_00, 0b01_00_10_01]


def test_padding_rows_hold_zero_weights():
    packed = pack_ternary(torch.full((5, 3), -1, dtype=torch.int8))  # 8 slots, rows 5..7 are padding
    assert torch.equal(unpack_ternary(packed, 8)[5:], torch.zeros(3, 3, dtype=torch.int8))


def test_stock_transformers_unpacks_our_layout():
    torch.manual_seed(0)
    ternary = torch.randint(-1, 2, (64, 40), dtype=torch.int8)
    assert torch.equal(unpack_weights(pack_ternary(ternary), dtype=torch.int8), ternary)


def test_rejects_non_ternary_values_and_wrong_shapes():
    with pytest.raises(ValueError, match="values in"):
        pack_ternary(torch.tensor([[2, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="rows"):
        unpack_ternary(torch.zeros((3, 4), dtype=torch.uint8), out_features=4)
