"""Per-layer Hessian sensitivity: traces and top eigenvalues with standard errors.

`layer_sensitivity` is the entry point; `linearity` decides per layer whether the Hessian block
equals the Gauss-Newton block and `exactness` checks each such verdict on data, `ggn` computes
that block exactly (few classes) or from random draws shaped by the model's predictions (any
number of classes), `hutchinson` estimates the Hessian itself.
"""

from .estimate import DRAWS, ESTIMATORS, is_piecewise_linear, layer_sensitivity
from .record import LayerSensitivity

__all__ = ["DRAWS", "ESTIMATORS", "LayerSensitivity", "is_piecewise_linear", "layer_sensitivity"]
