"""Exact bit-allocation solve time: ResNet20 (22 layers) and a 54-layer problem (ResNet50-sized).

    python benchmarks/solver.py [--repeats 20]

Both use 7 weight bit choices (2..8) per layer; the byte budget is the uniform-4-bit size, and
each is solved again with a BOPs budget beside it (uniform W3A8's BOPs, so both bind), then with
activation bits chosen too (4 or 8 per layer: 14 (weights, activation) pairs per layer, one
integer programme). ResNet20 uses its real layer shapes and MACs with a stand-in sensitivity
(the solve time does not depend on the values); the 54 layers get random MACs.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.allocate import solve, solve_within  # noqa: E402
from mpq.budgets import Bops, Limits, act_key  # noqa: E402
from mpq.models import build_model  # noqa: E402
from mpq.quant import prepare_qat, quantizable_layers, uniform_plan  # noqa: E402
from mpq.size import Footprint, LayerShape  # noqa: E402

BITS = [2, 3, 4, 5, 6, 7, 8]


def omega_for(shapes, rng):
    return {n: dict(zip(BITS, sorted((rng.random() * 10 ** rng.uniform(-3, 2) for _ in BITS),
                                     reverse=True))) for n in shapes}


def with_activations(omega, rng):
    """`omega` plus a stand-in activation perturbation at 4 and 8 bits per layer."""
    layers = list(omega)
    return {**omega, **{act_key(n): {4: rng.random() * 10, 8: rng.random() * 0.1}
                        for n in layers}}


def timed(omega, footprint, repeats, bops=None):
    budget = footprint.smallest([4])
    limits = None
    if bops is not None:
        a_bits = dict.fromkeys(footprint.shapes, 8)
        limits = Limits(footprint, budget, a_bits, bops,
                        bops.total(dict.fromkeys(footprint.shapes, 3), a_bits))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        alloc = (solve(omega, footprint, budget_bytes=budget) if limits is None else
                 solve_within(omega, limits))
        times.append(time.perf_counter() - start)
    if limits is not None:
        assert limits.fits(alloc.bits)
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
    resnet20_bops = Bops.of(model, list(resnet20.shapes), (torch.zeros(1, 3, 32, 32),))
    big = {f"l{i}": LayerShape(rng.randint(1000, 2_400_000), rng.choice([64, 256, 1024]), True)
           for i in range(54)}
    big_bops = Bops({n: rng.randint(10**6, 10**8) for n in big})
    print(f"{'problem':28s} {'layers':>6s} {'choices':>8s} {'budgets':>13s} {'median ms':>10s}")
    for name, (om, fp, bops) in {
            "ResNet20": (omega_for(resnet20.shapes, rng), resnet20, resnet20_bops),
            "54 layers (ResNet50-sized)": (omega_for(big, rng), Footprint(big), big_bops)}.items():
        for budgets, counted, table, pairs in (
                ("bytes", None, om, len(BITS)), ("bytes + BOPs", bops, om, len(BITS)),
                ("bytes + BOPs", bops, with_activations(om, rng), 2 * len(BITS))):
            ms = timed(table, fp, args.repeats, counted) * 1e3
            print(f"{name:28s} {len(fp.shapes):6d} {pairs:8d} {budgets:>13s} {ms:10.1f}")


if __name__ == "__main__":
    main()
