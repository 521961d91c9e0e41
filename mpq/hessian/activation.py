"""How much rounding each quantized layer's input activation perturbs the loss: the trace of the
Gauss-Newton block of the loss in that input, per image, exactly, and the perturbation of each
activation bit width that it weighs.

For image n and the input x_n of layer i (d_i values per image), G_n = J_n^T (diag p_n -
p_n p_n^T) J_n with J_n the Jacobian of the image's logits in x_n, and tr G_n = sum_c
||sqrt(p_nc) J_n^T (e_c - p_n)||^2: C backward passes per batch, each giving every layer's
input gradient at once (no per-sample weight gradients are needed: an input is per image
already). Where the network after x is piecewise linear in it (ReLU networks), G_n is the
Hessian block itself. With many classes (`estimator="sampled"`), tr G_n is estimated instead
by random draws, as the weights' sampled traces are (`ggn._fisher_draw`): any u with
E[u u^T] = diag p - p p^T, backpropagated from the logits, gives g_n = J_n^T u with
E||g_n||^2 = tr G_n, unbiased at one backward pass per draw whatever the number of classes;
each batch draws until every layer's mean trace has a relative standard error of at most
`rel_tol` (or `max_draws`).

The perturbation of quantizing that input at b bits is then

    Omega_i(b) = (1/N) sum_n tr(G_n) / d_i * ||Q_b(x_n) - x_n||^2,

exact in the curvature on these images; estimated in that the rounding error is taken as spread
evenly over the input's directions (E[e e^T] = ||e||^2 / d_i I), as the weights' Omega is (see
`mpq.allocate`). Q_b is mpq's own activation quantizer (`ActQuantizer`), calibrated at b bits
on the same images, so the error is the one QAT starts from. A layer called several times sums
its calls'.
"""

from __future__ import annotations

import torch
from torch import nn

import math

from ..quant.modules import ActQuantizer
from .ggn import _fisher_draw, _prepared, _trace_stats, class_rows

__all__ = ["activation_perturbations", "activation_traces"]


class _Inputs:
    """Each watched layer's input per call, and its gradient after each backward pass."""

    def __init__(self, model: nn.Module, layers: list[str]):
        self.inputs: dict[str, list] = {n: [] for n in layers}
        self.grads: dict[str, dict] = {n: {} for n in layers}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n))
                        for n in layers]

    def _hook(self, name):
        def hook(module, args, out):
            i = len(self.inputs[name])
            x = args[0]
            self.inputs[name].append(x.detach())
            if x.requires_grad:
                x.register_hook(lambda g, i=i: self.grads[name].__setitem__(i, g.detach()))
        return hook

    def clear(self) -> None:
        for n in self.inputs:
            self.inputs[n], self.grads[n] = [], {}

    def clear_grads(self) -> None:
        for n in self.grads:
            self.grads[n] = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _draw_rows(model: nn.Module, x: torch.Tensor, clear, *, draw: str, gen: torch.Generator):
    """Like `class_rows`, but each backward pass is of sum_n u_n . z_n for one random draw u
    (`_fisher_draw`); yields the number of draws so far, forever (the caller stops)."""
    logits = model(x)
    p = torch.softmax(logits, dim=1).detach().double()
    k = 0
    while True:
        u = _fisher_draw(p.cpu(), draw, gen).to(logits.device, logits.dtype)
        clear()
        (u * logits).sum().backward(retain_graph=True)
        k += 1
        yield k


def activation_traces(model: nn.Module, layers: list[str], batches, *, estimator: str = "exact",
                      draw: str = "signs", rel_tol: float = 0.05, min_draws: int = 8,
                      max_draws: int = 256, seed: int = 0
                      ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """Per layer and call, tr G_n of every image (a float64 tensor over the images of all
    `batches`) and the inputs themselves (float32, per batch concatenated): exactly (C backward
    passes per batch), or with `estimator="sampled"` from random draws (module docstring)."""
    if estimator not in ("exact", "sampled"):
        raise ValueError(f"estimator must be exact or sampled, got {estimator!r}")
    gen = torch.Generator().manual_seed(seed)
    model = _prepared(model)
    device = next(model.parameters()).device
    capture = _Inputs(model, layers)
    traces: dict[str, list] = {n: [] for n in layers}
    inputs: dict[str, list] = {n: [] for n in layers}
    try:
        for x, _ in batches:
            capture.clear()
            x = x.to(device).requires_grad_(True)
            batch, squares = {}, {}
            rows = (class_rows(model, x, capture.clear_grads) if estimator == "exact" else
                    _draw_rows(model, x, capture.clear_grads, draw=draw, gen=gen))
            for k in rows:
                if not batch:  # the forward pass has run: its calls are known
                    batch = {n: [torch.zeros(len(x), dtype=torch.float64)
                                 for _ in capture.inputs[n]] for n in layers}
                    squares = {n: [torch.zeros_like(t) for t in batch[n]] for n in layers}
                for n in layers:
                    for i, g in capture.grads[n].items():
                        norm = g.flatten(1).double().pow(2).sum(1).cpu()
                        batch[n][i] += norm
                        squares[n][i] += norm ** 2
                if estimator == "sampled" and k >= min_draws and (k >= max_draws or all(
                        _precise(s1, s2, k, rel_tol) for n in layers
                        for s1, s2 in zip(batch[n], squares[n]))):
                    batch = {n: [t / k for t in calls] for n, calls in batch.items()}
                    break
            for n in layers:
                for i, t in enumerate(batch[n]):
                    if i == len(traces[n]):
                        traces[n].append([])
                        inputs[n].append([])
                    traces[n][i].append(t)
                    inputs[n][i].append(capture.inputs[n][i].float().cpu())
    finally:
        capture.remove()
    return ({n: [torch.cat(t) for t in calls] for n, calls in traces.items()},
            {n: [torch.cat(x) for x in calls] for n, calls in inputs.items()})


def _precise(s1: torch.Tensor, s2: torch.Tensor, k: int, rel_tol: float) -> bool:
    mean, se = _trace_stats(s1, s2, k)
    return mean == 0 or (math.isfinite(se) and se <= rel_tol * abs(mean))


@torch.no_grad()
def activation_perturbations(traces: dict[str, list[torch.Tensor]],
                             inputs: dict[str, list[torch.Tensor]],
                             bit_choices) -> dict[str, dict[int, float]]:
    """Omega_i(b) of each layer's input for each activation width b (module docstring)."""
    out = {}
    for name, calls in traces.items():
        out[name] = dict.fromkeys(bit_choices, 0.0)
        for trace, x in zip(calls, inputs[name]):
            d = x[0].numel()
            for b in bit_choices:
                quant = ActQuantizer(b)
                quant.start_calibration()
                quant(x)
                quant.finish_calibration()
                err = (quant(x) - x).flatten(1).double().pow(2).sum(1)
                out[name][b] += (trace * err).mean().item() / d
    return out
