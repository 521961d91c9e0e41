import json

import pytest

from mpq.errors import UsageError
from mpq.quant import LayerQuant, Plan, load_plan, uniform_plan

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]


def test_plan_json_round_trip_is_exact(tmp_path):
    plan = Plan(model="resnet20",
                layers={"conv1": {"w_bits": 8, "a_bits": 8},
                        "re:layer1\\..*": {"w_bits": 3, "a_bits": 6, "note": "kept"},
                        "fc": {"w_bits": None, "a_bits": None}},
                extra={"size_bytes": 1234, "budget_bytes": 2000, "score": 0.5})
    plan.save(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    again = load_plan(tmp_path / "plan.json")
    assert again == plan and again.to_dict() == json.loads(text)
    assert list(again.layers) == list(plan.layers)  # order (first match wins) survives
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text


def test_resolve_first_match_wins_and_float_layers():
    plan = Plan(model="m", layers={"layer1.0.conv2": {"w_bits": 2, "a_bits": 8},
                                   "re:layer1\\..*": {"w_bits": 4, "a_bits": 8},
                                   "re:.*": {"w_bits": 8, "a_bits": None}})
    got = plan.resolve(LAYERS)
    assert got["layer1.0.conv2"] == LayerQuant(2, 8)
    assert got["layer1.0.conv1"] == LayerQuant(4, 8)
    assert got["fc"] == LayerQuant(8, None)


def test_mismatch_lists_unknown_and_missing_layers():
    plan = Plan(model="m", layers={"conv1": {"w_bits": 4, "a_bits": 8},
                                   "layer9.conv": {"w_bits": 4, "a_bits": 8}})
    with pytest.raises(UsageError) as err:
        plan.resolve(LAYERS)
    message = str(err.value)
    assert "names no layer of the model: layer9.conv" in message
    assert "does not cover: layer1.0.conv1, layer1.0.conv2, fc" in message


@pytest.mark.parametrize("bits", [1, 9, 16, 4.5, True, "4"])
def test_bits_outside_range_are_refused(bits):
    with pytest.raises(UsageError, match="outside 2..8"):
        Plan(model="m", layers={"conv1": {"w_bits": bits, "a_bits": 8}})
    with pytest.raises(UsageError, match="outside 2..8"):
        uniform_plan("m", LAYERS, w_bits=bits)


def test_malformed_plan_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"layers": {}}')
    with pytest.raises(UsageError, match="not an mpq plan"):
        load_plan(tmp_path / "other.json")
    with pytest.raises(UsageError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
