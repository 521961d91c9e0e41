"""Which layers' Hessian blocks equal their Gauss-Newton blocks, read off the fx graph.

The Hessian of the loss in one layer's weight W is J^T H_out J + sum_c (dL/dz_c) d^2 z_c / dW^2.
The second term vanishes (almost everywhere) exactly when the logits z are piecewise linear in
W: every operation between W's layer and the output is piecewise linear in the tensors that
depend on W (ReLU, pooling, BN in eval mode, additions, a product with a tensor that does not
depend on W, another conv or linear layer), and the layer is called once. A product of two
tensors that both depend on W (`h * h`, a gate `a(s) * b(s)`), a smooth op (sigmoid, hardswish,
softmax, GELU) on the path, or a second call of the layer make the term real. Decided per
layer: the other layers keep their exact blocks. An allow-list can be fooled (a weight read
again as an attribute, a module that uses batch statistics): `exactness` checks every layer
it calls linear on data.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["layer_linearity"]

_LINEAR_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.Flatten, nn.Identity, nn.Dropout, nn.ZeroPad2d)
# Piecewise linear in each tensor argument (sums, selections, reshapes, ReLU-like, pooling).
_LINEAR_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.getitem,
    torch.add, torch.sub, torch.neg, torch.cat, torch.concat, torch.stack, torch.flatten,
    torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
    torch.chunk, torch.split, torch.mean, torch.sum, torch.relu, torch.maximum, torch.minimum,
    torch.clamp, F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.dropout, F.pad, torch.nn.functional.linear, getattr}
# Linear in each argument separately: piecewise linear while only one argument depends on W.
_BILINEAR_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.matmul, torch.matmul,
                       torch.bmm, torch.einsum}
_LINEAR_METHODS = {"view", "reshape", "flatten", "size", "relu", "relu_", "add", "add_", "sub",
                   "mean", "sum", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                   "chunk", "split", "expand", "expand_as", "clone", "neg", "clamp", "dim",
                   "__getitem__"}
_BILINEAR_METHODS = {"mul", "mul_", "matmul", "bmm"}
_DIVISIONS = {operator.truediv, torch.div, "div", "div_", "__truediv__"}


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a))
    return found


def _name(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _breaks(node: fx.Node, deps: list[fx.Node], modules: dict) -> str | None:
    """Why `node` makes the logits curved in W; `deps` has one entry per argument of `node`
    that depends on W."""
    op, target = node.op, node.target
    if op == "call_module":
        if isinstance(modules[target], _LINEAR_MODULES):
            return None
        return f"{_name(node, modules)} is not piecewise linear"
    if op not in ("call_function", "call_method"):
        return None  # output, placeholders
    if target in _DIVISIONS:
        if any(a in deps for a in _tensor_args(node)[1:]):
            return f"{_name(node, modules)} divides by a tensor that depends on it"
        return None
    if target in (_LINEAR_FUNCTIONS if op == "call_function" else _LINEAR_METHODS):
        return None
    if target in (_BILINEAR_FUNCTIONS if op == "call_function" else _BILINEAR_METHODS):
        if len(deps) > 1:  # one entry per argument that depends on W: `h * h` has two
            return f"{_name(node, modules)} multiplies two tensors that depend on it"
        return None
    return f"{_name(node, modules)} is not piecewise linear"


def layer_linearity(model: nn.Module, layers: list[str]) -> dict[str, str | None]:
    """For each layer: None when the model's output is piecewise linear in its weight (its
    Hessian block is its Gauss-Newton block), else the reason it is not."""
    from ..quant.prepare import trace

    try:
        gm = trace(model)
    except Exception as exc:  # untraceable: nothing is proven
        return {name: f"the model cannot be traced ({exc})" for name in layers}
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    out = {}
    for name in layers:
        if calls[name] != 1:
            out[name] = (f"{name} is called {calls[name]} times" if calls[name]
                         else f"{name} is not called as a module")
            continue
        start = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name)
        depends, reason = {nodes[start]}, None
        for node in nodes[start + 1:]:
            deps = [a for a in _tensor_args(node) if a in depends]
            if not deps:
                continue
            depends.add(node)
            reason = _breaks(node, deps, modules)
            if reason:
                break
        out[name] = reason
    return out
