"""Distillation from the FP32 teacher, what QAT minimises:

    loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels)
           + beta * mean over layers of ||f_student - f_teacher||^2 / ||f_teacher||^2

with p = softmax(logits / T), KL averaged over the batch (`batchmean`, Hinton et al. 2015): in
torch's argument order, `kl_div(log p_student, log p_teacher)`. The feature term (off unless
beta = `qat.feature_weight` > 0) compares each quantized layer's output, its folded BN
included, with the teacher's output at the same point (its BN, else the layer): the error each
layer's quantization adds, normalised by that layer's signal so that every layer counts alike
whatever its scale. The teacher runs in eval mode without gradients.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .quant import quant_layers, quantizable_layers, trace

__all__ = ["FeatureTaps", "distillation_loss", "distillation_step_loss"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, alpha: float, temperature: float):
    """Returns (loss, {"kd": ..., "ce": ...}) of the logits; see the module docstring."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                  F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}


def teacher_points(teacher: nn.Module) -> dict[str, str]:
    """For each quantizable layer the teacher calls once, the module whose output the student's
    quantized layer stands for: the BN right after it (the one QAT folds), else the layer."""
    gm = trace(teacher)
    modules = dict(gm.named_modules())
    layers = set(quantizable_layers(teacher))
    calls: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in layers:
            calls.setdefault(node.target, []).append(node)
    points = {}
    for name, nodes in calls.items():
        if len(nodes) != 1:
            continue  # a module called twice has two outputs: no single point to compare
        users = list(nodes[0].users)
        bn = users[0] if len(users) == 1 and users[0].op == "call_module" and isinstance(
            modules.get(users[0].target), _BATCHNORMS) else None
        points[name] = bn.target if bn is not None else name
    return points


class FeatureTaps:
    """Forward hooks keeping, for one step, each quantized layer's output in the student and the
    teacher's output at the same point (`teacher_points`); `loss()` is the feature term. They
    keep outputs only inside `recording()` (the step's two forwards): an evaluation pass would
    otherwise hold every layer's output of its batch alive."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        points = teacher_points(teacher)
        layers = quant_layers(student)
        teacher_modules = dict(teacher.named_modules())
        self.names = [name for name in layers if name in points]
        if not self.names:
            raise ValueError("no quantized layer of the student has a single output to compare "
                             "with the teacher's")
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.on = False
        self.handles = []
        for name in self.names:
            self.handles.append(layers[name].register_forward_hook(self._keep(self.student, name)))
            self.handles.append(teacher_modules[points[name]].register_forward_hook(
                self._keep(self.teacher, name)))

    def _keep(self, store: dict, name: str):
        def hook(module, args, output):
            if self.on:
                store[name] = output
        return hook

    @contextlib.contextmanager
    def recording(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def loss(self) -> torch.Tensor:
        """The mean over layers of the normalised squared error; clears what it read."""
        terms = []
        for name in self.names:
            s, t = self.student.pop(name), self.teacher.pop(name).detach()
            terms.append((s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean()
                         .clamp_min(1e-12))
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def folded_teacher(teacher: nn.Module) -> nn.Module:
    """A copy of the (eval-mode) teacher with each BN folded into the conv before it: the same
    function to float rounding, one pass fewer over each activation (benchmarks/qat_step.py
    times both). The teacher itself if it does not trace, or is not in eval mode."""
    from torch.fx.experimental.optimization import fuse

    if teacher.training:
        return teacher
    try:
        folded = fuse(trace(teacher), no_trace=True)
    except Exception:  # noqa: BLE001 - untraceable or unusual models keep their BN
        return teacher
    if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(
            memory_format=torch.channels_last) for p in teacher.parameters()):
        folded = folded.to(memory_format=torch.channels_last)  # as the teacher was
    return folded.requires_grad_(False)


def distillation_step_loss(teacher: nn.Module, cfg, student: nn.Module | None = None):
    """The loss of one QAT step, `(student, x, y) -> (loss, logits, terms)`: distillation from
    `teacher` (eval mode, no gradients) with the settings of `cfg` (a `QATConfig`). The feature
    term (`cfg.feature_weight` > 0) needs the `student` whose layers it taps."""
    taps = None
    if cfg.feature_weight > 0:
        if student is None:
            raise ValueError("feature distillation needs the student to tap its layers")
        taps = FeatureTaps(teacher, student)  # taps the teacher's BN outputs: kept unfolded
    else:
        teacher = folded_teacher(teacher)

    def loss_fn(model, x, y):
        with taps.recording() if taps is not None else contextlib.nullcontext():
            with torch.no_grad():
                t_logits = teacher(x)
            logits = model(x)
        loss, terms = distillation_loss(logits, t_logits, y, alpha=cfg.alpha,
                                        temperature=cfg.temperature)
        if taps is not None:
            feature = taps.loss()
            loss = loss + cfg.feature_weight * feature
            terms["feature"] = feature.detach()
        return loss, logits, terms
    return loss_fn
