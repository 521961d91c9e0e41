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
