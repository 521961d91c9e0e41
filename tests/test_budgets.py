"""BOPs budgets beside bytes: MACs counted from the model, ratios parsed, the solver and the
repairs meeting both budgets, and search.py refusing budgets no plan meets before any work."""

import itertools
import json
import random
import re

import pytest
import torch
from torch import nn

from conftest import run_script
from mpq.allocate import solve_within
from mpq.budgets import Bops, Limits, act_key, parse_bops, split_bits
from mpq.errors import UsageError
from mpq.refine import fill, repair, undo_raises
from mpq.size import Footprint, LayerShape


class Shared(nn.Module):
    """A strided conv, a grouped conv called twice, and a linear layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.g(self.g(self.a(x)))
        return self.fc(x.mean((2, 3)))


def test_macs_are_counted_per_image_and_per_call():
    bops = Bops.of(Shared().eval(), ["a", "g", "fc"], (torch.zeros(4, 3, 16, 16),))
    # a: 8x8 outputs x 8 channels x (3 x 3 x 3); g: twice 8x8 x 8 x (2 x 3 x 3); fc: 8 x 5
    assert bops.macs == {"a": 64 * 8 * 27, "g": 2 * 64 * 8 * 18, "fc": 40}
    assert bops.fp32 == (64 * 8 * 27 + 2 * 64 * 8 * 18 + 40) * 32 * 32
    assert bops.layer("a", 4, 8) == 64 * 8 * 27 * 32 and bops.layer("fc", None, 8) == 40 * 256


def test_resnet20_has_its_published_multiply_accumulates():
    from mpq.models import build_model
    from mpq.quant import quantizable_layers

    model = build_model("resnet20", num_classes=10).eval()
    bops = Bops.of(model, quantizable_layers(model), (torch.zeros(1, 3, 32, 32),))
    # conv1; six 3x3 16->16 convs at 32x32; per later stage a strided first conv, five more,
    # and a 1x1 downsample; the fc: ResNet20's "41M" multiply-accumulates
    stage = 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 16
    assert sum(bops.macs.values()) == 32 * 32 * 16 * 27 + 6 * 32 * 32 * 16 * 16 * 9 + \
        2 * stage + 640 == 40_813_184


@pytest.mark.parametrize("text, expected", [("16x", 1000 // 16), ("1x", 1000), ("400", 400),
                                            ("0.5k", 500), ("2e2", 200)])
def test_parse_bops(text, expected):
    assert parse_bops(text, fp32_bops=1000) == expected
    assert parse_bops("2.5G", fp32_bops=10**12) == 2_500_000_000


@pytest.mark.parametrize("text, fragment", [("0x", "positive"), ("0.5x", "more than the FP32"),
                                            ("lots", "not understood"), ("3Q", "not understood"),
                                            ("-4", "not understood"), ("1e999", "positive")])
def test_parse_bops_rejects(text, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_bops(text, fp32_bops=1000)


def _instance(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(5)]
    shapes = {n: LayerShape(rng.randint(10, 3000), rng.randint(1, 32), True) for n in names}
    footprint = Footprint(shapes, 100)
    bops = Bops({n: rng.randint(10, 10_000) for n in names})
    choices = [2, 4, 6, 8]
    omega = {n: dict(zip(choices, sorted((rng.random() * 10 ** rng.uniform(-3, 1)
                                         for _ in choices), reverse=True))) for n in names}
    return rng, names, footprint, bops, choices, omega


@pytest.mark.parametrize("seed", range(10))
def test_the_solver_meets_bytes_and_bops_and_is_optimal(seed):
    rng, names, footprint, bops, choices, omega = _instance(seed)
    a_bits = dict.fromkeys(names, 8)
    combos = [dict(zip(names, c)) for c in itertools.product(choices, repeat=len(names))]
    size = lambda p: footprint.bytes(p)  # noqa: E731
    ops = lambda p: bops.total(p, a_bits)  # noqa: E731
    budget = rng.randint(min(map(size, combos)), max(map(size, combos)))
    max_bops = rng.randint(min(map(ops, combos)), max(map(ops, combos)))
    feasible = [p for p in combos if size(p) <= budget and ops(p) <= max_bops]
    limits = Limits(footprint, budget, a_bits, bops, max_bops)
    if not feasible:
        with pytest.raises(UsageError, match="no plan satisfies"):
            solve_within(omega, limits)
        return
    best = min(sum(omega[n][p[n]] for n in names) for p in feasible)
    got = solve_within(omega, limits)
    assert limits.fits(got.bits) and got.objective == pytest.approx(best, rel=1e-9)
    # the trials' repairs land within both budgets from any proposal
    for _ in range(5):
        proposal = {n: rng.choice(choices) for n in names}
        assert limits.fits(repair(proposal, omega, limits, choices)) or \
            not limits.fits(dict.fromkeys(names, 2))
        assert limits.fits(undo_raises({**got.bits, **proposal}, got.bits, limits)) or any(
            proposal[n] < got.bits[n] for n in names)
        grown = fill(got.bits, omega, limits, choices)
        assert limits.fits(grown) and all(grown[n] >= got.bits[n] for n in names)


def test_with_bytes_alone_the_repairs_move_in_bytes():
    """Limits without BOPs orders moves by bytes exactly: plans searched before BOPs existed
    are found again."""
    _, names, footprint, _, choices, omega = _instance(0)
    limits = Limits(footprint, footprint.bytes(dict.fromkeys(names, 4)))
    plan = {**dict.fromkeys(names, 4), "l1": 2}
    assert limits.delta(plan, "l1", 8) == footprint.layer("l1", 8) - footprint.layer("l1", 2)
    assert limits.usage(dict.fromkeys(names, 4)) == {"bytes": limits.bytes}


@pytest.mark.parametrize("seed", range(8))
def test_weight_and_activation_bits_are_chosen_together_optimally(seed):
    """Each layer picks a (weights, activation) pair: bytes depend on the first, BOPs on their
    product; the solver's plan is the brute-force optimum over all pairs, and the repairs,
    which move either key, land within both budgets."""
    rng, names, footprint, bops, choices, omega = _instance(seed)
    a_choices = [4, 8]
    for n in names:
        omega[act_key(n)] = {4: rng.random() * 0.1, 8: rng.random() * 0.001}
    defaults = dict.fromkeys(names, 8)
    widths = {**{n: choices for n in names}, **{act_key(n): a_choices for n in names}}
    keys = list(widths)
    combos = [dict(zip(keys, c)) for c in itertools.product(*(widths[k] for k in keys))]
    size = lambda p: footprint.bytes(split_bits(p, defaults)[0])  # noqa: E731
    ops = lambda p: bops.total(*split_bits(p, defaults))  # noqa: E731
    budget = rng.randint(min(map(size, combos)), max(map(size, combos)))
    max_bops = rng.randint(min(map(ops, combos)), max(map(ops, combos)))
    limits = Limits(footprint, budget, defaults, bops, max_bops)
    feasible = [p for p in combos if limits.fits(p)]
    if not feasible:
        return
    best = min(sum(omega[k][p[k]] for k in keys) for p in feasible)
    got = solve_within(omega, limits)
    assert set(got.bits) == set(keys) and limits.fits(got.bits)
    assert got.objective == pytest.approx(best, rel=1e-9)
    for _ in range(5):
        proposal = {k: rng.choice(widths[k]) for k in keys}
        fixed = repair(proposal, omega, limits, widths)
        assert limits.fits(fixed) or not limits.fits({k: widths[k][0] for k in keys})
        grown = fill(got.bits, omega, limits, widths)
        assert limits.fits(grown) and all(grown[k] >= got.bits[k] for k in keys)


@pytest.fixture
def search_args(tiny_search):
    return tiny_search(polish_evaluations=6)


def test_search_under_a_bops_budget_meets_it_in_every_trial(search_args, tmp_path):
    result = run_script(*search_args("b", "--bops", "40x"))  # a BOPs budget alone
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["budget_bytes"] == plan["fp32_bytes"]  # no bytes budget: the FP32 size
    assert plan["bops"] <= plan["bops_budget"] == plan["fp32_bops"] // 40
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert f"({plan['fp32_bops'] / plan['bops']:.2f}x fewer than FP32)" in result.stdout
    trials = json.loads((tmp_path / "b" / "search.json").read_text())["trials"]
    assert len(trials) > 4 and all(t["bops"] <= plan["bops_budget"] for t in trials)
    # W8A8 everywhere is 1/16 of FP32's BOPs: a 40x budget forces bits below 8
    assert min(v["w_bits"] for v in plan["layers"].values()) < 8


def test_budgets_no_plan_meets_are_refused_before_any_work_naming_the_tightest(search_args,
                                                                              tmp_path):
    # every layer at 2-bit weights and 8-bit activations: 1/64 of FP32's BOPs
    bops_only = run_script(*search_args("r1", "--budget", "8x", "--bops", "70x"))
    assert bops_only.returncode == 2 and not (tmp_path / "r1").exists(), bops_only.stderr
    lines = bops_only.stderr.strip().splitlines()
    assert len(lines) == 1 and "BOPs budget" in lines[0] and "--bops 64.00x or less" in lines[0]
    both = run_script(*search_args("r2", "--budget", "40x", "--bops", "1000x"))
    assert both.returncode == 2 and "BOPs budget" in both.stderr and \
        "the other budget cannot be met either" in both.stderr, both.stderr
    bytes_first = run_script(*search_args("r3", "--budget", "60x", "--bops", "65x"))
    assert bytes_first.returncode == 2 and re.search(r"below the smallest possible model.mpq.*"
                                                     r"cannot be met either", bytes_first.stderr)
    # with activations chosen from [4, 8], the floor is every layer at W2A4: 1/128
    acts = run_script(*search_args("r5", "--budget", "8x", "--bops", "140x", "--set",
                                   "search.a_bit_choices=[4,8]"))
    assert acts.returncode == 2 and "--bops 128.00x or less" in acts.stderr and \
        "4-bit activations" in acts.stderr, acts.stderr
    bad = run_script(*search_args("r4", "--budget", "8x", "--bops", "fast"))
    assert bad.returncode == 2 and "--bops 'fast' is not understood" in bad.stderr
    none = run_script(*search_args("r6"))
    assert none.returncode == 2 and "give at least one budget" in none.stderr, none.stderr


def test_search_chooses_activation_bits_under_a_bops_budget(search_args, tmp_path,
                                                           tiny_teacher):
    """search.a_bit_choices [4, 8] with --bops 64x: W8A8 is 1/16 of FP32's BOPs and W2A8 1/64,
    so the plan lowers activations too; its size is the exact model.mpq it makes."""
    from mpq.checkpoint import load_teacher, model_meta
    from mpq.config import load_recipe
    from mpq.quant import Plan, prepare_qat
    from mpq.search import SearchRecipe
    from mpq.size import weight_bytes

    args = search_args("a", "--budget", "4x", "--bops", "64x",
                       "--set", "search.a_bit_choices=[4,8]")
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["bops"] <= plan["bops_budget"] and plan["size_bytes"] <= plan["budget_bytes"]
    a_bits = [v["a_bits"] for v in plan["layers"].values()]
    assert set(a_bits) == {4, 8}
    summary = json.loads((tmp_path / "a" / "search.json").read_text())
    assert all(t["bops"] <= plan["bops_budget"] for t in summary["trials"])
    assert all(any(k.endswith("@a") for k in t["bits"]) for t in summary["trials"])
    assert set(summary["activation_omega"]) == set(plan["layers"])
    assert summary["activation_estimator"] == "exact"  # 4 classes
    recipe = load_recipe(args[2], [], cls=SearchRecipe)
    model = load_teacher(str(tiny_teacher), model_name="resnet20", num_classes=4).eval()
    size = recipe.data.image_size
    q = prepare_qat(model, Plan(model="resnet20", layers=plan["layers"]),
                    example_inputs=(torch.zeros(1, 3, size, size),))
    assert plan["size_bytes"] == weight_bytes(q, model_meta(recipe))


def test_activation_choices_over_many_classes_draw_the_input_curvature(search_args, tmp_path):
    """Above search.max_exact_classes the input curvature is sampled (one backward pass per
    draw, not per class), as the weights' is; search.json says which."""
    result = run_script(*search_args("c", "--budget", "4x", "--bops", "64x", "--set",
                                     "search.a_bit_choices=[4,8]", "--set",
                                     "search.max_exact_classes=2"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "c" / "search.json").read_text())
    assert summary["activation_estimator"] == "sampled"
    assert all(om["4"] > om["8"] > 0 for om in summary["activation_omega"].values())
    bad = run_script(*search_args("d", "--budget", "4x", "--set", "search.a_bit_choices=[1,8]"))
    assert bad.returncode == 2 and "search.a_bit_choices must be" in bad.stderr, bad.stderr
