"""`layer_sensitivity`: each layer's Hessian block of the mean cross-entropy (BN in eval mode),
by the estimator that is right and affordable for that layer.

`auto` (the default) reports, per layer, the Gauss-Newton block G_ii: it *is* the Hessian block
where the logits are piecewise linear in the layer's weight (`linearity`, each such label then
checked on the first batch by `exactness`), and elsewhere it is the positive semi-definite part
that quantization-sensitivity methods use, recorded as `quantity: ggn` with the reason. It is
computed exactly (`exact`: C backward passes per batch) where the classes are few and the
layer's rows fit the memory bound, else from random draws shaped by the model's own
predictions (`sampled`: cost independent of C, with standard errors).
`hutchinson` and `hutchinson_ggn` estimate the Hessian itself by Hessian-vector products
(double backward), on request: the way to the full curvature of a smooth network, at a price.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..quant.prepare import quantizable_layers
from .exactness import confirm_exact
from .ggn import exact_ggn, exact_ggn_bytes, sampled_ggn
from .hutchinson import gauss_newton_rows, hutchinson
from .linearity import layer_linearity
from .record import LayerSensitivity

__all__ = ["DRAWS", "ESTIMATORS", "is_piecewise_linear", "layer_sensitivity"]

ESTIMATORS = ("auto", "exact", "sampled", "hutchinson", "hutchinson_ggn")
DRAWS = ("signs", "labels")


def is_piecewise_linear(model: nn.Module, *, batch: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> tuple[bool, str]:
    """Whether the model's output is piecewise linear in every quantizable layer's weight;
    (answer, the first reason it is not). The graph decides; with `batch` (inputs, labels),
    what it calls linear is also checked numerically there (`exactness.confirm_exact`)."""
    found = layer_linearity(model, quantizable_layers(model))
    if batch is not None:
        found = confirm_exact(model, found, *batch)
    curved = [(name, why) for name, why in found.items() if why]
    return (False, f"{curved[0][0]}: {curved[0][1]}") if curved else (True, "piecewise linear")


def layer_sensitivity(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
                      layers: list[str] | None = None, estimator: str = "auto",
                      rel_tol: float = 0.05, min_probes: int = 30, max_probes: int = 500,
                      min_draws: int = 8, max_draws: int = 256, max_exact_classes: int = 16,
                      memory_bytes: int = 2 << 30, deflate: int = 8, seed: int = 0,
                      top_eigenvalue: bool = True, draws: str = "signs",
                      progress: bool = False) -> dict[str, LayerSensitivity]:
    """Trace and top eigenvalue of each layer's curvature block (see the module docstring).

    Args:
        model: the FP32 model, on the device to compute on (put in eval mode; not changed).
        batches: (inputs, labels) pairs; the loss is their mean over all samples.
        layers: layer names (default: every quantizable layer).
        estimator: `auto`, `exact` (the exact Gauss-Newton block for every layer; refused
            where that is not the Hessian), `sampled` (random draws for every layer),
            `hutchinson` (plain, as PyHessian) or `hutchinson_ggn` (with the exact
            Gauss-Newton trace as a control variate).
        rel_tol: sampled estimators stop when standard error <= rel_tol * |trace| ...
        min_probes, max_probes: ... after at least / at most this many Hessian-vector products
            per layer (hutchinson*): the standard error comes from the probes themselves and
            runs low when they are few, so at least 30.
        min_draws, max_draws: the same for draws (`sampled`).
        draws: what `sampled` draws per image and backward pass: `signs` (random signs over
            every class, weighted by the prediction: the default, see `ggn._fisher_draw`) or
            `labels` (one label from the prediction).
        max_exact_classes: `auto` computes a layer exactly only up to this many classes.
        memory_bytes: bound on what the estimators hold at once (rows, per-sample gradients,
            slices of a batch).
        deflate: Hutchinson counts the top-`deflate` sketched subspace exactly (Hutch++).
        seed: seeds probes and draws.
        top_eigenvalue: also estimate top eigenvalues (NaN when off).
        progress: a progress bar over layers (hutchinson*).
    """
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown sensitivity estimator {estimator!r}; choose one of "
                         f"{', '.join(ESTIMATORS)}")
    if draws not in DRAWS:
        raise UsageError(f"unknown draws {draws!r}; choose one of {', '.join(DRAWS)}")
    was_training = model.training
    model.eval()
    layers = layers or quantizable_layers(model)
    curved = layer_linearity(model, layers)
    numel = {name: model.get_submodule(name).weight.numel() for name in layers}
    try:
        if estimator in ("hutchinson", "hutchinson_ggn"):
            return _by_hutchinson(model, batches, layers, estimator, rel_tol, min_probes,
                                  max_probes, deflate, seed, top_eigenvalue, progress)
        if estimator == "exact":
            _refuse_curved(curved)  # what the graph shows, before any computation
        curved = confirm_exact(model, curved, *batches[0])  # the graph's `exact`, on data
        if estimator == "exact":
            _refuse_curved(curved)
        n_total = sum(len(y) for _, y in batches)
        device = next(model.parameters()).device
        with torch.no_grad():
            classes = model(batches[0][0][:1].to(device)).shape[1]
        if estimator == "exact":
            need = {name: exact_ggn_bytes(numel[name], n_total, classes) for name in layers}
            big = max(need, key=need.get)
            if need[big] > memory_bytes:
                raise UsageError(
                    f"the exact estimator would hold {need[big] / 2 ** 30:.1f} GiB for layer "
                    f"{big} ({n_total} images x {classes} classes x {numel[big]} weights), above "
                    f"the memory bound of {memory_bytes / 2 ** 30:.1f} GiB (search.memory_mb); "
                    f"use search.estimator=auto or sampled, whose cost does not grow with the "
                    f"classes")
        exact = [name for name in layers if estimator == "exact" or (
            estimator == "auto" and classes <= max_exact_classes
            and exact_ggn_bytes(numel[name], n_total, classes) <= memory_bytes)]
        sampled = [name for name in layers if name not in exact]
        found = {}
        if exact:
            for name, (trace, top) in exact_ggn(model, exact, batches, memory_bytes=memory_bytes,
                                                top_eigenvalue=top_eigenvalue).items():
                found[name] = LayerSensitivity(trace, 0.0, top, 0.0,
                                               "exact_ggn" if curved[name] else "exact", 0,
                                               numel[name])
        if sampled:
            for name, r in sampled_ggn(model, sampled, batches, memory_bytes=memory_bytes,
                                       rel_tol=rel_tol, min_draws=min_draws,
                                       max_draws=max_draws, seed=seed, draw=draws,
                                       top_eigenvalue=top_eigenvalue).items():
                found[name] = LayerSensitivity(r["trace"], r["trace_se"], r["top_eigenvalue"],
                                               r["top_eigenvalue_se"], "sampled", r["draws"],
                                               numel[name])
        for name, s in found.items():
            if curved[name]:
                s.quantity, s.curved_by = "ggn", curved[name]
        return {name: found[name] for name in layers}
    finally:
        model.train(was_training)


def _refuse_curved(curved: dict[str, str | None]) -> None:
    """The exact estimator's refusal of a layer whose Hessian block is not its Gauss-Newton."""
    bad = [name for name, why in curved.items() if why]
    if bad:
        raise UsageError(
            f"the exact estimator computes the Gauss-Newton block, which is the Hessian "
            f"block only where the network is piecewise linear in the layer's weight; "
            f"at {bad[0]} it is not ({curved[bad[0]]}): use search.estimator=auto (the "
            f"Gauss-Newton block there, so recorded) or hutchinson_ggn (the Hessian)")


def _by_hutchinson(model, batches, layers, estimator, rel_tol, min_probes, max_probes,
                   deflate, seed, top_eigenvalue, progress) -> dict[str, LayerSensitivity]:
    from tqdm import tqdm

    n_total = sum(len(y) for _, y in batches)
    g = torch.Generator().manual_seed(seed)
    results = {}
    for name in tqdm(layers, desc="sensitivity", disable=not progress, unit="layer"):
        weight = model.get_submodule(name).weight
        rows, ggn_trace = None, 0.0
        if estimator == "hutchinson_ggn":
            rows = torch.cat([gauss_newton_rows(model, f"{name}.weight", weight.detach(), x)
                              .reshape(-1, weight.numel()) for x, _ in batches])
            ggn_trace = rows.pow(2).sum().item() / n_total
        results[name] = hutchinson(model, weight, batches, n_total, rel_tol, min_probes,
                                   max_probes, g, rows=rows, ggn_trace=ggn_trace,
                                   eigen=top_eigenvalue, deflate=deflate)
    return results
