import json
import re
import zlib

import pytest
import torch

from mpq.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from mpq.errors import UsageError
from mpq.models import build_model


def payload(name="resnet20"):
    model = build_model(name, num_classes=10)
    return {"model": {"name": name, "num_classes": 10}, "state_dict": model.state_dict()}


def test_round_trip_with_weights_only(tmp_path):
    save_checkpoint(tmp_path / "a.pt", payload())
    raw = torch.load(tmp_path / "a.pt", weights_only=True)  # loads without running code
    assert raw["format"] == "mpq.checkpoint"
    model = model_from_checkpoint(load_checkpoint(tmp_path / "a.pt"))
    assert torch.equal(model.fc.weight, raw["state_dict"]["fc.weight"])
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write leaves no temporary file


def test_truncated_and_garbage_files_are_usage_errors(tmp_path):
    save_checkpoint(tmp_path / "a.pt", payload())
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="corrupted"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UsageError, match="corrupted"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UsageError, match="not an mpq checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_other_architecture_is_refused(tmp_path):
    save_checkpoint(tmp_path / "r18.pt", payload("resnet18"))
    loaded = load_checkpoint(tmp_path / "r18.pt")
    with pytest.raises(UsageError, match="'resnet18' model, but 'resnet20' was expected"):
        model_from_checkpoint(loaded, expect_model="resnet20")
    loaded["model"]["name"] = "resnet20"  # a mislabelled file: the weights do not fit
    with pytest.raises(UsageError, match="does not fit the model"):
        model_from_checkpoint(loaded)


def test_a_malformed_checkpoint_names_the_file_and_the_field(tmp_path):
    from mpq.quant import quantizable_layers, uniform_plan

    good = payload()
    plan = uniform_plan("resnet20", quantizable_layers(build_model("resnet20")), w_bits=8)
    cases = [({**good, "kind": "qat"}, "has no 'plan'"),
             ({"model": good["model"]}, "has no 'state_dict'"),
             ({**good, "model": {"num_classes": 10}}, "has no 'model.name'"),
             ({**good, "model": {"name": "resnet20", "num_classes": "ten"}},
              "its 'model.num_classes' should be an integer >= 1, not 'ten'"),
             ({**good, "kind": "qat", "plan": {**plan.to_dict(), "layers": [1]}},
              "has a malformed plan: a plan needs"),
             ({**good, "input_size": "32"}, "its 'input_size' should be an integer"),
             ({**good, "normalization": {"mean": [0.5]}}, "its 'normalization' should be"),
             ({**good, "state_dict": {"fc.weight": [1.0]}}, "its 'state_dict' should be")]
    for i, (bad, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        save_checkpoint(path, bad)
        with pytest.raises(UsageError, match=rf"checkpoint {re.escape(str(path))}.* "
                                             rf"{re.escape(message)}"):
            model_from_checkpoint(load_checkpoint(path), path=path)


def test_a_model_mpq_with_a_malformed_header_names_the_field(tmp_path):
    from mpq.export import load_mpq
    from mpq.mpqformat import CRC, MAGIC, MPQ_VERSION, PREFIX

    # A header that passes the length and checksum tests but lacks the class count.
    head = json.dumps({"format": "mpq.model", "model": {"name": "resnet20"}, "input_size": 32,
                       "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
                       "w_bits": "", "a_bits": ""}).encode()
    body = PREFIX.pack(MAGIC, MPQ_VERSION, len(head), 0) + head
    (tmp_path / "model.mpq").write_bytes(body + CRC.pack(zlib.crc32(body)))
    with pytest.raises(UsageError, match=r"model.mpq is malformed: it has no 'model.num_classes'"):
        load_mpq(tmp_path / "model.mpq")


def test_a_teacher_comes_as_a_state_dict_a_wrapped_one_or_torchvision_weights(tmp_path,
                                                                              monkeypatch):
    import torchvision

    from mpq.models import build_model
    from mpq.checkpoint import load_teacher

    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        got = load_teacher(tmp_path / name, model_name="resnet20", num_classes=10)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(),
                                                      net.state_dict().values()))
    with pytest.raises(UsageError, match="does not fit the model"):
        load_teacher(tmp_path / "plain.pt", model_name="resnet20", num_classes=100)
    torch.save(net, tmp_path / "module.pt")  # a pickled module only loads by running code
    with pytest.raises(UsageError, match="only loads by running code.*--allow-pickle"):
        load_teacher(tmp_path / "module.pt", model_name="resnet20", num_classes=10)
    from mpq.checkpoint import fp32_payload  # the explicit opt-in reads it

    trusted = fp32_payload(tmp_path / "module.pt", model_name="resnet20", num_classes=10,
                           allow_pickle=True)
    assert all(torch.equal(trusted["state_dict"][k], v) for k, v in net.state_dict().items())
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="neither an mpq checkpoint nor a state dict"):
        load_teacher(tmp_path / "other.pt", model_name="resnet20", num_classes=10)

    # torchvision's enum, with its download stood in for (none can be fetched here)
    reference = build_model("resnet18", num_classes=1000).state_dict()
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", lambda self, **kw: reference)
    got = load_teacher("torchvision:ResNet18_Weights.IMAGENET1K_V1", model_name="resnet18",
                       num_classes=1000)
    assert torch.equal(got.state_dict()["fc.weight"], reference["fc.weight"])
    with pytest.raises(UsageError, match="another architecture"):
        load_teacher("torchvision:ResNet18_Weights.IMAGENET1K_V1", model_name="resnet50",
                     num_classes=1000)
    with pytest.raises(UsageError, match="has no weights"):
        load_teacher("torchvision:ResNet18_Weights.NOPE", model_name="resnet18",
                     num_classes=1000)

    def offline(self, **kw):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", offline)
    with pytest.raises(UsageError, match="could not fetch.*offline, fetch https://"):
        load_teacher("torchvision:ResNet18_Weights.IMAGENET1K_V1", model_name="resnet18",
                     num_classes=1000)
