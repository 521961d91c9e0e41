"""The engine on a network it has never seen: grouped and depthwise convs, a residual add, a
concatenation, a Linear in the middle, SiLU, a conv without BN (issue: any model)."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq.allocate import perturbations, solve
from mpq.export import export_model, load_mpq
from mpq.hessian import is_piecewise_linear, layer_sensitivity
from mpq.qat import distillation_loss
from mpq.quant import (QuantConv, calibrate_, freeze_bn_, prepare_qat, quant_layers,
                       quantizable_layers, uniform_plan)
from mpq.size import Footprint, weight_bytes


class OddNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)     # no BN, with bias
        self.side = nn.Conv2d(8, 4, 1)
        self.mix = nn.Linear(12, 12)                                # a Linear in the middle
        self.head = nn.Linear(12, num_classes)
        self.act = nn.SiLU()

    def forward(self, x):
        x = self.act(self.stem_bn(self.stem(x)))
        y = self.act(self.dw_bn(self.depthwise(x)))
        y = self.grouped(y) + x                                     # residual add
        z = torch.cat([y, self.side(y)], dim=1)                     # concatenation
        z = self.mix(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)     # Linear over channels
        return self.head(F.adaptive_avg_pool2d(self.act(z), 1).flatten(1))


@pytest.fixture
def net_and_data():
    torch.manual_seed(0)
    net = OddNet()
    x = torch.randn(48, 3, 8, 8)
    y = torch.randint(0, 5, (48,))
    net.train()
    with torch.no_grad():
        net(x)  # BN statistics
    return net.eval(), x, y


def test_layers_and_folding_come_from_the_graph(net_and_data):
    net, x, _ = net_and_data
    names = quantizable_layers(net)
    assert names == ["stem", "depthwise", "grouped", "side", "mix", "head"]
    q = prepare_qat(net, uniform_plan("odd", names, w_bits=4), example_inputs=(x[:1],))
    layers = quant_layers(q)
    assert layers["stem"].bn is not None and layers["depthwise"].bn is not None
    assert layers["grouped"].bn is None and layers["side"].bn is None
    acts = [n for n, _ in q.named_modules() if n.startswith("act_quant_")]
    # One per tensor: the input, the stem's output (depthwise input and add), the depthwise
    # branch, the grouped conv's output, the sum (side input and concatenation), the side
    # conv's output, the Linear's input, the head's input.
    assert len(acts) == 8
    for node in q.graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, torch.cat):
            inputs = node.args[0] if node.target is torch.cat else node.args
            assert all(a.op == "call_module" and a.target.startswith("act_quant_")
                       for a in inputs)
    calibrate_(q, [x])
    with torch.no_grad():
        rel = (q.eval()(x) - net(x)).norm() / net(x).norm()
    assert rel < 0.5


# The model as a user names it in a recipe: `package.module:factory` (tests/ is on sys.path).
META = {"model": {"name": "test_any_model:OddNet", "num_classes": 5}, "input_size": 8,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def test_sensitivity_plan_qat_steps_and_export(net_and_data, tmp_path):
    net, x, y = net_and_data
    assert not is_piecewise_linear(net)[0]  # SiLU: the exact Gauss-Newton block, so named
    sens = layer_sensitivity(net, [(x[:24], y[:24]), (x[24:], y[24:])])
    assert {n: (s.estimator, s.quantity) for n, s in sens.items()} == {
        **{n: ("exact_ggn", "ggn") for n in ["stem", "depthwise", "grouped", "side", "mix"]},
        "head": ("exact", "hessian")}  # the logits are linear in the head's weight
    names = quantizable_layers(net)
    q8 = prepare_qat(net, uniform_plan("odd", names, w_bits=8), example_inputs=(x[:1],))
    footprint = Footprint.of(q8, META)  # sizes of the model.mpq file, header included
    omega = perturbations(net, sens, [2, 4, 8])
    budget = int(weight_bytes(q8, META) * 0.7)
    alloc = solve(omega, footprint, budget_bytes=budget)
    plan = alloc.plan("odd", budget_bytes=budget)
    student = prepare_qat(net, plan, example_inputs=(x[:1],))
    assert weight_bytes(student, META) == alloc.size_bytes <= budget
    calibrate_(student, [x])
    student.train()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    for step in range(4):
        if step == 2:
            freeze_bn_(student)
        with torch.no_grad():
            t = net(x)
        loss, _ = distillation_loss(student(x), t, y, alpha=0.9, temperature=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(bool(m.bn_frozen) for m in student.modules() if isinstance(m, QuantConv))

    # Export: the packed file within the plan's size, an ONNX model that passes the checker
    # and agrees with the fake-quantized model in ONNX Runtime, a PyTorch int8 model too.
    import onnxruntime as ort

    student.eval()
    out = tmp_path / "export"
    report = export_model(student, META, out)
    assert report["mpq_bytes"] <= plan.extra["size_bytes"] <= budget
    session = ort.InferenceSession(str(out / "model_int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    int8 = torch.jit.load(str(out / "model_int8.pt"))
    probe = torch.randn(512, 3, 8, 8)
    with torch.no_grad():
        ref = student(probe).argmax(1)
        got_onnx = torch.from_numpy(session.run(None, {"input": probe.numpy()})[0]).argmax(1)
        got_int8 = int8(probe).argmax(1)
    assert (got_onnx == ref).float().mean() >= 0.99
    assert (got_int8 == ref).float().mean() >= 0.99
    # the user's factory, named here as in a recipe, rebuilds it from the file
    rebuilt, _ = load_mpq(out / "model.mpq", expect_model=META["model"]["name"])
    with torch.no_grad():
        assert torch.equal(rebuilt(probe), student(probe))


def test_exact_sensitivity_handles_grouped_convs_and_a_mid_network_linear():
    torch.manual_seed(1)
    net = OddNet()
    net.act = nn.ReLU()  # now piecewise linear: the exact path, checked against autograd
    net.eval()
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    got = layer_sensitivity(net, [(x, y)])
    for name in ("depthwise", "grouped", "mix"):
        w = net.get_submodule(name).weight.detach()

        def loss(v, name=name):
            return F.cross_entropy(torch.func.functional_call(net, {f"{name}.weight": v}, (x,)),
                                   y)
        h = torch.autograd.functional.hessian(loss, w).reshape(w.numel(), -1)
        assert got[name].estimator == "exact"
        assert got[name].trace == pytest.approx(h.trace().item(), rel=1e-4, abs=1e-7)
