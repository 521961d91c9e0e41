"""Per-layer Hessian sensitivity: traces and top eigenvalues with standard errors.

`layer_sensitivity` is the entry point; `linearity` decides per layer whether the Hessian block
equals the Gauss-Newton block, `ggn` computes that block exactly (few classes) or from labels
drawn from the model (any number of classes), `hutchinson` estimates the Hessian itself.
"""

from .estimate import ESTIMATORS, is_piecewise_linear, layer_sensitivity
from .record import LayerSensitivity

__all__ = ["ESTIMATORS", "LayerSensitivity", "is_piecewise_linear", "layer_sensitivity"]
