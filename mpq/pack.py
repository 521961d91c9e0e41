"""Packing integers into bytes, so sub-8-bit weights are small on disk.

A signed `b`-bit weight is narrow-range, k in [-(2^(b-1) - 1), 2^(b-1) - 1]: 2^b - 1 levels, not
2^b. Stored as digit d = k + 2^(b-1) - 1 in base L = 2^b - 1, `group` digits to a little-endian
integer of `nbytes` bytes (d_0 + d_1 L + d_2 L^2 + ...), which is denser than b bits each where
L^group fits in fewer than b * group bits:

    bits  levels  group  bytes  bits per weight
    2     3       5      1      1.6   (ternary: 5 trits in a byte, 3^5 = 243)
    3     7       17     6      2.82  (7^17 < 2^48)

Other widths, and unsigned values, are bit-packed: b bits each, little-endian within each value
and across the stream (value 0's bit 0 is the first byte's bit 0). A last, short group takes the
fewest bytes that hold its digits. `packed_size(n, b)` is the exact byte count either way.
`dense=False` is the plain bit packing for every width (model.mpq version 1 files).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "packed_size", "unpack"]

# bits -> (digits per group, bytes per group) where base-(2^b - 1) groups beat b bits per value
_GROUPS = {2: (5, 1), 3: (17, 6)}


def _group(bits: int, signed: bool, dense: bool) -> tuple[int, int] | None:
    return _GROUPS.get(bits) if signed and dense else None


def _bytes_for(digits: int, levels: int) -> int:
    """Fewest bytes whose values hold `digits` base-`levels` digits."""
    return -(-(levels ** digits - 1).bit_length() // 8)


def packed_size(count: int, bits: int, *, signed: bool = True, dense: bool = True) -> int:
    """Bytes that `count` values of `bits` bits take."""
    group = _group(bits, signed, dense)
    if group is None:
        return -(-count * bits // 8)
    digits, nbytes = group
    full, rest = divmod(count, digits)
    return full * nbytes + _bytes_for(rest, 2 ** bits - 1)


def _offset(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 0


def pack(values, bits: int, *, signed: bool = True, dense: bool = True) -> bytes:
    """Packs integers (any shape; flattened in C order) into `packed_size(n, bits)` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = np.asarray(values).reshape(-1).astype(np.int64) + _offset(bits, signed)
    limit = 2 ** bits - (2 if signed else 1)
    if v.size and (v.min() < 0 or v.max() > limit):
        raise ValueError(f"values out of the {bits}-bit {'signed narrow' if signed else 'unsigned'}"
                         f" range")
    group = _group(bits, signed, dense)
    if group is None:
        planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)     # (n, bits)
        return np.packbits(planes.reshape(-1), bitorder="little").tobytes()
    digits, nbytes = group
    levels = 2 ** bits - 1
    full, rest = divmod(v.size, digits)
    padded = np.zeros((full + (rest > 0)) * digits, dtype=np.int64)
    padded[:v.size] = v
    codes = padded.reshape(-1, digits) @ (levels ** np.arange(digits, dtype=np.int64))
    out = ((codes[:, None] >> (8 * np.arange(nbytes))) & 255).astype(np.uint8)
    return out.reshape(-1)[:packed_size(v.size, bits, signed=signed)].tobytes()


def unpack(data: bytes, bits: int, count: int, *, signed: bool = True,
           dense: bool = True) -> np.ndarray:
    """Inverse of `pack`: `count` integers (int64) from `data`."""
    expected = packed_size(count, bits, signed=signed, dense=dense)
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes for {count} values of {bits} bits, "
                         f"got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    group = _group(bits, signed, dense)
    if group is None:
        planes = np.unpackbits(raw, bitorder="little",
                               count=count * bits).reshape(count, bits).astype(np.int64)
        return (planes << np.arange(bits)).sum(1) - _offset(bits, signed)
    digits, nbytes = group
    levels = 2 ** bits - 1
    groups = -(-count // digits)
    padded = np.zeros(groups * nbytes, dtype=np.int64)
    padded[:raw.size] = raw
    codes = (padded.reshape(groups, nbytes) << (8 * np.arange(nbytes))).sum(1)
    if codes.size and codes.max() >= levels ** digits:
        raise ValueError(f"corrupt {bits}-bit data: a group's code exceeds {levels}^{digits}")
    values = (codes[:, None] // levels ** np.arange(digits, dtype=np.int64)) % levels
    values = values.reshape(-1)[:count]
    return values - _offset(bits, signed)
