"""Moves between plans of one budget, and the local search that may end the study
(`search.polish_evaluations`; README, "Searching a plan for a budget", for what it gains).

The Optuna study samples plans around the solver's, and its best plan after a few dozen trials
still depends on the sampler's path. `polish` then walks from the best plan to a local optimum
of the measured score: it scores the plans one bit step away (a layer up and the others repaired
to fit the budget, or a layer down and the freed bytes spent), those the perturbation table
ranks best first, and moves to the first that scores better, until none does. Its path is fixed
by the plan it starts from, so any run that starts there ends at the same plan, one no single
step improves.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .budgets import Limits
from .errors import UsageError

__all__ = ["REPAIRS", "fill", "neighbours", "plan_key", "polish", "repair", "undo_raises",
           "widths_of"]

Bits = dict[str, int]
Choices = Sequence[int] | Mapping[str, Sequence[int]]


def widths_of(choices: Choices, key: str) -> Sequence[int]:
    """The widths `key` may take: one list for every key, or a list per key (weights and
    activations choose from their own)."""
    return choices[key] if isinstance(choices, Mapping) else choices


def repair(bits: Mapping[str, int], omega, limits: Limits, choices: Choices, *,
           keep: frozenset = frozenset()) -> Bits:
    """Lowers bits, cheapest perturbation per unit of the exceeded budgets saved first (per
    byte, with bytes alone), until the plan fits; layers in `keep` stay as they are. Under a
    latency budget a narrower input can cost time, so there it moves keys either way
    (`_two_way_repair`)."""
    if limits.max_latency_ms is not None:
        return _two_way_repair(bits, omega, limits, choices, keep)
    bits = dict(bits)
    while not limits.fits(bits):
        over = limits.exceeded(bits)
        best, best_cost = None, float("inf")
        for n, b in bits.items():
            widths = widths_of(choices, n)
            i = widths.index(b)
            if i == 0 or n in keep:
                continue
            lower = widths[i - 1]
            saved = -limits.delta(bits, n, lower, only=over)
            cost = (omega[n][lower] - omega[n][b]) / max(saved, 1)
            if cost < best_cost:
                best, best_cost = (n, lower), cost
        if best is None:
            break
        bits[best[0]] = best[1]
    return bits


def _two_way_repair(bits, omega, limits: Limits, choices: Choices, keep) -> Bits:
    """`repair` where lowering a key may raise a budget: each step takes the one-step move (down
    or up) of least perturbation change per unit saved in the exceeded budgets, among moves that
    save there and push no budget that holds over its limit. The exceeded budgets never grow
    and their overshoot falls at every step, so it ends."""
    bits = dict(bits)
    budgets = limits.budgets()
    while not limits.fits(bits):
        over, used = limits.exceeded(bits), limits.usage(bits)
        best, best_cost = None, float("inf")
        for n, b in bits.items():
            widths = widths_of(choices, n)
            i = widths.index(b)
            if n in keep:
                continue
            for j in (i - 1, i + 1):
                if not 0 <= j < len(widths):
                    continue
                saved = -limits.delta(bits, n, widths[j], only=over)
                if saved <= 0:
                    continue
                moved = limits.usage({**bits, n: widths[j]})
                if any(moved[k] > budgets[k] and k not in over for k in budgets) or any(
                        moved[k] > used[k] for k in over):
                    continue
                cost = (omega[n][widths[j]] - omega[n][b]) / saved
                if cost < best_cost:
                    best, best_cost = (n, widths[j]), cost
        if best is None:  # every move that saves in one exceeded budget costs in another
            return _solved(bits, omega, limits, choices, keep)
        bits[best[0]] = best[1]
    return bits


def _solved(bits, omega, limits: Limits, choices: Choices, keep) -> Bits:
    """The exact solver's plan within `limits` with the keys in `keep` held at their bits:
    where greedy steps cannot trade one budget against another. `bits` if none fits."""
    from .allocate import solve_within

    held = {k: ({bits[k]: omega[k][bits[k]]} if k in keep else
                {b: omega[k][b] for b in widths_of(choices, k)}) for k in bits}
    try:
        return dict(solve_within(held, limits).bits)
    except UsageError:
        return dict(bits)


REPAIRS = ("perturbation", "undo")


def undo_raises(bits: Mapping[str, int], base: Mapping[str, int], limits: Limits) -> Bits:
    """Moves the layers `bits` raises above `base` (a plan that fits) back to it, the most
    bytes (or budget units) first, until the plan fits. It ranks nothing by sensitivity, so two
    estimators whose solver plans agree propose, repair and score the same trials."""
    bits = dict(bits)
    raised = sorted((n for n in bits if bits[n] > base[n]),
                    key=lambda n: (limits.delta(bits, n, base[n]), n))
    for n in raised:
        if limits.fits(bits):
            break
        bits[n] = base[n]
    # Under a latency budget a lowered input can be what costs time: those lowerings go back
    # too, the most saving first, until the plan fits (at worst it is `base`, which fits).
    while not limits.fits(bits):
        over = limits.exceeded(bits)
        lowered = [(limits.delta(bits, n, base[n], only=over), n) for n in bits
                   if bits[n] != base[n]]
        saving = [m for m in lowered if m[0] < 0]
        if not saving:
            break
        bits[min(saving)[1]] = base[min(saving)[1]]
    return bits


def fill(bits: Mapping[str, int], omega, limits: Limits, choices: Choices, *,
         keep: frozenset = frozenset()) -> Bits:
    """Raises bits, largest perturbation drop per byte (budget unit) first, while the plan
    still fits; layers in `keep` stay as they are."""
    bits = dict(bits)
    while True:
        best, best_gain = None, 0.0
        for n, b in bits.items():
            widths = widths_of(choices, n)
            i = widths.index(b)
            if i == len(widths) - 1 or n in keep:
                continue
            higher = widths[i + 1]
            cost = limits.delta(bits, n, higher)
            if not limits.fits({**bits, n: higher}):
                continue
            gain = (omega[n][b] - omega[n][higher]) / max(cost, 1)
            if gain > best_gain:
                best, best_gain = (n, higher), gain
        if best is None:
            return bits
        bits[best[0]] = best[1]


def neighbours(bits: Mapping[str, int], omega, limits: Limits, choices: Choices) -> list[Bits]:
    """The plans one step from `bits` within the budget, in layer order: each layer one bit
    choice up (the others repaired to fit) and one down (the freed bytes spent on the others)."""
    out, seen = [], {plan_key(bits)}
    for n, b in bits.items():
        widths = widths_of(choices, n)
        i = widths.index(b)
        moves = []
        if i + 1 < len(widths):
            moves.append(repair({**bits, n: widths[i + 1]}, omega, limits, choices,
                                keep=frozenset([n])))
        if i > 0:
            moves.append(fill({**bits, n: widths[i - 1]}, omega, limits, choices,
                              keep=frozenset([n])))
        for m in moves:
            if limits.fits(m) and plan_key(m) not in seen:
                seen.add(plan_key(m))
                out.append(m)
    return out


def plan_key(bits: Mapping[str, int]) -> tuple:
    """A plan as a hashable key, whatever the order of its layers."""
    return tuple(sorted(bits.items()))


def polish(start: Mapping[str, int], start_score: float, score: Callable[[Bits], float], *,
           omega, limits: Limits, choices: Choices,
           max_evaluations: int) -> tuple[Bits, float, int]:
    """First-improvement local search from `start` over `neighbours`, the plans the
    perturbation table ranks best scored first; returns the plan, its score and the evaluations
    spent. It stops at a plan none of whose neighbours scores lower, or when the evaluations
    are spent. `score` may answer from a cache (a resumed run does)."""
    current, value, spent = dict(start), start_score, 0
    scored = {plan_key(current): value}
    while spent < max_evaluations:
        candidates = [m for m in neighbours(current, omega, limits, choices)
                      if plan_key(m) not in scored]
        candidates.sort(key=lambda m: sum(omega[n][m[n]] - omega[n][current[n]] for n in m))
        for m in candidates[:max_evaluations - spent]:
            scored[plan_key(m)] = score(m)
            spent += 1
            if scored[plan_key(m)] < value:
                current, value = m, scored[plan_key(m)]
                break
        else:
            break
    return current, value, spent
