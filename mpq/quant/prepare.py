"""Turning an FP32 model into a fake-quantized one, following its traced graph.

`prepare_qat` traces the model with `torch.fx`, then:
- replaces every quantizable layer (`Conv1d`, `Conv2d` incl. grouped/depthwise, `Linear`) that
  the plan quantizes with `QuantConv`/`QuantLinear`; a conv whose only user is a BatchNorm gets
  that BN folded in (found from the graph, not from module names);
- quantizes activations per *tensor*, not per consumer: one `ActQuantizer` (named
  `act_quant_<producer>`) right after each tensor that enters a quantized layer (at that layer's
  `a_bits`) or an addition or concatenation (8 bits), shared by all those consumers. A tensor
  then has one scale wherever it is used, as in the exported int8 graph, where each quantized
  tensor is stored once (a ResNet block's input feeds its first conv and its shortcut add).

`calibrate_` then sets every activation scale from a few batches; after QAT,
`reestimate_bn_` recomputes BN statistics for the weights training ended with.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, fields

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UsageError, blame
from .modules import SCALE_MODES, WEIGHT_STES, ActQuantizer, QuantConv, QuantLinear, _QuantLayer
from .plan import Plan

__all__ = ["QuantConfig", "Quantization", "calibrate_", "freeze_bn_", "prepare_qat",
           "quant_layers", "quantizable_layers", "quantization_of", "reestimate_bn_", "trace"]

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_CAT_FUNCTIONS = (torch.cat, torch.concat)
_META_KEY = "mpq.quantization"


@dataclass(frozen=True)
class QuantConfig:
    """How `prepare_qat` applies a plan.

    `weight_scale`: `mse`, `max`, `lsq`, or `fixed` for scales set from outside (a model rebuilt
    from its file); see `WeightQuantizer`. `learn_act_scale`: train activation scales with the
    LSQ gradient. `quantize_joins`: quantize the inputs of additions and concatenations to 8
    bits, as the int8 graph computes them. `weight_ste`: `clip` (no gradient reaches a weight
    beyond its clipping range) or `identity` (every weight gets one; mse or max scales).
    `freeze_oscillations`: > 0 freezes each weight whose oscillation frequency exceeds it
    (`WeightQuantizer`'s `freeze_threshold`); 0: off."""

    weight_scale: str = "mse"
    learn_act_scale: bool = False
    quantize_joins: bool = True
    weight_ste: str = "clip"
    freeze_oscillations: float = 0.0

    def __post_init__(self):
        if self.weight_scale not in SCALE_MODES:
            raise UsageError(f"weight_scale must be one of {', '.join(SCALE_MODES)}; got "
                             f"{self.weight_scale!r}")
        if self.weight_ste not in WEIGHT_STES:
            raise UsageError(f"weight_ste must be one of {', '.join(WEIGHT_STES)}; got "
                             f"{self.weight_ste!r}")
        if self.weight_ste == "identity" and self.weight_scale == "lsq":
            raise UsageError("weight_ste identity needs an mse or max weight scale: a learned "
                             "(lsq) scale takes LSQ's gradient, which clips")
        if not 0 <= self.freeze_oscillations < 1:
            raise UsageError(f"freeze_oscillations is an oscillation frequency in [0, 1) "
                             f"(0: off); got {self.freeze_oscillations}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        """From `to_dict`'s form (absent keys: the defaults; unknown ones ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class Quantization:
    """What a prepared model carries (in `gm.meta`, which copies keep): its plan, its
    quantizable layers in order, and the config it was prepared with."""

    plan: Plan
    layers: tuple[str, ...]
    config: QuantConfig


def quantization_of(qmodel: nn.Module) -> Quantization:
    """The `Quantization` of a model `prepare_qat` made."""
    found = getattr(qmodel, "meta", {}).get(_META_KEY)
    if not isinstance(found, Quantization):
        raise TypeError(f"{type(qmodel).__name__} was not prepared by mpq.quant.prepare_qat")
    return found


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers a plan can quantize, in module order (a module the model uses in
    several places once). Two layers that share one weight tensor are refused: one module
    used twice is what quantizes and stores a weight once."""
    names, owner = [], {}
    for name, m in model.named_modules():
        if not isinstance(m, QUANTIZABLE):
            continue
        other = owner.setdefault(id(m.weight), name)
        if other != name:
            raise UsageError(f"layers {other!r} and {name!r} share one weight tensor (tied "
                             f"weights); use the module itself in both places (as "
                             f"`self.b = self.a`), so its weight is quantized and stored once")
        names.append(name)
    return names


def _shared_batchnorm(nodes: list[fx.Node], modules: dict) -> nn.Module | None:
    """The BN that every call of a conv feeds, and nothing else feeds (None: not foldable)."""
    bns = []
    for node in nodes:
        users = list(node.users)
        if not (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], BATCHNORMS)
                and modules[users[0].target].track_running_stats):
            return None
        bns.append(users[0])
    targets = {n.target for n in bns}
    if len(targets) != 1:
        return None
    (target,) = targets
    fed = [n for n in nodes[0].graph.nodes if n.op == "call_module" and n.target == target]
    return modules[target] if len(fed) == len(bns) else None


def trace(model: nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace`. A failure of the user's model is an actionable `UsageError`
    naming the user's file and line; one of mpq's own code keeps its traceback."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        who = blame(exc)
        if who.owner == "mpq":
            raise
        if who.raised_there:  # the user's forward raised it itself
            raise UsageError(f"your model raised {who.describe()} at {who.where} (in "
                             f"{who.function}) while torch.fx traced it; its forward runs on "
                             f"symbolic values then, not tensors: fix it there") from None
        where = f" in {who.function} at {who.where}" if who.where else ""
        raise UsageError(f"the model cannot be traced with torch.fx{where}: {who.describe()}; "
                         f"make that code traceable: no Python branch or loop on tensor "
                         f"values (torch.where or a fixed shape instead), no op torch.fx "
                         f"cannot record") from None


def _is_tensor(node) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _joins(node: fx.Node) -> list[fx.Node]:
    """Tensor inputs of an addition or concatenation node (empty for any other node)."""
    if (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("add", "add_")):
        return [a for a in node.args[:2] if _is_tensor(a)] if _is_tensor(node) else []
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in tensors if _is_tensor(a)]
    return []


def prepare_qat(model: nn.Module, plan: Plan, *, example_inputs: tuple,
                config: QuantConfig | None = None) -> fx.GraphModule:
    """Returns a fake-quantized copy of `model` following `plan` (the model is not changed);
    `quantization_of` tells how it was prepared.

    Args:
        model: the FP32 model (its BN statistics and weights are copied).
        plan: bit widths per layer; must cover exactly the model's quantizable layers.
        example_inputs: inputs for one forward pass (shapes tell tensors from other values).
        config: how to quantize (`QuantConfig`; its defaults by default).
    """
    config = config or QuantConfig()
    settings = plan.resolve(quantizable_layers(model))
    gm = trace(copy.deepcopy(model).eval())
    ShapeProp(gm).propagate(*example_inputs)
    modules = dict(gm.named_modules())
    wants: dict[fx.Node, dict[int, list[fx.Node]]] = {}  # tensor -> bits -> consumers

    def want(tensor, bits, consumer):
        if isinstance(tensor, fx.Node):
            users = wants.setdefault(tensor, {}).setdefault(bits, [])
            if consumer not in users:
                users.append(consumer)

    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in settings:
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        s = settings[target]
        if s.w_bits is None and s.a_bits is None:
            continue
        layer = modules[target]
        kwargs = dict(weight_scale=config.weight_scale, weight_ste=config.weight_ste,
                      freeze_threshold=config.freeze_oscillations)
        if isinstance(layer, nn.Linear):
            wrapper = QuantLinear(layer, s.w_bits, s.a_bits, **kwargs)
        else:
            bn = _shared_batchnorm(nodes, modules)
            if bn is not None:  # every call feeds the same BN: fold it
                for node in nodes:
                    (bn_node,) = node.users
                    bn_node.replace_all_uses_with(node)
                    gm.graph.erase_node(bn_node)
            wrapper = QuantConv(layer, bn, s.w_bits, s.a_bits, **kwargs)
        gm.set_submodule(target, wrapper)
        for call, node in enumerate(nodes):
            if call:  # one weight, one quantizer; each call its own input grid
                node.kwargs = {**node.kwargs, "call": call}
            if s.a_bits is not None:
                want(node.args[0], s.a_bits, node)
    missing = [name for name, s in settings.items()
               if name not in calls and (s.w_bits is not None or s.a_bits is not None)]
    if missing:
        raise UsageError(f"layers {', '.join(missing)} are not called as modules in the traced "
                         f"graph (e.g. their weight is used through a functional call); leave "
                         f"them in float in the plan (w_bits: null, a_bits: null)")
    if config.quantize_joins:
        for node in gm.graph.nodes:
            for inp in _joins(node):
                want(inp, 8, node)
    for tensor, by_bits in wants.items():
        for bits, consumers in by_bits.items():
            name = f"act_quant_{tensor.name}" + (f"_a{bits}" if len(by_bits) > 1 else "")
            gm.add_submodule(name, ActQuantizer(bits, learn_scale=config.learn_act_scale))
            with gm.graph.inserting_after(tensor):
                q = gm.graph.call_module(name, (tensor,))
            for consumer in consumers:
                consumer.replace_input_with(tensor, q)
                if consumer.op == "call_module":
                    gm.get_submodule(consumer.target).link_input_quant(
                        gm.get_submodule(name), consumer.kwargs.get("call", 0))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.meta[_META_KEY] = Quantization(plan, tuple(settings), config)
    return gm


@torch.no_grad()
def calibrate_(model: nn.Module, batches) -> int:
    """Sets every activation quantizer's signedness and MSE-optimal scale from `batches`.

    `batches` yields input tensors (or (input, label) pairs). BN runs in eval mode. Returns
    the number of batches used.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.start_calibration()
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate_ needs at least one batch")
    for q in quantizers:
        q.finish_calibration()
    return n


def freeze_bn_(model: nn.Module) -> None:
    """Stops BN statistics from changing: folded layers then compute exactly what is exported."""
    for m in model.modules():
        if isinstance(m, QuantConv):
            m.freeze_bn_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # a BN left in float (not folded): use running statistics


@torch.no_grad()
def reestimate_bn_(model: nn.Module, batches) -> int:
    """Replaces the running statistics of every live BN by their exact average over `batches`.

    During QAT, BN's running statistics are an exponential average over the last ~10 batches
    (momentum 0.1) of weights that kept moving, and low-bit weights keep flipping between
    grid points to the end; the folded layer that is exported divides by those statistics.
    Re-estimating them for the final weights is Nagel et al. 2022's ("Overcoming oscillations
    in quantization-aware training") cheap fix.

    Only BN statistics change: weights, weight quantizers (no scale refresh) and activation
    scales stay as they are, and so does the grid each weight falls on (every scale mode is
    per-channel invariant to the fold factor). A BN already frozen into its conv has nothing
    to re-estimate. `batches` yields inputs or (input, label) pairs; returns the number used
    (0 when there is no live BN).
    """
    live = [m for m in model.modules() if isinstance(m, QuantConv) and m.bn is not None
            and not bool(m.bn_frozen)]
    folded = {id(m.bn) for m in model.modules() if isinstance(m, QuantConv) and m.bn is not None}
    floating = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and id(m) not in folded and m.track_running_stats]
    bns = [m.bn for m in live] + floating
    if not bns:
        return 0
    was_training = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
    model.eval()
    for m in live:  # the batch-statistics path; under no_grad its weight quantizer takes no step
        m.train()
    for bn in floating:
        bn.train()
    n = 0
    try:
        for batch in batches:
            for bn in bns:  # momentum 1/(n+1): the running value is the mean of all batches
                bn.momentum = 1.0 / (n + 1)
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            n += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, training in was_training.items():
            m.training = training
    if n == 0:
        raise ValueError("reestimate_bn_ needs at least one batch")
    return n


def quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    """The quantized layers of a prepared model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QuantLayer)}
