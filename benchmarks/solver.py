"""Exact bit-allocation solve time: ResNet20 (22 layers) and a 54-layer problem (ResNet50-sized).

    python benchmarks/solver.py [--repeats 20]

Both use 7 weight bit choices (2..8) per layer; the byte budget is the uniform-4-bit size, and
each is solved again with a BOPs budget beside it (uniform W3A8's BOPs, so both bind), then with
activation bits chosen too (4 or 8 per layer: 14 (weights, activation) pairs per layer, one
integer programme), then with a latency budget as well (a stand-in `mpq.latency` table: 0 to
0.08 ms per narrow input over a 0.34 ms base, ResNet20's order of magnitude in ONNX Runtime at
batch 1; the budget a quarter of the way from the base to every input narrow, where it binds).
ResNet20 uses its real layer shapes and MACs with a stand-in sensitivity (the solve time does
not depend on the values); the 54 layers get random MACs. The last column times
`tightest_budget`, the check that refuses budgets no plan meets together before any work (one
programme per budget).
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.allocate import solve, solve_within, tightest_budget  # noqa: E402
from mpq.budgets import Bops, Limits, act_key  # noqa: E402
from mpq.latency import LatencyTable  # noqa: E402
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


def stand_in_table(layers, rng) -> LatencyTable:
    return LatencyTable(runtime="onnxruntime", batch=1, threads=1, cpu="stand-in", base_ms=0.34,
                        narrow_ms={n: rng.uniform(0, 0.08) for n in layers}, narrow_bits=4)


def timed(omega, footprint, repeats, bops=None, latency=None):
    """Median seconds of the solve and of `tightest_budget` (None with bytes alone)."""
    budget = footprint.smallest([4])
    limits = None
    if bops is not None:
        a_bits = dict.fromkeys(footprint.shapes, 8)
        max_ms = None if latency is None else latency.base_ms + sum(latency.narrow_ms.values()) / 4
        limits = Limits(footprint, budget, a_bits, bops,
                        bops.total(dict.fromkeys(footprint.shapes, 3), a_bits), latency, max_ms)
    widths = {k: sorted(v) for k, v in omega.items()}
    times, checks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        alloc = (solve(omega, footprint, budget_bytes=budget) if limits is None else
                 solve_within(omega, limits))
        times.append(time.perf_counter() - start)
        if limits is not None:
            start = time.perf_counter()
            assert tightest_budget(widths, limits) is None
            checks.append(time.perf_counter() - start)
    if limits is not None:
        assert limits.fits(alloc.bits)
    return statistics.median(times), statistics.median(checks) if checks else None


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
    print(f"{'problem':28s} {'layers':>6s} {'choices':>8s} {'budgets':>23s} {'solve ms':>9s} "
          f"{'check ms':>9s}")
    for name, (om, fp, bops) in {
            "ResNet20": (omega_for(resnet20.shapes, rng), resnet20, resnet20_bops),
            "54 layers (ResNet50-sized)": (omega_for(big, rng), Footprint(big), big_bops)}.items():
        both = with_activations(om, rng)
        for budgets, counted, table, pairs, latency in (
                ("bytes", None, om, len(BITS), None), ("bytes + BOPs", bops, om, len(BITS), None),
                ("bytes + BOPs", bops, both, 2 * len(BITS), None),
                ("bytes + BOPs + latency", bops, both, 2 * len(BITS),
                 stand_in_table(fp.shapes, rng))):
            solve_s, check_s = timed(table, fp, args.repeats, counted, latency)
            check = f"{check_s * 1e3:9.1f}" if check_s is not None else f"{'-':>9s}"
            print(f"{name:28s} {len(fp.shapes):6d} {pairs:8d} {budgets:>23s} "
                  f"{solve_s * 1e3:9.1f} {check}")


if __name__ == "__main__":
    main()
