import itertools
import math
import os
import random

import pytest
import torch

from mpq.allocate import parse_budget, pareto_front, perturbations, solve
from mpq.errors import UsageError
from mpq.hessian import LayerSensitivity
from mpq.models import build_model
from mpq.quant import prepare_qat, quantizable_layers, uniform_plan
from mpq.size import Footprint, LayerShape, weight_bytes


def random_instance(rng, layers, bits):
    shapes = {f"l{i}": LayerShape(rng.randint(10, 5000), rng.randint(1, 64), rng.random() < 0.7)
              for i in range(layers)}
    omega = {}
    for name in shapes:  # decreasing in bits, as quantization error is
        values = sorted((rng.random() * 10 ** rng.uniform(-3, 2) for _ in bits), reverse=True)
        omega[name] = dict(zip(bits, values))
    return omega, shapes


@pytest.mark.parametrize("seed", range(12))
def test_solver_equals_brute_force(seed):
    rng = random.Random(seed)
    bits = rng.sample([2, 3, 4, 5, 6, 8], 3)
    omega, shapes = random_instance(rng, 5, bits)
    footprint = Footprint(shapes, rng.randint(0, 500))
    sizes = lambda combo: footprint.bytes(dict(zip(shapes, combo)))  # noqa: E731
    all_combos = list(itertools.product(*(sorted(omega[n]) for n in shapes)))
    lo, hi = min(map(sizes, all_combos)), max(map(sizes, all_combos))
    budget = rng.randint(lo, hi)
    best = min((c for c in all_combos if sizes(c) <= budget),
               key=lambda c: sum(omega[n][b] for n, b in zip(shapes, c)))
    got = solve(omega, footprint, budget_bytes=budget)
    assert got.size_bytes <= budget
    assert got.objective == pytest.approx(sum(omega[n][b] for n, b in zip(shapes, best)),
                                          rel=1e-9)


def test_budget_below_smallest_names_it():
    omega, shapes = random_instance(random.Random(0), 3, [2, 4])
    with pytest.raises(UsageError, match="below the smallest possible size"):
        solve(omega, Footprint(shapes), budget_bytes=10)


def test_pareto_front_is_monotone():
    omega, shapes = random_instance(random.Random(1), 6, [2, 4, 8])
    front = pareto_front(omega, Footprint(shapes), points=15)
    sizes = [a.size_bytes for a in front]
    objectives = [a.objective for a in front]
    assert sizes == sorted(sizes) and objectives == sorted(objectives, reverse=True)


@pytest.mark.parametrize("text, expected", [
    ("120KB", 120_000), ("0.1MiB", 104_857), ("250000", 250_000), ("2kib", 2048),
    ("13x", 1000 // 13), ("8X", 125)])
def test_parse_budget(text, expected):
    assert parse_budget(text, fp32_bytes=1000) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-3KB", "0x"])
def test_parse_budget_rejects(text):
    with pytest.raises(UsageError):
        parse_budget(text, fp32_bytes=1000)


def test_plan_size_equals_the_size_of_the_prepared_model():
    model = build_model("resnet20").eval()
    names = quantizable_layers(model)
    q8 = prepare_qat(model, uniform_plan("resnet20", names, w_bits=8),
                     example_inputs=(torch.zeros(1, 3, 32, 32),))
    footprint = Footprint.of(q8)
    sens = {n: LayerSensitivity(1.0 + i, 0, 1.0, 0, "exact", 0,
                                model.get_submodule(n).weight.numel())
            for i, n in enumerate(names)}
    omega = perturbations(model, sens, [2, 4, 8])
    alloc = solve(omega, footprint, budget_bytes=int(weight_bytes(q8) / 1.8))
    plan = alloc.plan("resnet20", budget_bytes=int(weight_bytes(q8) / 1.8))
    qplan = prepare_qat(model, plan, example_inputs=(torch.zeros(1, 3, 32, 32),))
    assert weight_bytes(qplan) == alloc.size_bytes == plan.extra["size_bytes"]
    assert len(set(alloc.bits.values())) > 1  # a real mixed-precision answer


def test_native_solver_chatter_is_silenced_and_stdout_restored(capfd):
    from mpq.allocate import _native_stdout_silenced

    print("before", flush=True)
    with _native_stdout_silenced():
        os.write(1, b"HighsMipSolverData chatter\n")  # what a C library writes to fd 1
    print("after", flush=True)
    assert capfd.readouterr().out == "before\nafter\n"


def test_a_diverged_layer_is_named_before_the_solver_sees_an_infinite_cost():
    """A teacher whose weights reached 1e30 (oneDNN's bf16 conv gradient once did that) gave the
    MILP an infinite cost and a scipy ValueError; the layer is named instead."""
    model = build_model("resnet20", num_classes=4)
    names = quantizable_layers(model)
    sens = {n: {"trace": 1.0, "top_eigenvalue": 1.0} for n in names}
    finite = perturbations(model, sens, [2, 8])
    assert all(all(map(math.isfinite, v.values())) for v in finite.values())
    with torch.no_grad():
        model.get_submodule(names[3]).weight.mul_(1e30)
    with pytest.raises(UsageError, match=rf"layer {names[3]}: its quantization error is not finite"):
        perturbations(model, sens, [2, 4, 8])
