import numpy as np
import pytest

from mpq.pack import pack, packed_size, unpack
from mpq.quant import quant_range


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("count", [0, 1, 3, 5, 7, 8, 13, 17, 18, 35, 1001])
def test_round_trip_is_exact(bits, signed, dense, count):
    qmin, qmax = quant_range(bits, signed=signed)
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(qmin, qmax + 1, count)
    if count >= 2:
        values[:2] = [qmin, qmax]  # the extremes of the grid
    data = pack(values, bits, signed=signed, dense=dense)
    assert len(data) == packed_size(count, bits, signed=signed, dense=dense)
    assert np.array_equal(unpack(data, bits, count, signed=signed, dense=dense), values)


@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 13, 1001])
@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_takes_bits_per_value(bits, count):
    assert packed_size(count, bits, signed=False) == -(-count * bits // 8)
    assert packed_size(count, bits, dense=False) == -(-count * bits // 8)
    if bits >= 4:  # 2^b - 1 levels gain nothing over b bits here
        assert packed_size(count, bits) == -(-count * bits // 8)


def test_ternary_takes_five_weights_a_byte_and_3_bits_seventeen_in_six():
    assert packed_size(270_896, 2) == 54_180  # ResNet20's weights: 1.6 bits, not 2 (67,724 B)
    assert [packed_size(n, 2) for n in (1, 4, 5, 6, 10)] == [1, 1, 1, 2, 2]
    assert [packed_size(n, 3) for n in (1, 2, 17, 18, 34, 100)] == [1, 1, 6, 7, 12, 36]
    # the digits are little-endian base 3: d0 + 3 d1 + 9 d2 + ..., each digit k + 1
    assert pack([-1, 0, 1, 1, 1], 2) == bytes([0 + 1 * 3 + 2 * 9 + 2 * 27 + 2 * 81])
    assert pack([1, 1, 1, 1, 1], 2) == bytes([242])
    with pytest.raises(ValueError, match="corrupt 2-bit data"):
        unpack(bytes([243]), 2, 5)


def test_shape_is_flattened_in_c_order():
    values = np.arange(-3, 3).reshape(2, 3)
    assert np.array_equal(unpack(pack(values, 3), 3, 6), values.reshape(-1))


def test_out_of_range_and_wrong_length_are_refused():
    with pytest.raises(ValueError, match="out of the 4-bit"):
        pack([8], 4)  # narrow range: 4-bit signed stops at 7
    with pytest.raises(ValueError, match="out of the 2-bit"):
        pack([-2], 2)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack(b"\x00", 4, 3)
