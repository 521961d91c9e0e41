"""Fake quantization: primitives, modules, the bit plan, and graph-based preparation."""

from .gptq import gptq_init_
from .modules import ActQuantizer, QuantConv, QuantLinear, WeightQuantizer
from .plan import LayerQuant, Plan, load_plan, uniform_plan
from .prepare import (QuantConfig, Quantization, calibrate_, freeze_bn_, prepare_qat,
                      quant_layers, quantizable_layers, quantization_of, reestimate_bn_, trace)
from .primitives import (INT8_WEIGHT_MAX, fake_quantize, mse_optimal_scale, quant_range,
                         round_ste, weight_range)

__all__ = [
    "INT8_WEIGHT_MAX",
    "ActQuantizer",
    "LayerQuant",
    "Plan",
    "QuantConfig",
    "QuantConv",
    "QuantLinear",
    "Quantization",
    "WeightQuantizer",
    "calibrate_",
    "fake_quantize",
    "freeze_bn_",
    "gptq_init_",
    "load_plan",
    "mse_optimal_scale",
    "prepare_qat",
    "quant_layers",
    "quant_range",
    "quantizable_layers",
    "quantization_of",
    "reestimate_bn_",
    "round_ste",
    "trace",
    "uniform_plan",
    "weight_range",
]
