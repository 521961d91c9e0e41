"""Fake quantization: primitives, modules, the bit plan, and graph-based preparation."""

from .modules import ActQuantizer, QuantConv, QuantLinear, WeightQuantizer
from .plan import LayerQuant, Plan, load_plan, uniform_plan
from .prepare import (calibrate_, freeze_bn_, prepare_qat, quant_layers, quantizable_layers,
                      reestimate_bn_, trace)
from .primitives import (INT8_WEIGHT_MAX, fake_quantize, mse_optimal_scale, quant_range,
                         round_ste, weight_range)

__all__ = [
    "INT8_WEIGHT_MAX",
    "ActQuantizer",
    "LayerQuant",
    "Plan",
    "QuantConv",
    "QuantLinear",
    "WeightQuantizer",
    "calibrate_",
    "fake_quantize",
    "freeze_bn_",
    "load_plan",
    "mse_optimal_scale",
    "prepare_qat",
    "quant_layers",
    "quant_range",
    "quantizable_layers",
    "reestimate_bn_",
    "round_ste",
    "trace",
    "uniform_plan",
    "weight_range",
]
