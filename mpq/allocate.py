"""Bit allocation: the plan of least Hessian-weighted perturbation under a size budget, exactly.

Each quantizable layer i at weight bits b costs its `Footprint` bytes and perturbs the loss by about

    Omega_i(b) = s_i / n_i * ||Q_b(W_i) - W_i||^2        (HAWQ-V2/V3)

with s_i the Hessian trace of the layer's block (or n_i times its top eigenvalue, the
`eigenvalue` variant) and Q_b per-channel symmetric quantization with MSE-optimal clipping, as
QAT starts from. Choosing one b per layer to minimise sum Omega subject to sum bytes <= budget
is a multiple-choice knapsack, solved exactly as an integer programme by HiGHS through
`scipy.optimize.milp`. `solve_within` adds a BOPs budget and activation bits (`mpq.budgets`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .budgets import ACT, Limits, act_key
from .errors import UsageError
from .quant.plan import Plan
from .quant.primitives import mse_optimal_scale, weight_range
from .size import Footprint

__all__ = ["Allocation", "parse_budget", "pareto_front", "perturbations", "plan_for_budget",
           "solve", "solve_within"]

_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}


def parse_budget(text: str, *, fp32_bytes: int) -> int:
    """Bytes from `120KB`, `0.1MiB`, `250000`, or a compression ratio `13x` of `fp32_bytes`;
    anything not positive, not finite, under a byte or a ratio under 1x is a `UsageError`. A
    budget in bytes at or above FP32 is allowed (the search then gives every layer 8 bits)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m:
        raise UsageError(f"budget {text!r} is not understood; give bytes with a unit "
                         f"(120KB, 0.1MiB, 250000) or a compression ratio (13x)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS and unit not in ("", "x"):
        raise UsageError(f"budget unit {m.group(2)!r} is not one of B, KB, MB, GB, KiB, MiB, "
                         f"GiB or x")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"budget {text!r} must be a positive, finite number of bytes or a "
                         f"ratio (13x)")
    bytes_ = fp32_bytes / value if unit == "x" else value * _UNITS.get(unit, 1)
    if bytes_ < 1:
        raise UsageError(f"budget {text!r} is under one byte; the FP32 model has {fp32_bytes} "
                         f"bytes")
    if unit == "x" and value < 1:
        raise UsageError(f"budget {text!r} asks for a model larger than FP32 ({fp32_bytes} "
                         f"bytes); a ratio is FP32 size / budget: ask for 1x or more (13x)")
    return math.floor(bytes_)


@torch.no_grad()
def perturbations(model: nn.Module, sensitivity: dict, bit_choices, *,
                  metric: str = "trace") -> dict[str, dict[int, float]]:
    """Omega_i(b) for each layer named in `sensitivity` and each b in `bit_choices`."""
    out = {}
    for name, s in sensitivity.items():
        w = model.get_submodule(name).weight.detach()
        s = s if isinstance(s, dict) else s.to_dict()
        weight = s["trace"] / w.numel() if metric == "trace" else s["top_eigenvalue"]
        out[name] = {}
        for b in bit_choices:
            qmin, qmax = weight_range(b)
            scale = mse_optimal_scale(w, qmin, qmax, dim=0)
            q = torch.clamp(torch.round(w / scale), qmin, qmax) * scale
            out[name][b] = weight * (q - w).pow(2).sum().item()
        if not all(math.isfinite(v) for v in out[name].values()):
            raise UsageError(f"layer {name}: its quantization error is not finite (largest "
                             f"|weight| {w.abs().max().item():.3g}, Hessian trace "
                             f"{s['trace']:.3g}); the model's training diverged: retrain it")
    return out


@dataclass
class Allocation:
    """A solved allocation: bits per layer, its size and objective."""

    bits: dict[str, int]
    size_bytes: int
    objective: float

    def plan(self, model_name: str, *, a_bits: int | None = 8, budget_bytes: int | None = None,
             extra: dict | None = None) -> Plan:
        return Plan(model=model_name,
                    layers={n: {"w_bits": b, "a_bits": a_bits} for n, b in self.bits.items()},
                    extra={"size_bytes": self.size_bytes, "budget_bytes": budget_bytes,
                           "objective": self.objective, **(extra or {})})


