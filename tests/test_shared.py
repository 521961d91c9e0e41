"""Shared modules: a block applied twice, a classifier used by two heads, a squeeze-excitation
gate and a Conv1d go through sensitivity, the solver, QAT and export with each shared weight
quantized and stored once, and an input quantizer per call; weights tied across two modules
are refused with one line."""

import json

import pytest
import torch
from torch import nn

from conftest import ROOT, net_with_data, run_script
from mpq.allocate import plan_for_budget
from mpq.errors import UsageError
from mpq.export import export_model, load_mpq
from mpq.hessian import layer_sensitivity
from mpq.mpqformat import stored_parts
from mpq.qat import fine_tune_qat
from mpq.quant import prepare_qat, quant_layers, quantizable_layers, uniform_plan
from mpq.size import fp32_parameter_bytes, weight_bytes


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class SharedNet(nn.Module):
    """The stem, then one block applied twice, a squeeze-excitation gate, a Conv1d over the
    flattened positions, and one classifier shared by two heads (the tied-weight classifier)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        h = self.block(self.block(torch.relu(self.stem(x))))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        h = h * gate
        s = torch.relu(self.seq(h.flatten(2)))                      # (N, 8, H*W)
        return self.classifier(s.mean(2)) + self.classifier(s.amax(2))


META = {"model": {"name": "test_shared:SharedNet", "num_classes": 4}, "input_size": 8,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


@pytest.fixture
def net_and_data():
    torch.manual_seed(0)
    return net_with_data(SharedNet(), images=64, classes=4, size=8)


def test_a_shared_layer_is_one_entry_one_weight_quantizer_and_an_input_grid_per_call(
        net_and_data):
    net, x, _ = net_and_data
    names = quantizable_layers(net)
    assert names == ["stem", "block.conv", "squeeze", "excite", "seq", "classifier"]
    q = prepare_qat(net, uniform_plan("shared", names, w_bits=4), example_inputs=(x[:1],))
    layers = quant_layers(q)
    assert layers["block.conv"].bn is not None  # both calls feed the same BN: folded
    calls = [n for n in q.graph.nodes if n.op == "call_module" and n.target == "block.conv"]
    assert [n.kwargs.get("call", 0) for n in calls] == [0, 1]
    quants = layers["block.conv"].input_quants
    assert len(quants) == 2 and quants[0] is not quants[1]
    assert len(layers["classifier"].input_quants) == 2
    layers_stored, _, _ = stored_parts(q)
    assert list(layers_stored) == names  # each weight stored once
    # FP32 bytes count a shared weight once, as the model holds it: stem 224, block conv 576
    # and BN 16, squeeze 36, excite 40, seq 200, classifier 36 parameters
    assert fp32_parameter_bytes(net) == 4 * (224 + 576 + 16 + 36 + 40 + 200 + 36)


def test_the_network_goes_through_sensitivity_plan_qat_and_export(net_and_data, tmp_path):
    import onnxruntime as ort

    net, x, y = net_and_data
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    sens = layer_sensitivity(net, batches)
    assert sens["block.conv"].quantity == "ggn" and "called 2 times" in sens["block.conv"].curved_by
    assert sens["classifier"].quantity == "ggn"
    plan = plan_for_budget(net, sens, "5x", example_inputs=(x[:1],), model_name="shared",
                           meta=META)
    student = fine_tune_qat(net, plan, batches, example_inputs=(x[:1],), epochs=2, lr=0.01)
    assert weight_bytes(student, META) == plan.extra["size_bytes"]
    report = export_model(student, META, tmp_path / "export")
    stored = (tmp_path / "export" / "model.mpq").stat().st_size
    assert stored == report["mpq_bytes"] <= plan.extra["size_bytes"] <= plan.extra["budget_bytes"]
    session = ort.InferenceSession(str(tmp_path / "export" / "model_int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    int8 = torch.jit.load(str(tmp_path / "export" / "model_int8.pt"))
    probe = torch.randn(512, 3, 8, 8)
    with torch.no_grad():
        ref = student(probe)
        onnx = torch.from_numpy(session.run(None, {"input": probe.numpy()})[0])
        got_int8 = int8(probe)
    assert (onnx.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    assert (got_int8.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
    rebuilt, _ = load_mpq(tmp_path / "export" / "model.mpq", expect_model=META["model"]["name"])
    with torch.no_grad():
        assert torch.equal(rebuilt(probe), ref)


def test_weights_tied_across_two_modules_are_refused_in_one_line():
    net = SharedNet()
    net.other = nn.Linear(8, 4)
    net.other.weight = net.classifier.weight
    with pytest.raises(UsageError, match="share one weight tensor") as info:
        quantizable_layers(net)
    assert "\n" not in str(info.value)


def test_search_and_bounded_qat_through_the_scripts(tmp_path, net_and_data, tiny_recipe_dict,
                                                   write_recipe):
    net, _, _ = net_and_data
    torch.save(net.state_dict(), tmp_path / "state_dict.pt")
    recipe = {**tiny_recipe_dict, "model": {"name": "test_shared:SharedNet", "num_classes": 4}}
    recipe["data"] = {**recipe["data"], "image_size": 8}
    recipe["train"] = {**recipe["train"], "max_steps": 3, "lr": 0.01}
    search = write_recipe({**recipe, "search": {"trials": 2, "holdout_images": 64,
                                                "batch_size": 32, "sensitivity_batches": 1}},
                          "search.yaml")
    path = write_recipe({**recipe, "qat": {"calibration_batches": 1}}, "qat.yaml")
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    found = run_script("search.py", "--recipe", search, "--checkpoint", tmp_path / "state_dict.pt",
                       "--budget", "5x", "--out", tmp_path / "search", "--device", "cpu",
                       "--quiet", env=env)
    assert found.returncode == 0, found.stderr
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    trained = run_script("train.py", "--recipe", path, "--teacher", tmp_path / "state_dict.pt",
                         "--plan", tmp_path / "search" / "plan.json", "--out", tmp_path / "qat",
                         "--device", "cpu", "--quiet", env=env)
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((tmp_path / "qat" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    export = json.loads((tmp_path / "qat" / "export" / "export.json").read_text())
    assert export["mpq_bytes"] == plan["size_bytes"]
