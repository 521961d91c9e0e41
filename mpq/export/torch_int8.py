"""A PyTorch int8 model on the x86 quantized kernels, saved as TorchScript (plain `torch.jit.load`
runs it; no mpq needed).

Built node by node from the fake-quantized graph: a conv or linear layer whose input is
quantized and whose output goes into one 8-bit quantizer (through a ReLU or not) becomes an int8
kernel that writes that quantizer's grid directly (`ConvReLU2d` when the ReLU fuses); so does an
addition. Everything else runs in float on dequantized values, exactly as in the fake-quantized
model. Activations are `quint8` (signed ones at zero point 128), weights `qint8` per channel.

`torch.ao.quantization` is deprecated upstream (its successor lives in torchao); this module is
the only place that uses it, so moving the PyTorch int8 path means changing this file alone.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import fx, nn

from ..files import atomic_path
from ..quant.modules import ActQuantizer, QuantLinear, _QuantLayer
from .graph import ADD_FUNCTIONS, act_params, output_grid
from .mpqfile import int_weight

__all__ = ["int8_module", "save_torch_int8"]


def _quantized_layer(layer: _QuantLayer, relu: bool, scale: float, zero_point: int,
                     call: int) -> nn.Module:
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    inner = layer.layer
    k, w_scale = int_weight(layer)
    qweight = torch._make_per_channel_quantized_tensor(
        k, w_scale.double(), torch.zeros(len(w_scale), dtype=torch.int64), 0)
    # The bias as the fake-quantized layer uses it (on its int32 grid); the x86 kernels add a
    # float bias exactly.
    bias = layer.quant_weight_bias(layer.effective_weight(), layer.folded_bias(), call)[1]
    bias = None if bias is None else bias.detach().float()
    if isinstance(layer, QuantLinear):
        module = (nniq.LinearReLU if relu else nnq.Linear)(inner.in_features,
                                                            inner.out_features)
    else:
        kinds = {1: (nnq.Conv1d, nniq.ConvReLU1d), 2: (nnq.Conv2d, nniq.ConvReLU2d),
                 3: (nnq.Conv3d, nniq.ConvReLU3d)}[inner.weight.dim() - 2]
        module = kinds[relu](inner.in_channels, inner.out_channels, inner.kernel_size,
                             stride=inner.stride, padding=inner.padding,
                             dilation=inner.dilation, groups=inner.groups,
                             padding_mode=inner.padding_mode)
    module.set_weight_bias(qweight, bias)
    module.scale, module.zero_point = float(scale), int(zero_point)
    return module


@torch.no_grad()
def _float_layer(layer: _QuantLayer, call: int) -> nn.Module:
    """The layer in float with its weight on the grid (what the fake-quantized layer computes)."""
    inner = copy.deepcopy(layer.layer)
    w, bias = layer.quant_weight_bias(layer.effective_weight(), layer.folded_bias(), call)
    inner.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    inner.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                        requires_grad=False)
    return inner


def int8_module(qmodel: fx.GraphModule) -> fx.GraphModule:
    """The int8 version of a fake-quantized model (eval mode) as an fx GraphModule."""
    modules = dict(qmodel.named_modules())
    root = copy.deepcopy(qmodel)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    grid: dict[fx.Node, tuple[float, int]] = {}
    dequantized: dict[fx.Node, fx.Node] = {}

    def as_float(old: fx.Node) -> fx.Node:
        new = env[old]
        if new not in grid:
            return new
        if new not in dequantized:
            dequantized[new] = graph.call_method("dequantize", (new,))
        return dequantized[new]

    def add_module(name: str, module: nn.Module) -> str:
        target = "int8_" + name.replace(".", "_")
        root.add_module(target, module)
        return target

    for node in qmodel.graph.nodes:
        if node in env:  # a ReLU fused into its producer
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, ActQuantizer):
            scale, zero_point, qmin, qmax = act_params(module)
            src = env[node.args[0]]
            if grid.get(src) == (scale, zero_point) and (qmin, qmax) == (0, 255):
                env[node] = src
                continue
            x = as_float(node.args[0])
            if (qmin, qmax) != (0, 255):  # fewer than 8 bits: clip to the narrower grid
                x = graph.call_method("clamp", (x, (qmin - zero_point) * scale,
                                                (qmax - zero_point) * scale))
            new = graph.call_function(torch.quantize_per_tensor,
                                      (x, scale, zero_point, torch.quint8))
            grid[new] = (scale, zero_point)
        elif isinstance(module, _QuantLayer):
            quantizer, relu = output_grid(node, modules)
            src, call = node.args[0], node.kwargs.get("call", 0)
            name = f"{node.target}_call{call}" if call else node.target  # a module per call
            if module.w_bits is not None and env[src] in grid and quantizer is not None:
                scale, zero_point, _, _ = act_params(quantizer)
                target = add_module(name, _quantized_layer(module, relu is not None, scale,
                                                           zero_point, call))
                new = graph.call_module(target, (env[src],))
                grid[new] = (scale, zero_point)
                if relu is not None:
                    env[relu] = new
            else:
                new = graph.call_module(add_module(name, _float_layer(module, call)),
                                        (as_float(src),))
        elif (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2
              and all(isinstance(a, fx.Node) and env[a] in grid for a in node.args)
              and output_grid(node, modules)[0] is not None):
            quantizer, relu = output_grid(node, modules)
            scale, zero_point, _, _ = act_params(quantizer)
            op = torch.ops.quantized.add_relu if relu is not None else torch.ops.quantized.add
            new = graph.call_function(op, (env[node.args[0]], env[node.args[1]], scale,
                                           zero_point))
            grid[new] = (scale, zero_point)
            if relu is not None:
                env[relu] = new
        else:
            new = graph.node_copy(node, as_float)
        env[node] = new
    gm = fx.GraphModule(root, graph)
    gm.delete_all_unused_submodules()
    return gm.eval()


def save_torch_int8(qmodel: fx.GraphModule, path: str | os.PathLike, *, input_shape) -> nn.Module:
    """Writes the TorchScript int8 model of a fake-quantized model; returns the loaded copy."""
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        module = int8_module(qmodel)
        example = torch.zeros(2, *input_shape)
        scripted = torch.jit.trace(module, (example,), check_trace=False)
        scripted = torch.jit.freeze(scripted.eval())
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp))
        return torch.jit.load(str(path))  # (TorchScript's deprecation notice: users load it too)