@contextlib.contextmanager
def _native_stdout_silenced():
    """Sends what native code writes to file descriptor 1 to /dev/null meanwhile (Python's own
    prints are flushed first and unaffected afterwards)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (an embedding host): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve(omega: dict[str, dict[int, float]], footprint: Footprint, *,
          budget_bytes: int) -> Allocation:
    """Minimises sum Omega_i(b_i) subject to the stored size <= `budget_bytes`, exactly
    (`solve_within` with bytes alone; it takes BOPs and activation bits too).

    Args:
        omega: per layer, the perturbation at each allowed bit width.
        footprint: the model's sizes (`mpq.size.Footprint`).
        budget_bytes: the whole model's budget, the footprint's fixed bytes included.
    """
    smallest = footprint.smallest(omega)
    if budget_bytes < smallest:
        raise UsageError(f"budget {budget_bytes} bytes ({budget_bytes / 1000:.1f}KB) is below "
                         f"the smallest possible size {smallest} bytes ({smallest / 1000:.1f}KB,"
                         f" every layer at its fewest bits)")
    return solve_within(omega, Limits(footprint, budget_bytes))


def solve_within(omega: dict[str, dict[int, float]], limits: Limits) -> Allocation:
    """The plan of least summed perturbation that meets every budget of `limits`, exactly.

    `omega` has a key per layer (its weight widths) and, where the search chooses them,
    `act_key(layer)` (its input activation's widths, `mpq.hessian.activation`); each layer then
    picks one (weights, activation) pair, whose BOPs are their product, so both kinds of bits
    are chosen in one integer programme."""
    options, coefficients = _pairs(omega, limits)
    rows = [({n: {p: c[k] for p, c in pairs.items()} for n, pairs in coefficients.items()},
             limit - limits.fixed()[k]) for k, limit in limits.budgets().items()]
    picked = _multiple_choice(options, rows)
    bits = {}
    for n, (w, a) in picked.items():
        bits[n] = w
        if a is not None:
            bits[act_key(n)] = a
    return Allocation(bits, limits.usage(bits)["bytes"],
                      float(sum(options[n][pair] for n, pair in picked.items())))


def _pairs(omega: dict[str, dict[int, float]], limits: Limits) -> tuple[dict, dict]:
    """Per layer, each (weight bits, activation bits) pair's perturbation, and its share of
    every budget of `limits` (`Limits.layer_costs`); the activation is None where the search
    does not choose it."""
    options, coefficients = {}, {}
    for n in (n for n in omega if not n.endswith(ACT)):
        acts = sorted(omega[act_key(n)]) if act_key(n) in omega else [None]
        options[n] = {(w, a): omega[n][w] + (omega[act_key(n)][a] if a is not None else 0)
                      for w in sorted(omega[n]) for a in acts}
        coefficients[n] = {(w, a): limits.layer_costs(n, w, a) for w, a in options[n]}
    return options, coefficients


def tightest_budget(widths: dict[str, list[int]], limits: Limits) -> tuple[str, float] | None:
    """None when some plan over `widths` (per key, as `omega` would have them) meets every
    budget of `limits`; else the budget that binds hardest, with the least figure it can reach
    while the others hold (its own minimum if no plan meets the others either). Exact: one
    small integer programme per budget, no sensitivity needed, so it runs before any work."""
    zero = {k: dict.fromkeys(v, 0.0) for k, v in widths.items()}
    options, coefficients = _pairs(zero, limits)
    budgets, fixed = limits.budgets(), limits.fixed()
    if len(budgets) == 1:  # bytes alone: the floor is every layer at its fewest bits
        least = fixed["bytes"] + sum(min(c["bytes"] for c in pairs.values())
                                     for pairs in coefficients.values())
        return None if least <= budgets["bytes"] else ("bytes", least)
    short = {}
    for k in budgets:
        cost = {n: {p: c[k] for p, c in pairs.items()} for n, pairs in coefficients.items()}
        others = [({n: {p: c[j] for p, c in pairs.items()} for n, pairs in coefficients.items()},
                   budgets[j] - fixed[j]) for j in budgets if j != k]
        try:
            picked = _multiple_choice(cost, others)
        except UsageError:  # the others alone cannot be met: this budget's own floor
            picked = _multiple_choice(cost, [])
        least = fixed[k] + sum(cost[n][p] for n, p in picked.items())
        if least > budgets[k] * (1 + 1e-12):
            short[k] = least
    if not short:
        return None
    worst = max(short, key=lambda k: short[k] / budgets[k])
    return worst, short[worst]


def _multiple_choice(options: dict[str, dict], rows: list) -> dict:
    """One option per layer minimising the summed cost, `options[layer][option]`, subject to
    each row `(coefficients[layer][option], upper)`: sum of the chosen coefficients <= upper.
    Exact: an integer programme solved by HiGHS through `scipy.optimize.milp`."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(options)
    choices = [(n, o) for n in names for o in options[n]]
    cost = np.array([options[n][o] for n, o in choices], dtype=float)
    one_per_layer = np.zeros((len(names), len(choices)))
    for j, (n, _) in enumerate(choices):
        one_per_layer[names.index(n), j] = 1
    constraints = [LinearConstraint(one_per_layer, 1, 1)]
    for coefficients, upper in rows:
        constraints.append(LinearConstraint(
            np.array([[coefficients[n][o] for n, o in choices]], dtype=float), -np.inf, upper))
    with _native_stdout_silenced():  # HiGHS prints solver chatter from C on some models
        result = milp(cost, integrality=np.ones(len(choices)), bounds=Bounds(0, 1),
                      constraints=constraints, options={"mip_rel_gap": 0})
    if result.x is None:
        raise UsageError(f"no plan satisfies the constraints ({result.message})")
    picked = dict(choices[j] for j in np.flatnonzero(result.x > 0.5))
    return {n: picked[n] for n in names}


def pareto_front(omega, footprint: Footprint, *, points: int = 25) -> list[Allocation]:
    """Optimal allocations at `points` budgets from the smallest to the largest size."""
    lo, hi = footprint.smallest(omega), footprint.largest(omega)
    front, seen = [], set()
    for budget in np.linspace(lo, hi, points):
        alloc = solve(omega, footprint, budget_bytes=int(budget))
        key = tuple(alloc.bits.values())
        if key not in seen:
            seen.add(key)
            front.append(alloc)
    return front


def plan_for_budget(model: nn.Module, sensitivity: dict, budget: str | int, *,
                    example_inputs: tuple, model_name: str = "model",
                    bit_choices=(2, 3, 4, 5, 6, 7, 8), a_bits: int | None = 8,
                    metric: str = "trace", meta: dict | None = None) -> Plan:
    """The allocation stage in one call: the exactly optimal plan for `budget`.

    Args:
        model: the FP32 model (eval mode).
        sensitivity: `layer_sensitivity`'s result for it.
        budget: bytes, or text such as `120KB` or `13x` (of the FP32 parameter bytes).
        example_inputs: inputs for one forward pass (tracing).
        model_name: recorded in the plan.
        bit_choices: weight bit widths allowed.
        a_bits: activation bits of every layer.
        metric: `trace` or `eigenvalue` (see `perturbations`).
        meta: `model`, `input_size`, `normalization`: with it, sizes are those of the exported
            `model.mpq` file, header included, so the budget holds on disk.
    """
    from .quant.plan import uniform_plan
    from .quant.prepare import prepare_qat
    from .size import fp32_parameter_bytes

    budget_bytes = parse_budget(budget, fp32_bytes=fp32_parameter_bytes(model))
    q8 = prepare_qat(model, uniform_plan(model_name, list(sensitivity), w_bits=8,
                                         a_bits=a_bits), example_inputs=example_inputs)
    omega = perturbations(model, sensitivity, list(bit_choices), metric=metric)
    alloc = solve(omega, Footprint.of(q8, meta), budget_bytes=budget_bytes)
    return alloc.plan(model_name, a_bits=a_bits, budget_bytes=budget_bytes)
