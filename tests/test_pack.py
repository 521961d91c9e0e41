import numpy as np
import pytest

from mpq.pack import pack, packed_size, unpack
from mpq.quant import quant_range


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 13, 1001])
def test_round_trip_is_exact_and_takes_bits_per_value(bits, signed, count):
    qmin, qmax = quant_range(bits, signed=signed)
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(qmin, qmax + 1, count)
    if count >= 2:
        values[:2] = [qmin, qmax]  # the extremes of the grid
    data = pack(values, bits, signed=signed)
    assert len(data) == packed_size(count, bits) == -(-count * bits // 8)
    assert np.array_equal(unpack(data, bits, count, signed=signed), values)


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
