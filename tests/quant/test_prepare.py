"""What a prepared model carries: its plan, layers and config as one typed value."""

import copy

import pytest
import torch

from mpq.errors import UsageError
from mpq.models import build_model
from mpq.quant import (QuantConfig, Quantization, prepare_qat, quant_layers, quantizable_layers,
                       quantization_of, uniform_plan)


def test_the_prepared_model_carries_its_plan_layers_and_config():
    model = build_model("resnet20").eval()
    names = quantizable_layers(model)
    plan = uniform_plan("resnet20", names, w_bits=4)
    config = QuantConfig(weight_scale="lsq", learn_act_scale=True, quantize_joins=False)
    q = prepare_qat(model, plan, example_inputs=(torch.zeros(1, 3, 32, 32),), config=config)
    found = quantization_of(copy.deepcopy(q))  # copies keep it
    assert found == Quantization(plan, tuple(names), config)
    assert {m.weight_quant.mode for m in quant_layers(q).values()} == {"lsq"}
    assert not [n for n in dict(q.named_modules()) if "add" in n]  # no join quantizers
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="not prepared"):
        quantization_of(model)


def test_an_unknown_weight_scale_is_refused():
    with pytest.raises(UsageError, match="weight_scale must be one of"):
        QuantConfig(weight_scale="minmax")
