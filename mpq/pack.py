"""Bit packing: b-bit integers stored in b bits each, so sub-8-bit weights are small on disk.

Signed narrow-range values k in [-(2^(b-1) - 1), 2^(b-1) - 1] are stored as k + 2^(b-1) - 1,
unsigned values as they are; bits are laid little-endian within each value and across the
stream (value 0's bit 0 is the first byte's bit 0). `packed_size(n, b)` = ceil(n * b / 8).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "packed_size", "unpack"]


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take."""
    return -(-count * bits // 8)


def _offset(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 0


def pack(values, bits: int, *, signed: bool = True) -> bytes:
    """Packs integers (any shape; flattened in C order) into `packed_size(n, bits)` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = np.asarray(values).reshape(-1).astype(np.int64) + _offset(bits, signed)
    limit = 2 ** bits - (2 if signed else 1)
    if v.size and (v.min() < 0 or v.max() > limit):
        raise ValueError(f"values out of the {bits}-bit {'signed narrow' if signed else 'unsigned'}"
                         f" range")
    planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)     # (n, bits)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes, bits: int, count: int, *, signed: bool = True) -> np.ndarray:
    """Inverse of `pack`: `count` integers (int64) from `data`."""
    if len(data) != packed_size(count, bits):
        raise ValueError(f"expected {packed_size(count, bits)} bytes for {count} values of "
                         f"{bits} bits, got {len(data)}")
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little",
                           count=count * bits).reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(1) - _offset(bits, signed)
