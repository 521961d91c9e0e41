"""The local search that ends a study: moves stay within the budget, it stops at a plan no
single step improves, and a resumed run walks the same path from the scores it finds stored."""

import itertools

import pytest

from mpq.budgets import Limits
from mpq.refine import fill, neighbours, polish, repair, undo_raises
from mpq.mpqformat import LayerShape
from mpq.size import Footprint

CHOICES = [2, 3, 4, 6, 8]
NAMES = [f"l{i}" for i in range(6)]


@pytest.fixture
def setting():
    shapes = {n: LayerShape(numel=100 * (i + 1), out_channels=4 + i, has_bias=True)
              for i, n in enumerate(NAMES)}
    footprint = Footprint(shapes, fixed=40)
    omega = {n: {b: (i + 1) * 2.0 ** -b for b in CHOICES} for i, n in enumerate(NAMES)}
    budget = footprint.bytes({n: 4 for n in NAMES})
    return footprint, omega, budget


def interacting_score(bits):
    """A score the perturbation table does not predict: layers l1 and l4 like equal widths."""
    return sum(2.0 ** -b for b in bits.values()) + 0.05 * abs(bits["l1"] - bits["l4"])


def test_moves_stay_within_the_budget_and_differ(setting):
    footprint, omega, budget = setting
    start = {n: 4 for n in NAMES}
    moves = neighbours(start, omega, Limits(footprint, budget), CHOICES)
    assert moves and all(footprint.bytes(m) <= budget for m in moves)
    assert len({tuple(sorted(m.items())) for m in moves}) == len(moves)
    assert start not in moves
    lowered = repair({**start, "l0": 8}, omega, Limits(footprint, budget), CHOICES,
                     keep=frozenset(["l0"]))
    assert lowered["l0"] == 8 and footprint.bytes(lowered) <= budget
    raised = fill({**start, "l5": 2}, omega, Limits(footprint, budget), CHOICES, keep=frozenset(["l5"]))
    assert raised["l5"] == 2 and footprint.bytes(raised) <= budget
    assert footprint.bytes(raised) > footprint.bytes({**start, "l5": 2})  # the room is spent


def test_polish_ends_at_a_plan_no_step_improves(setting):
    footprint, omega, budget = setting
    start = {n: c for n, c in zip(NAMES, itertools.cycle([2, 8, 3, 6]))}
    start = repair(start, omega, Limits(footprint, budget), CHOICES)
    kwargs = dict(omega=omega, limits=Limits(footprint, budget), choices=CHOICES)
    bits, value, spent = polish(start, interacting_score(start), interacting_score,
                                max_evaluations=10_000, **kwargs)
    assert value < interacting_score(start) and value == interacting_score(bits)
    assert footprint.bytes(bits) <= budget and 0 < spent < 10_000
    assert all(interacting_score(m) >= value for m in neighbours(bits, **kwargs))
    # a bounded search stops within its evaluations, at a plan no worse than where it started
    _, short_value, short = polish(start, interacting_score(start), interacting_score,
                                   max_evaluations=3, **kwargs)
    assert short == 3 and value <= short_value <= interacting_score(start)


def test_a_resumed_polish_walks_the_same_path_from_the_stored_scores(setting, tmp_path):
    import optuna

    from mpq.search import _polish
    from mpq.study import open_study

    footprint, omega, budget = setting
    start = repair({n: 8 for n in NAMES}, omega, Limits(footprint, budget), CHOICES)
    scored = []

    def score(bits):
        scored.append(dict(bits))
        return interacting_score(bits)

    def run(study, evaluations):
        return _polish(study, start, interacting_score(start), score, omega=omega,
                       limits=Limits(footprint, budget), choices=CHOICES,
                       evaluations=evaluations, progress=False, on_trial=None)

    url = f"sqlite:///{tmp_path / 'study.db'}"
    reference = run(open_study("whole", url, {"model": "m"}), 200)
    whole = len(scored)
    scored.clear()
    run(open_study("cut", url, {"model": "m"}), whole // 2)  # a run stopped half way
    assert len(scored) == whole // 2
    scored.clear()
    study = open_study("cut", url, {"model": "m"})
    assert run(study, 200) == reference
    assert len(scored) == whole - whole // 2  # only what the first run had not scored
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == whole and all(t.user_attrs["stage"] == "polish" and not t.params
                                        for t in trials)
    from mpq.study import _live
    assert _live(study) == 0  # not counted among the sampler's trials


def test_undo_repair_fits_without_ranking_by_sensitivity(setting):
    """The perturbation repair's choice moves with the sensitivities; undoing the raises back
    to the solver's plan does not, so estimators agreeing on that plan propose the same trials."""
    import random

    footprint, omega, budget = setting
    base = repair({n: 8 for n in NAMES}, omega, Limits(footprint, budget), CHOICES)
    rng = random.Random(0)
    shaken = {n: {b: v * (1 + 0.3 * rng.uniform(-1, 1)) for b, v in row.items()}
              for n, row in omega.items()}  # another estimator's values, within 30%
    differed = 0
    for _ in range(200):
        proposal = {n: CHOICES[min(max(CHOICES.index(b) + rng.choice([-1, 0, 1]), 0),
                                   len(CHOICES) - 1)] for n, b in base.items()}
        undone = undo_raises(proposal, base, Limits(footprint, budget))
        assert footprint.bytes(undone) <= budget
        assert all(undone[n] in (proposal[n], base[n]) for n in NAMES)
        assert all(undone[n] == proposal[n] for n in NAMES if proposal[n] <= base[n])
        differed += repair(proposal, omega, Limits(footprint, budget), CHOICES) != \
            repair(proposal, shaken, Limits(footprint, budget), CHOICES)
    assert differed > 0  # what undo_raises is for
