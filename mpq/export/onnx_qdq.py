"""ONNX export in the QDQ form: QuantizeLinear/DequantizeLinear around float ops, int8 weights
and int32 biases as initializers. ONNX Runtime fuses DQ -> Conv -> (Relu) -> Q into QLinearConv
(uint8 activations, int8 weights: its fast kernels); any other op runs in float on dequantized
values, which is exactly what the fake-quantized model computes.

Sub-8-bit weights stay on their grid inside int8 tensors; sub-8-bit activations get a Clip before
their QuantizeLinear (exact, but that quantizer then does not fuse).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops
import torch.nn.functional as F                #  before the ONNX exporter builds its registry)
from torch import fx, nn

from ..errors import UsageError, blame
from ..files import atomic_path
from ..quant.modules import ActQuantizer, QuantLinear, _QuantLayer
from .graph import act_params
from .mpqfile import int_bias, int_weight

__all__ = ["export_onnx", "qdq_module"]

OPSET = 18
_INT32 = 2 ** 31 - 1


def _qd():
    return torch.ops.quantized_decomposed


class _QDQ(nn.Module):
    """QuantizeLinear + DequantizeLinear on an unsigned 8-bit grid."""

    def __init__(self, q: ActQuantizer):
        super().__init__()
        self.scale, self.zero_point, qmin, qmax = act_params(q)
        self.clip = None
        if (qmin, qmax) != (0, 255):
            self.clip = ((qmin - self.zero_point) * self.scale,
                         (qmax - self.zero_point) * self.scale)

    def forward(self, x):
        qd = _qd()
        if self.clip is not None:
            x = x.clamp(*self.clip)
        x = qd.quantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)
        return qd.dequantize_per_tensor(x, self.scale, self.zero_point, 0, 255, torch.uint8)


class _QDQLayer(nn.Module):
    """A conv or linear layer whose weight is DequantizeLinear(int8) and whose bias, when its
    input is quantized, is DequantizeLinear(int32) at scale input_scale * weight_scale."""

    def __init__(self, layer: _QuantLayer, name: str, call: int = 0):
        super().__init__()
        inner = layer.layer
        self.linear = isinstance(layer, QuantLinear)
        if not self.linear:
            if inner.padding_mode != "zeros":
                raise UsageError(f"layer {name!r} uses padding_mode={inner.padding_mode!r}; the "
                                 f"ONNX export handles zero padding only: leave it in float")
            self.conv = {"stride": inner.stride, "padding": inner.padding,
                         "dilation": inner.dilation, "groups": inner.groups,
                         "dim": inner.weight.dim() - 2}
        with torch.no_grad():
            bias = layer.folded_bias() if hasattr(layer, "folded_bias") else inner.bias
            bias = None if bias is None else bias.detach().float()
            if layer.w_bits is None:
                self.register_buffer("weight", layer.effective_weight().detach().float().clone())
                self.register_buffer("bias", bias)
                self.w_range = None
                return
            k, scale = int_weight(layer)
            self.w_range = (layer.weight_quant.qmin, layer.weight_quant.qmax)
            self.register_buffer("weight_int8", k)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("zero_points", torch.zeros(len(scale), dtype=torch.int64))
            quantized_bias = int_bias(layer, scale, call)
            self.bias_int = quantized_bias is not None
            if self.bias_int:
                self.register_buffer("bias_int32", quantized_bias[0])
                self.register_buffer("bias_scale", quantized_bias[1])
            else:  # a float bias: exact, but ONNX Runtime then leaves the layer unfused
                self.register_buffer("bias", bias)

    def forward(self, x):
        qd = _qd()
        if self.w_range is None:
            w, b = self.weight, self.bias
        else:
            w = qd.dequantize_per_channel(self.weight_int8, self.weight_scale, self.zero_points,
                                          0, *self.w_range, torch.int8)
            b = (qd.dequantize_per_channel(self.bias_int32, self.bias_scale, self.zero_points,
                                           0, -_INT32 - 1, _INT32, torch.int32)
                 if self.bias_int else self.bias)
        if self.linear:
            return F.linear(x, w, b)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.conv["dim"] - 1]
        return conv(x, w, b, self.conv["stride"], self.conv["padding"], self.conv["dilation"],
                    self.conv["groups"])


def qdq_module(qmodel: fx.GraphModule) -> fx.GraphModule:
    """A copy of a fake-quantized model (eval mode) built from QDQ ops, ready for ONNX."""
    # shares parameters; submodules are replaced, and the graph's copy loses the `call` kwargs
    gm = fx.GraphModule(qmodel, copy.deepcopy(qmodel.graph))
    modules = dict(qmodel.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, ActQuantizer):
            gm.set_submodule(node.target, _QDQ(module))
        elif isinstance(module, _QuantLayer):
            call = node.kwargs.get("call", 0)
            target = f"{node.target}_call{call}" if call else node.target  # a module per call
            gm.add_submodule(target, _QDQLayer(module, node.target, call))
            node.target, node.kwargs = target, {}
    gm.recompile()
    return gm.eval()


def export_onnx(qmodel: fx.GraphModule, path: str | os.PathLike, *, input_shape) -> None:
    """Writes the QDQ ONNX model of a fake-quantized model; input `input` (batch dynamic),
    output `logits`. Checked with `onnx.checker` (full check) before returning."""
    import onnx

    module = qdq_module(qmodel)
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=OPSET, input_names=["input"],
                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False)
        except Exception as exc:  # the exporter raises many kinds; name the op it could not
            who = blame(exc)
            if who.owner == "mpq":  # mpq's QDQ modules or their ops: a bug, not the model's
                raise
            if who.raised_there:
                raise UsageError(f"your model raised {who.describe()} at {who.where} (in "
                                 f"{who.function}) while it was exported to ONNX; fix it "
                                 f"there, or train with --no-export") from None
            detail = next((ln.strip() for ln in str(exc).splitlines()
                           if "No ONNX function" in ln or "Unsupported" in ln), None)
            detail = detail or who.describe()
            where = f" at {who.where} (in {who.function})" if who.where else ""
            raise UsageError(f"the model cannot be exported to ONNX{where} ({detail[:300]}); "
                             f"leave the layer using that op in float in the plan, or train "
                             f"with --no-export") from None
    model = program.model_proto
    for node in model.graph.node:  # the exporter's per-node stack traces: half the file
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))  # one file: weights inside, not beside it
