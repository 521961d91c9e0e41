"""Latency budgets: the per-layer table (measured in a runtime, cached, checked against whole
models), the solver and the repairs meeting it beside bytes and BOPs, budgets no plan meets
together refused before any work naming the one that binds, and search.py --latency-ms."""

import itertools
import json
import random

import pytest
import torch
from torch import nn

from conftest import run_script
from mpq.allocate import solve_within, tightest_budget
from mpq.budgets import Bops, Limits, act_key
from mpq.errors import UsageError
from mpq.latency import LatencyTable, latency_table
from mpq.refine import fill, neighbours, repair, undo_raises
from mpq.size import Footprint, LayerShape


def _table(names, narrow, base=1.0):
    return LatencyTable(runtime="onnxruntime", batch=1, threads=1, cpu="test", base_ms=base,
                        narrow_ms=dict(zip(names, narrow)), narrow_bits=4)


def test_a_plan_costs_the_base_plus_its_narrow_inputs():
    table = _table(["a", "b"], [0.25, 0.5])
    assert table.total({"a": 2, "b": 8}, {"a": 8, "b": 8}) == 1.0  # weight bits cost nothing
    assert table.total({"a": 2, "b": 8}, {"a": 4, "b": 6}) == 1.75
    with pytest.raises(ValueError, match="int8 layers only"):
        table.layer("a", None, 8)


def _instance(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(4)]
    footprint = Footprint({n: LayerShape(rng.randint(10, 3000), rng.randint(1, 32), True)
                           for n in names}, 100)
    bops = Bops({n: rng.randint(10, 10_000) for n in names})
    table = _table(names, [rng.uniform(-0.05, 0.4) for _ in names], base=rng.uniform(0.5, 2))
    choices, a_choices = [2, 4, 8], [4, 8]
    omega = {n: dict(zip(choices, sorted((rng.random() * 10 ** rng.uniform(-3, 1)
                                         for _ in choices), reverse=True))) for n in names}
    for n in names:
        omega[act_key(n)] = {4: rng.random() * 0.1, 8: rng.random() * 0.001}
    widths = {**{n: choices for n in names}, **{act_key(n): a_choices for n in names}}
    return rng, names, footprint, bops, table, omega, widths


