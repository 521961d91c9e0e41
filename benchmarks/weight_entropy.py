"""What entropy coding would save on a model.mpq file: is its size budget worth a coder?

    python benchmarks/weight_entropy.py [MODEL.mpq ...]

By default the committed 13x, 16x and ternary models. For each file: its bytes, the bytes its
quantized weights take as stored (`mpq.pack`), the order-0 entropy of those integers counted
per layer and per output channel (what an ideal Huffman or arithmetic coder with a free code
table would need), and what lzma at its strongest setting makes of the whole file. A weight
grid that is well used leaves a coder little to take; the bytes freed are what the search
could spend on more bits under the same budget.
"""

from __future__ import annotations

import argparse
import lzma
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.export.mpqfile import int_weight, load_mpq  # noqa: E402
from mpq.mpqformat import stored_parts  # noqa: E402
from mpq.pack import packed_size  # noqa: E402

DEFAULT = [ROOT / "checkpoints/resnet20_cifar10" / row / "model.mpq"
           for row in ("mpq_13x", "mpq_16x", "qat_w2")]


def entropy_bytes(values: np.ndarray) -> float:
    """Order-0 entropy of integers, in bytes: sum over values of -log2 p(value) / 8."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def measure(path: Path) -> dict:
    qmodel, _ = load_mpq(path)
    layers, _, _ = stored_parts(qmodel)
    stored = per_layer = per_channel = 0.0
    for layer in layers.values():
        if layer.w_bits is None:
            continue
        k, _ = int_weight(layer)
        k = k.numpy().astype(np.int64)
        stored += packed_size(k.size, layer.w_bits)
        per_layer += entropy_bytes(k.ravel())
        per_channel += sum(entropy_bytes(row.ravel()) for row in k)
    raw = path.read_bytes()
    return {"file": len(raw), "stored": stored, "per_layer": per_layer,
            "per_channel": per_channel,
            "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", type=Path, default=DEFAULT)
    args = p.parse_args()
    for path in args.models:
        if not path.is_file():
            p.error(f"{path} does not exist; pass model.mpq files")
    for path in args.models:
        m = measure(path)
        saved = m["stored"] - m["per_channel"]
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
              f"{m['file']:,} B on disk, weights {m['stored']:,.0f} B as stored; "
              f"order-0 entropy {m['per_layer']:,.0f} B per layer, "
              f"{m['per_channel']:,.0f} B per channel "
              f"(saves {saved:,.0f} B, {100 * saved / m['file']:.1f}% of the file); "
              f"lzma -9e of the file {m['lzma']:,} B "
              f"({100 * (m['file'] - m['lzma']) / m['file']:.1f}% smaller)", flush=True)


if __name__ == "__main__":
    main()
