"""A model factory (`package.module:factory`) that only a file names is never imported: building
it would run the module's code, so a checkpoint or `model.mpq` from elsewhere could run any
installed code. It is built when the caller names the same factory (a recipe's `model.name`)
or trusts the file (`allow_factory=True`, `--allow-factory`)."""

import os
import re
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, TINY_RECIPE, run_script
from mpq.checkpoint import load_checkpoint, load_teacher, model_from_checkpoint, save_checkpoint
from mpq.errors import UsageError
from mpq.export import load_mpq, save_mpq
from mpq.quant import calibrate_, prepare_qat, quantizable_layers, uniform_plan

FACTORY = "trustnet:small"
SIZE = TINY_RECIPE["data"]["image_size"]
SOURCE = '''
from pathlib import Path

from torch import nn

LOG = Path(__file__).with_name("trustnet.log")  # what importing it and calling it did
with LOG.open("a") as fh:
    fh.write("imported\\n")


def small(num_classes=4):
    with LOG.open("a") as fh:
        fh.write("called\\n")
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


def small(num_classes=4):
    """The factory's architecture, built here without importing it."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


@pytest.fixture
def trustnet_log(tmp_path, monkeypatch):
    """`trustnet.py` importable (not yet imported); returns the log its import and calls write."""
    folder = tmp_path / "factory"
    folder.mkdir()
    (folder / "trustnet.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "trustnet", raising=False)
    yield folder / "trustnet.log"
    sys.modules.pop("trustnet", None)


def fp32_payload():
    torch.manual_seed(0)
    return {"kind": "fp32", "model": {"name": FACTORY, "num_classes": 4}, "input_size": SIZE,
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
            "state_dict": small().state_dict(), "recipe": {"data": dict(TINY_RECIPE["data"])}}


def qat_payload():
    plan = uniform_plan(FACTORY, quantizable_layers(small()), w_bits=8)
    return {**fp32_payload(), "kind": "qat", "plan": plan.to_dict()}


def refusal(path) -> str:
    return rf"{re.escape(str(path))} names the model factory 'trustnet:small'.*--allow-factory"


def test_a_factory_only_a_checkpoint_names_is_refused_before_its_import(tmp_path, trustnet_log):
    for name, payload in (("fp32.pt", fp32_payload()), ("qat.pt", qat_payload())):
        save_checkpoint(tmp_path / name, payload)
        with pytest.raises(UsageError, match=refusal(tmp_path / name)):
            model_from_checkpoint(load_checkpoint(tmp_path / name), path=tmp_path / name)
    assert not trustnet_log.exists() and "trustnet" not in sys.modules  # never imported

    # Named by the caller, as a recipe's model.name names it, or trusted: built.
    payload = load_checkpoint(tmp_path / "fp32.pt")
    for trust in ({"expect_model": FACTORY}, {"allow_factory": True}):
        model = model_from_checkpoint(payload, path=tmp_path / "fp32.pt", **trust)
        assert torch.equal(model[5].weight, payload["state_dict"]["5.weight"])
    teacher = load_teacher(tmp_path / "fp32.pt", model_name=FACTORY, num_classes=4)
    assert torch.equal(teacher[0].weight, payload["state_dict"]["0.weight"])
    assert trustnet_log.read_text().split() == ["imported", "called", "called", "called"]


def test_a_factory_only_a_model_mpq_names_is_refused(tmp_path, trustnet_log):
    torch.manual_seed(0)
    net = small().eval()
    x = torch.randn(8, 3, SIZE, SIZE)
    q = prepare_qat(net, uniform_plan(FACTORY, quantizable_layers(net), w_bits=4),
                    example_inputs=(x[:1],))
    calibrate_(q, [x])
    path = tmp_path / "model.mpq"
    save_mpq(path, q.eval(), {key: fp32_payload()[key]
                              for key in ("model", "input_size", "normalization")})
    with pytest.raises(UsageError, match=refusal(path)):
        load_mpq(path)
    assert not trustnet_log.exists()
    with pytest.raises(UsageError, match="holds a 'trustnet:small' model, but 'resnet20'"):
        load_mpq(path, expect_model="resnet20")
    for trust in ({"expect_model": FACTORY}, {"allow_factory": True}):
        rebuilt, header = load_mpq(path, **trust)
        assert header["model"]["name"] == FACTORY
        with torch.no_grad():
            assert torch.equal(rebuilt(x), q(x))
    assert trustnet_log.read_text().split() == ["imported", "called", "called"]


def test_eval_and_export_refuse_it_in_one_line_and_eval_builds_it_on_the_flag(tmp_path,
                                                                            trustnet_log):
    save_checkpoint(tmp_path / "fp32.pt", fp32_payload())
    save_checkpoint(tmp_path / "qat.pt", qat_payload())
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{trustnet_log.parent}"}
    for args in (["eval", "--checkpoint", tmp_path / "fp32.pt"],
                 ["export", "--checkpoint", tmp_path / "qat.pt", "--out", tmp_path / "export"]):
        result = run_script("-m", "mpq", *args, "--quiet", env=env)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert re.search(refusal(args[2]), lines[0]), lines[0]
    assert not trustnet_log.exists()
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "fp32.pt", "--quiet",
                        "--allow-factory", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("top1=")
    assert trustnet_log.read_text().split() == ["imported", "called"]