@pytest.mark.parametrize("seed", range(12))
def test_the_solver_meets_bytes_bops_and_latency_and_is_optimal(seed):
    """Brute force over every (weights, activation) pair of every layer: the solver's plan is
    the optimum within all three budgets; the repairs, the undo of raises and the local
    search's neighbours land within them from any proposal; an infeasible set is named."""
    rng, names, footprint, bops, table, omega, widths = _instance(seed)
    defaults = dict.fromkeys(names, 8)
    keys = list(widths)
    combos = [dict(zip(keys, c)) for c in itertools.product(*(widths[k] for k in keys))]

    def figure(p, k):
        return Limits(footprint, 10**9, defaults, bops, 10**18, table, 1e9).usage(p)[k]
    pick = {k: sorted(figure(p, k) for p in combos) for k in ("bytes", "bops", "latency_ms")}
    budget, max_bops = (rng.choice(pick[k][len(combos) // 4:]) for k in ("bytes", "bops"))
    max_ms = rng.choice(pick["latency_ms"][: 3 * len(combos) // 4])
    limits = Limits(footprint, budget, defaults, bops, max_bops, table, max_ms)
    feasible = [p for p in combos if limits.fits(p)]
    worst = tightest_budget(widths, limits)
    if not feasible:
        assert worst is not None and worst[0] in limits.budgets()
        with pytest.raises(UsageError, match="no plan satisfies"):
            solve_within(omega, limits)
        return
    assert worst is None
    best = min(sum(omega[k][p[k]] for k in keys) for p in feasible)
    got = solve_within(omega, limits)
    assert limits.fits(got.bits) and got.objective == pytest.approx(best, rel=1e-9)
    for _ in range(6):
        proposal = {k: rng.choice(widths[k]) for k in keys}
        assert limits.fits(repair(proposal, omega, limits, widths))
        assert limits.fits(undo_raises(proposal, got.bits, limits))
        assert limits.fits(fill(got.bits, omega, limits, widths))
    assert all(limits.fits(m) for m in neighbours(got.bits, omega, limits, widths))


def test_tightest_budget_names_the_budget_the_others_make_unreachable():
    """BOPs need narrow inputs that the latency budget forbids: each alone is met, together
    the one further from its reachable figure is named, with that figure."""
    names = ["a", "b"]
    footprint = Footprint({n: LayerShape(100, 4, True) for n in names}, 10)
    bops = Bops({"a": 100, "b": 100})
    table = _table(names, [0.5, 0.5])
    widths = {**{n: [2, 8] for n in names}, **{act_key(n): [4, 8] for n in names}}
    # W2A8 everywhere: 2 x 100 x 2 x 8 = 3200 BOPs at 1.0 ms; both inputs narrow: 1600 at
    # 2.0 ms. Under 1.4 ms no input may narrow: BOPs reach 3200 (2x over 1600), while latency
    # under 1600 BOPs reaches 2.0 (1.43x over 1.4): BOPs bind harder
    limits = Limits(footprint, 10**6, dict.fromkeys(names, 8), bops, 1600, table, 1.4)
    assert tightest_budget(widths, limits) == ("bops", 3200)
    assert tightest_budget(widths, Limits(footprint, 10**6, dict.fromkeys(names, 8), bops,
                                          2400, table, 1.6)) is None
    assert tightest_budget(widths, Limits(footprint, 10**6, dict.fromkeys(names, 8), bops,
                                          2400, table, 0.9)) == ("latency_ms", 1.5)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _tiny_model():
    return Small().eval()


def test_the_table_is_measured_cached_and_checked_against_whole_models(tmp_path, monkeypatch):
    from mpq.quant import quantizable_layers

    model = _tiny_model()
    model_names = quantizable_layers(model)
    x = torch.randn(8, 3, 12, 12)
    calls = []
    import mpq.latency as latency

    real = latency.measure_plans

    def counting(model, plans, **kw):
        calls.append(sorted(plans))
        return real(model, plans, **kw)
    monkeypatch.setattr(latency, "measure_plans", counting)
    kwargs = dict(runtime="onnxruntime", batch=2, threads=1, example_inputs=(x[:1],),
                  calibration=[x], cache_dir=tmp_path, key={"checkpoint": "c"}, seconds=0.05)
    table = latency_table(model, "small", model_names, narrow_bits=4, **kwargs)
    # one model per layer with its input narrow, the base, and the two checks
    assert len(calls[0]) == 3  # the base and the two checks; one graph per layer made from the base
    assert set(table.narrow_ms) == set(model_names) and table.base_ms > 0
    assert [v["plan"] for v in table.validation] == ["every layer narrow",
                                                     "every other layer narrow"]
    for check in table.validation:
        assert check["measured_ms"] > 0 and check["relative_error"] == pytest.approx(
            (check["predicted_ms"] - check["measured_ms"]) / check["measured_ms"])
    assert table.batch == 2 and table.cpu and table.versions["onnxruntime"]
    again = latency_table(model, "small", model_names, narrow_bits=4, **kwargs)
    assert again == table and len(calls) == 1  # from the cache
    only_base = latency_table(model, "small", model_names, narrow_bits=None, **kwargs)
    assert calls[-1] == ["base"] and set(only_base.narrow_ms.values()) == {0.0}


def test_an_unknown_runtime_is_refused():
    with pytest.raises(UsageError, match="search.latency_runtime must be one of"):
        latency_table(_tiny_model(), "resnet20", ["fc"], runtime="tvm", batch=1, threads=1,
                      narrow_bits=None, example_inputs=(torch.zeros(1, 3, 12, 12),),
                      calibration=[torch.zeros(1, 3, 12, 12)], cache_dir=None, key={})


@pytest.fixture
def search_args(tiny_search):
    return tiny_search(polish_evaluations=4, latency_seconds=0.05)


def test_search_under_three_budgets_records_each_and_the_measured_latency(search_args,
                                                                          tmp_path):
    env = {"MPQ_CACHE": str(tmp_path / "cache")}
    result = run_script(*search_args("s", "--budget", "4x", "--bops", "40x",
                                     "--latency-ms", "1000"), env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    budgets = plan["budgets"]
    assert set(budgets) == {"bytes", "bops", "latency_ms"}
    assert all(b["met"] and b["value"] <= b["budget"] for b in budgets.values())
    assert budgets["bytes"]["value"] == plan["size_bytes"]
    assert budgets["latency_ms"]["measured"] == plan["latency_measured_ms"] > 0
    assert plan["latency_budget_ms"] == 1000 and "onnxruntime, batch 1" in plan["latency_on"]
    summary = json.loads((tmp_path / "s" / "search.json").read_text())
    # every input at 8 bits (no search.a_bit_choices): only the base is measured, and every
    # plan costs it (weight bits run on the same int8 kernels)
    table = summary["latency_table"]
    assert set(table["narrow_ms"]) == set(plan["layers"]) and table["validation"] == []
    assert {t["latency_ms"] for t in summary["trials"]} == {table["base_ms"]}
    assert f"latency_ms={plan['latency_ms']:.3f}" in result.stdout
    assert list((tmp_path / "cache" / "latency").glob("latency-*.json"))


def test_a_latency_budget_no_plan_meets_is_refused_before_any_work(search_args, tmp_path):
    env = {"MPQ_CACHE": str(tmp_path / "cache")}
    low = run_script(*search_args("r", "--budget", "4x", "--latency-ms", "0.000001"), env=env)
    assert low.returncode == 2 and not (tmp_path / "r").exists(), low.stderr
    line = low.stderr.strip().splitlines()[-1]
    assert "latency budget 1e-06 ms is below the least any plan reaches" in line and \
        "ask for --latency-ms" in line and "or more" in line
    # bytes and BOPs no plan meets together are refused before the table is measured
    early = run_script(*search_args("e", "--budget", "60x", "--bops", "65x", "--latency-ms",
                                    "1"), env={"MPQ_CACHE": str(tmp_path / "early")})
    assert early.returncode == 2 and "below the smallest" in early.stderr, early.stderr
    assert not (tmp_path / "early" / "latency").exists()
    for bad in ("0", "nan"):
        result = run_script(*search_args("b", "--budget", "4x", "--latency-ms", bad), env=env)
        assert result.returncode == 2 and "--latency-ms must be a positive" in result.stderr, \
            result.stderr
    runtime = run_script(*search_args("t", "--budget", "4x", "--latency-ms", "1", "--set",
                                      "search.latency_runtime=tvm"), env=env)
    assert runtime.returncode == 2 and "search.latency_runtime must be one of" in runtime.stderr


def test_a_narrowed_graph_reads_the_layer_through_a_clip_of_its_own(tmp_path):
    """`_narrowed` (one export serving every layer's table entry) puts a Clip, Q and DQ before
    each call of the layer only, keeps the graph valid and sorted, and runs in ONNX Runtime."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from mpq.latency import _export, _narrowed
    from mpq.quant import uniform_plan

    model, x = _tiny_model(), torch.randn(4, 3, 8, 8)
    base = _export(model, uniform_plan("small", ["c1", "c2", "fc"], w_bits=8), "onnxruntime",
                   tmp_path / "base", example_inputs=(x[:1],), calibration=[x])
    proto = onnx.load(str(base))
    narrow = _narrowed(proto, "c2", 4)
    ops = lambda p: [n.op_type for n in p.graph.node]  # noqa: E731
    assert ops(narrow).count("Clip") == ops(proto).count("Clip") + 1
    assert ops(narrow).count("QuantizeLinear") == ops(proto).count("QuantizeLinear") + 1
    clip = next(n for n in narrow.graph.node if n.op_type == "Clip" and "c2" in n.output[0])
    lo, hi = (float(np.asarray(onnx.numpy_helper.to_array(i))) for i in narrow.graph.initializer
              if i.name in clip.input[1:])
    assert lo == 0 and hi > 0  # c2's input follows a ReLU: unsigned, 15 steps of its scale
    session = ort.InferenceSession(narrow.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": x.numpy()})[0].shape == (4, 4)
    with pytest.raises(ValueError, match="no conv or matmul of nope"):
        _narrowed(proto, "nope", 4)


def test_the_torch_runtime_exports_each_layer(tmp_path):
    table = latency_table(_tiny_model(), "small", ["c1", "c2", "fc"], runtime="torch", batch=1,
                          threads=1, narrow_bits=4, example_inputs=(torch.zeros(1, 3, 8, 8),),
                          calibration=[torch.randn(4, 3, 8, 8)], cache_dir=None, key={},
                          seconds=0.05)
    assert set(table.narrow_ms) == {"c1", "c2", "fc"} and table.base_ms > 0
    assert table.versions["torch"] and len(table.validation) == 2
