"""Exact bit-allocation solve time: ResNet20 (22 layers) and a 54-layer problem (ResNet50-sized).

    python benchmarks/solver.py [--repeats 20]

Both use 7 bit choices (2..8) per layer; the budget is the uniform-4-bit size. ResNet20 uses its
real layer shapes with a stand-in sensitivity (the solve time does not depend on the values).
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.allocate import solve  # noqa: E402
from mpq.models import build_model  # noqa: E402
from mpq.quant import prepare_qat, quantizable_layers, uniform_plan  # noqa: E402
from mpq.size import Footprint, LayerShape  # noqa: E402

BITS = [2, 3, 4, 5, 6, 7, 8]


def omega_for(shapes, rng):
    return {n: dict(zip(BITS, sorted((rng.random() * 10 ** rng.uniform(-3, 2) for _ in BITS),
                                     reverse=True))) for n in shapes}


def timed(omega, footprint, repeats):
    budget = footprint.smallest([4])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solve(omega, footprint, budget_bytes=budget)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(0)
    model = build_model("resnet20").eval()
    q = prepare_qat(model, uniform_plan("resnet20", quantizable_layers(model), w_bits=8),
                    example_inputs=(torch.zeros(1, 3, 32, 32),))
    resnet20 = Footprint.of(q)
    big = {f"l{i}": LayerShape(rng.randint(1000, 2_400_000), rng.choice([64, 256, 1024]), True)
           for i in range(54)}
    print(f"{'problem':28s} {'layers':>6s} {'choices':>8s} {'median ms':>10s}")
    for name, (om, fp) in {"ResNet20": (omega_for(resnet20.shapes, rng), resnet20),
                           "54 layers (ResNet50-sized)": (omega_for(big, rng),
                                                          Footprint(big))}.items():
        ms = timed(om, fp, args.repeats) * 1e3
        print(f"{name:28s} {len(fp.shapes):6d} {len(BITS):8d} {ms:10.1f}")


if __name__ == "__main__":
    main()
