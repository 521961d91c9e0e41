"""The shape of the engine: no import cycles among `mpq/` modules (imports inside functions
count too: a lazy import only hides a loop), and sizes computed in one place."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT

PACKAGE = ROOT / "mpq"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mpq modules `path` imports, anywhere in the file (`from .x import y` depends on
    module x; `from . import x` on submodule x, not on the package)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level == 0:
                base = node.module
            elif node.module:
                base = f"{base}.{node.module}"
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules around it, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_among_mpq_modules():
    graph = _graph()
    assert "mpq.checkpoint" in graph and "mpq.size" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["mpq.errors"] = graph["mpq.errors"] | {"mpq.search"}  # search reaches errors
    assert _cycle(graph) is not None


def test_search_and_qat_are_siblings():
    graph = _graph()
    assert "mpq.qat" not in graph["mpq.search"] and "mpq.trainer" not in graph["mpq.search"]
    assert "mpq.search" not in graph["mpq.qat"]


class OddNet(nn.Module):
    """A float Linear in the middle, a depthwise conv, a conv without bias or BN, a grouped
    conv: layers whose stored parts differ."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4, bias=False)
        self.mid = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.dw(self.stem(x)))))
        return self.head(torch.relu(self.mid(h.mean((2, 3)))))


@pytest.mark.parametrize("kind", ["resnet20", "mobilenet_v2", "odd"])
def test_solver_search_and_packed_file_agree_on_a_plans_size(kind, tmp_path):
    from mpq.allocate import perturbations, solve
    from mpq.export.mpqfile import save_mpq
    from mpq.hessian import LayerSensitivity
    from mpq.models import build_model
    from mpq.quant import calibrate_, freeze_bn_, prepare_qat, quantizable_layers, uniform_plan
    from mpq.budgets import Limits
    from mpq.refine import repair
    from mpq.size import Footprint, weight_bytes

    torch.manual_seed(0)
    if kind == "odd":
        model, size = OddNet().eval(), 16
    elif kind == "mobilenet_v2":
        import torchvision

        model, size = torchvision.models.mobilenet_v2(num_classes=10).eval(), 32
    else:
        model, size = build_model(kind).eval(), 32
    meta = {"model": {"name": kind, "num_classes": 10}, "input_size": size,
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    names = quantizable_layers(model)
    example = (torch.zeros(1, 3, size, size),)
    footprint = Footprint.of(prepare_qat(model, uniform_plan(kind, names, w_bits=8),
                                         example_inputs=example), meta)
    sens = {n: LayerSensitivity(1.0 + i % 5, 0, 1.0, 0, "exact", 0,
                                model.get_submodule(n).weight.numel())
            for i, n in enumerate(names)}
    choices = [2, 4, 8]
    omega = perturbations(model, sens, choices)
    lo, hi = footprint.smallest(choices), footprint.largest(choices)
    budget = lo + (hi - lo) // 3
    alloc = solve(omega, footprint, budget_bytes=budget)
    repaired = repair({n: 8 for n in names}, omega, Limits(footprint, budget), choices)  # the search's
    plan = alloc.plan(kind, budget_bytes=budget)
    q = prepare_qat(model, plan, example_inputs=example)
    calibrate_(q, [torch.randn(4, 3, size, size)])
    q.eval()
    freeze_bn_(q)
    written = save_mpq(tmp_path / "model.mpq", q, meta)
    assert written == (tmp_path / "model.mpq").stat().st_size == weight_bytes(q, meta) \
        == alloc.size_bytes == plan.extra["size_bytes"] <= budget
    assert footprint.bytes(repaired) <= budget
    assert len(set(alloc.bits.values())) > 1


def test_every_mpq_package_is_installed_with_it():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found == listed, (found - listed, listed - found)
