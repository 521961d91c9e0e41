"""What the exporters read off a fake-quantized model's graph: for each node, whether its
output goes straight into one activation quantizer (possibly through a ReLU), so that an int8
kernel can write that quantizer's grid directly."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.modules import ActQuantizer

__all__ = ["ADD_FUNCTIONS", "act_params", "output_grid"]

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (torch.relu, F.relu, torch.relu_)


def act_params(q: ActQuantizer) -> tuple[float, int, int, int]:
    """(scale, zero point, qmin, qmax) of a quantizer as an unsigned 8-bit grid: signed values
    sit at zero point 128 (exactly the same values, and the fast u8 x s8 kernels)."""
    qmin, qmax = q.qrange
    zero_point = 128 if bool(q.signed) else 0
    return float(q.scale.detach().abs()), zero_point, qmin + zero_point, qmax + zero_point


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _single_quantizer(users, modules) -> ActQuantizer | None:
    quantizers = [modules[u.target] for u in users
                  if u.op == "call_module" and isinstance(modules.get(u.target), ActQuantizer)]
    if not users or len(quantizers) != len(users):
        return None
    first = act_params(quantizers[0])
    if quantizers[0].bits != 8 or any(act_params(q) != first for q in quantizers[1:]):
        return None
    return quantizers[0]


def output_grid(node: fx.Node, modules: dict) -> tuple[ActQuantizer | None, fx.Node | None]:
    """The 8-bit quantizer that all of `node`'s output goes into (or None), and the ReLU in
    between when there is one (it then fuses into the producing kernel)."""
    users = list(node.users)
    if len(users) == 1 and _is_relu(users[0], modules):
        q = _single_quantizer(list(users[0].users), modules)
        if q is not None and not bool(q.signed):
            return q, users[0]
        return None, None
    return _single_quantizer(users, modules), None
