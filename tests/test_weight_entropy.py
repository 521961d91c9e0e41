"""benchmarks/weight_entropy.py: what an entropy coder would free in a model.mpq file."""

import sys

import numpy as np

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from weight_entropy import entropy_bytes, measure  # noqa: E402


def test_entropy_bytes_is_order_zero_entropy():
    assert entropy_bytes(np.zeros(100, dtype=np.int64)) == 0.0
    assert entropy_bytes(np.tile(np.arange(4), 16)) == 64 * 2 / 8  # four equal values: 2 bits
    # p = (3/4, 1/4): 0.811 bits each
    h = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert abs(entropy_bytes(np.array([0, 0, 0, 1] * 8)) - 32 * h / 8) < 1e-9


def test_entropy_of_a_committed_model_is_below_its_stored_weights():
    # Ternary weights packed five to a byte (1.6 bits) against log2(3) = 1.585 bits at most:
    # entropy per channel <= per layer <= stored, and the weights are most of the file.
    m = measure(ROOT / "checkpoints/resnet20_cifar10/qat_w2/model.mpq")
    assert m["per_channel"] <= m["per_layer"] <= m["stored"] * np.log2(3) / 1.6 + 1e-6
    assert 0.8 * m["file"] < m["stored"] < m["file"]
    assert 0 < m["lzma"] < m["file"]
