"""The search stage: sensitivity, exact allocation, then an Optuna study scored on real data.

The Hessian model ignores interactions between layers, so the solver's plan is a starting
point. The study moves each layer's bit width by -1, 0 or +1 step from the solver's plan at the
budget; a proposal over the budget is repaired by moving its raised layers back to the solver's
bits, the most bytes first (`repair: undo`; `perturbation` lowers instead the bits the
perturbation table says cost least per byte), so every trial is a plan within the budget, and
the study depends on the sensitivities only through the solver's plan. Each plan
is scored by the KL divergence of its fake-quantized model from the FP32 model on held-out
training images (never the test set), after calibrating its activation scales. The solver's
plans at and below the budget are enqueued first, so the search can only match or beat them.
With `polish_evaluations` set, a local search (`mpq.refine.polish`) then walks from the
study's best plan, one bit step at a time, to a plan no single step improves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .allocate import perturbations, solve_within
from .budgets import Bops, Limits, act_key, parse_bops, split_bits
from .config import Recipe
from .errors import UsageError
from .files import write_atomic
from .hessian import DRAWS, ESTIMATORS, LayerSensitivity, layer_sensitivity
from .hessian.activation import activation_perturbations, activation_traces
from .latency import LATENCY_RUNTIMES, LatencyTable, latency_table
from .mpqformat import ACT_QUANT_BYTES
from .quant import Plan, calibrate_, prepare_qat, quantizable_layers, uniform_plan
from .refine import REPAIRS, widths_of, plan_key, polish, repair, undo_raises
from .report import log_search, log_sensitivity
from .search_budgets import budgets_met, check_budget, check_latency, check_limits
from .size import Footprint, weight_bytes
from .study import METRIC, add_scored, check_storage, open_study, run_trials

__all__ = ["SearchConfig", "SearchRecipe", "kl_score", "run_search", "search_plan",
           "sensitivity_cached"]


@dataclass
class SearchConfig:
    """Settings of sensitivity, allocation and search. `bit_choices` are weight widths: an
    8-bit weight holds the 129 levels of `mpq.quant.weight_range(8)` in 8 bits. Activations
    enter every layer at `a_bits`, or, with `a_bit_choices`, at widths the search chooses per
    layer (they cost BOPs, not bytes: without `--bops` each layer takes the widest).
    `latency_*`: where a `--latency-ms` budget is measured (`mpq.latency`): the runtime, the
    batch, the threads (0: every core) and the seconds of timing per model."""

    checkpoint: str = "checkpoints/resnet20_cifar10.pt"
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])
    a_bits: int = 8
    a_bit_choices: list[int] | None = None
    estimator: str = "auto"
    rel_tol: float = 0.05
    min_probes: int = 30
    max_probes: int = 500
    min_draws: int = 8
    max_draws: int = 256
    draws: str = "signs"
    max_exact_classes: int = 16
    memory_mb: int = 2048
    metric: str = "trace"
    sensitivity_batches: int = 2
    batch_size: int = 128
    holdout_images: int = 1024
    calibration_batches: int = 2
    trials: int = 30
    repair: str = "undo"
    polish_evaluations: int = 0
    timeout: float | None = None
    seed: int = 0
    latency_runtime: str = "onnxruntime"
    latency_batch: int = 1
    latency_threads: int = 0
    latency_seconds: float = 1.0

    def __post_init__(self):
        if not self.bit_choices or any(not 2 <= b <= 8 for b in self.bit_choices):
            raise UsageError(f"search.bit_choices must be bit widths in 2..8, got "
                             f"{self.bit_choices}")
        self.bit_choices = sorted(set(self.bit_choices))
        if self.a_bit_choices is not None:
            if not self.a_bit_choices or any(not 2 <= b <= 8 for b in self.a_bit_choices):
                raise UsageError(f"search.a_bit_choices must be bit widths in 2..8 (or null: "
                                 f"every layer at search.a_bits), got {self.a_bit_choices}")
            self.a_bit_choices = sorted(set(self.a_bit_choices))
        if self.metric not in ("trace", "eigenvalue"):
            raise UsageError(f"search.metric must be trace or eigenvalue, got {self.metric!r}")
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"search.estimator must be one of {', '.join(ESTIMATORS)}; got "
                             f"{self.estimator!r}")
        if self.draws not in DRAWS:
            raise UsageError(f"search.draws must be one of {', '.join(DRAWS)}; got "
                             f"{self.draws!r}")
        if not 0 < self.rel_tol < 1:
            raise UsageError(f"search.rel_tol must be in (0, 1), got {self.rel_tol}")
        if not 2 <= self.min_probes <= self.max_probes or not 2 <= self.min_draws <= \
                self.max_draws:
            raise UsageError("search.min_probes <= max_probes and min_draws <= max_draws, all "
                             ">= 2")
        if self.memory_mb < 1 or self.max_exact_classes < 1:
            raise UsageError("search.memory_mb and search.max_exact_classes must be >= 1")
        if self.repair not in REPAIRS:
            raise UsageError(f"search.repair must be one of {', '.join(REPAIRS)}; got "
                             f"{self.repair!r}")
        if self.polish_evaluations < 0:
            raise UsageError(f"search.polish_evaluations must be >= 0 (0: no local search), "
                             f"got {self.polish_evaluations}")
        if self.latency_runtime not in LATENCY_RUNTIMES:
            raise UsageError(f"search.latency_runtime must be one of "
                             f"{', '.join(LATENCY_RUNTIMES)}; got {self.latency_runtime!r}")
        if self.latency_batch < 1 or self.latency_threads < 0 or not self.latency_seconds > 0:
            raise UsageError("search.latency_batch must be >= 1, latency_threads >= 0 (0: every "
                             "core) and latency_seconds > 0")
        if self.trials < 0 or self.holdout_images < 1 or self.sensitivity_batches < 1:
            raise UsageError("search.trials must be >= 0, holdout_images and "
                             "sensitivity_batches >= 1")


@dataclass
class SearchRecipe(Recipe):
    """A recipe with a `search` section."""

    search: SearchConfig = field(default_factory=SearchConfig)


@torch.no_grad()
def kl_score(qmodel: nn.Module, teacher_logits: list[torch.Tensor],
             batches: list[torch.Tensor]) -> float:
    """Mean KL(p_teacher || p_quantized) over held-out batches: lower is better."""
    qmodel.eval()
    total, n = 0.0, 0
    for x, t in zip(batches, teacher_logits):
        s = qmodel(x)
        total += F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum",
                          log_target=True).item()
        n += len(x)
    return total / n


SENSITIVITY_SETTINGS = ("estimator", "rel_tol", "min_probes", "max_probes", "min_draws",
                        "max_draws", "draws", "max_exact_classes", "memory_mb", "seed")


def sensitivity_cached(model: nn.Module, batches, *, cache_dir: Path, key: dict,
                       cfg: SearchConfig, progress: bool) -> dict[str, LayerSensitivity]:
    """`layer_sensitivity` with the search's settings, cached on disk by checkpoint hash,
    data and settings."""
    # version 5: every `exact` label is checked numerically (mpq.hessian.exactness)
    key = {**key, "version": 5, **{k: getattr(cfg, k) for k in SENSITIVITY_SETTINGS}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"sensitivity-{digest}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return {k: LayerSensitivity(**v) for k, v in data["layers"].items()}
    result = layer_sensitivity(model, batches, estimator=cfg.estimator, rel_tol=cfg.rel_tol,
                               min_probes=cfg.min_probes, max_probes=cfg.max_probes,
                               min_draws=cfg.min_draws, max_draws=cfg.max_draws,
                               draws=cfg.draws, max_exact_classes=cfg.max_exact_classes,
                               memory_bytes=cfg.memory_mb << 20, seed=cfg.seed,
                               progress=progress)
    write_atomic(path, json.dumps({"key": key, "layers": {k: v.to_dict()
                                                          for k, v in result.items()}}))
    return result


def search_plan(model: nn.Module, *, model_name: str, sensitivity: dict, budget_bytes: int,
                holdout: list[torch.Tensor], calibration: list[torch.Tensor],
                cfg: SearchConfig, storage: str | None, example_inputs: tuple,
                meta: dict | None = None, progress: bool = True,
                on_trial=None, max_bops: int | None = None, bops: Bops | None = None,
                activation_batches=None, latency: LatencyTable | None = None,
                max_latency_ms: float | None = None) -> tuple[Plan, dict]:
    """Runs the solver and the Optuna study; returns the best plan and a summary.

    Args:
        model: the FP32 model (eval mode).
        model_name: recorded in the plan.
        sensitivity: per-layer `LayerSensitivity`.
        budget_bytes: hard limit on the stored size.
        holdout: held-out training inputs for scoring.
        calibration: inputs for calibrating activation scales.
        cfg: the recipe's search section.
        storage: an Optuna RDB URL (SQLite file by default in the run folder); a study there
            resumes, and several processes may share one (see `mpq.study`).
        example_inputs: for tracing.
        meta: the model's `model`, `input_size` and `normalization` (as in its checkpoint):
            with it, sizes are those of the `model.mpq` file, header included.
        progress: show progress bars.
        on_trial: called with each completed trial (an `optuna.trial.FrozenTrial`).
        max_bops: a BOPs budget beside the bytes (`mpq.budgets`): the solver, the trials'
            repairs and the local search meet both.
        bops: the model's `Bops` if already counted (else counted here).
        activation_batches: (inputs, labels) on which each layer's input curvature is
            measured, with `cfg.a_bit_choices` (`mpq.hessian.activation`).
        latency, max_latency_ms: a latency budget beside the others, against this table
            (`mpq.latency`), met as BOPs are.
    """
    import optuna
    from tqdm import tqdm

    names = quantizable_layers(model)
    choices, a_choices = cfg.bit_choices, cfg.a_bit_choices
    limits, widths = search_limits(model, model_name, cfg, budget_bytes=budget_bytes,
                                   example_inputs=example_inputs, meta=meta, bops=bops,
                                   max_bops=max_bops, latency=latency,
                                   max_latency_ms=max_latency_ms)
    footprint, a_bits, bops = limits.footprint, limits.a_bits, limits.bops
    omega = perturbations(model, sensitivity, choices, metric=cfg.metric)
    act_estimator = None
    if a_choices:
        with torch.no_grad():
            classes = model(example_inputs[0]).shape[1]
        act_estimator = activation_estimator(cfg, classes)
        traces, inputs = activation_traces(model, names, activation_batches,
                                           estimator=act_estimator, draw=cfg.draws,
                                           rel_tol=cfg.rel_tol, min_draws=cfg.min_draws,
                                           max_draws=cfg.max_draws, seed=cfg.seed)
        omega.update({act_key(n): v for n, v in
                      activation_perturbations(traces, inputs, a_choices).items()})
    solver = solve_within(omega, limits)

    def plan_of(bits: dict[str, int]) -> Plan:
        w, a = split_bits(bits, a_bits)
        return Plan(model=model_name, layers={n: {"w_bits": w[n], "a_bits": a[n]} for n in w})

    def steps(bits: dict[str, int]) -> dict[str, int]:
        """Each key's step from the solver's plan, in its own widths."""
        return {k: max(-1, min(1, widths_of(widths, k).index(bits[k]) -
                               widths_of(widths, k).index(solver.bits[k]))) for k in solver.bits}
    with torch.no_grad():
        teacher_logits = [model(x) for x in holdout]

    def score(bits: dict[str, int]) -> float:
        q = prepare_qat(model, plan_of(bits), example_inputs=example_inputs)
        calibrate_(q, calibration)
        return kl_score(q, teacher_logits, holdout)

    def objective(trial: "optuna.Trial") -> float:
        proposal = {}
        for k in solver.bits:  # each layer's weights, then (if chosen) its activation
            options = widths_of(widths, k)
            i = options.index(solver.bits[k])
            step = trial.suggest_categorical(k, [-1, 0, 1])
            proposal[k] = options[min(max(i + step, 0), len(options) - 1)]
        bits = (undo_raises(proposal, solver.bits, limits) if cfg.repair == "undo" else
                repair(proposal, omega, limits, widths))
        value = score(bits)
        trial.set_user_attr("bits", bits)
        trial.set_user_attr("size_bytes", limits.usage(bits)["bytes"])
        trial.set_user_attr("bops", bops.total(*split_bits(bits, a_bits)))
        if latency is not None:
            trial.set_user_attr("latency_ms", latency.total(*split_bits(bits, a_bits)))
        for n, b in bits.items():  # one attribute per layer: readable in optuna-dashboard
            trial.set_user_attr(f"bits.{n}", b)
        return value

    # Trials only mean something relative to the solver's plan they move from, so the study's
    # name pins the budget and that plan: another budget or teacher in the same storage starts
    # its own study instead of mixing trials. Its parameters are each layer's step (-1, 0, +1)
    # from that plan; the bits they give are the trial's `bits.<layer>` attributes.
    # (each repair proposes other plans, so each has its own study; a `perturbation` study,
    # the repair before `undo`, keeps the name it had)
    pinned = [budget_bytes, choices, solver.bits, cfg.seed] + (
        [cfg.repair] if cfg.repair != "perturbation" else []) + (
        [{"bops": max_bops}] if max_bops is not None else []) + (
        [{"a_bit_choices": a_choices}] if a_choices else []) + (
        [{"latency_ms": max_latency_ms, "table": latency.to_dict()}]
        if max_latency_ms is not None else [])
    basis = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()[:12]
    name = f"mpq-{model_name}-{budget_bytes}B-{basis}"
    # The solver's plan at the budget, then at budgets a little below it: the search starts
    # from the exact optimum of the Hessian model.
    seeds = [solver] + [_solve_or_none(omega, replace(limits, bytes=int(budget_bytes * f)))
                        for f in (0.97, 0.94) if budget_bytes * f >= footprint.smallest(choices)]
    seeds = [alloc for alloc in seeds if alloc is not None]
    study = open_study(name, storage, {
        "model": model_name, "budget_bytes": budget_bytes, "bit_choices": list(choices),
        "a_bits": cfg.a_bits, "solver_bits": solver.bits, "solver_size_bytes": solver.size_bytes,
        **({"bops_budget": max_bops} if max_bops is not None else {}),
        **({"a_bit_choices": a_choices} if a_choices else {}),
        "parameters": "per layer, the step from solver_bits in bit_choices (-1, 0, +1)"
                      + ("; per <layer>@a, in a_bit_choices" if a_choices else "")},
        seeds=[steps(alloc.bits) for alloc in seeds])
    print(f"study {name} in {storage}", flush=True)

    def finished(trial) -> None:
        if trial.number == 0 and "solver_score" not in study.user_attrs:
            study.set_user_attr("solver_score", trial.value)
        if on_trial is not None:
            on_trial(trial)

    run_trials(study, objective, trials=cfg.trials, seed=cfg.seed, timeout=cfg.timeout,
               on_trial=finished, progress=progress)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # The local search starts from the best sampled plan, never from one of its own: a run
    # resumed after (part of) it must walk the same path from the same start.
    sampled = [t for t in completed if t.user_attrs.get("stage") != "polish"]
    if not sampled:
        bits, value = solver.bits, score(solver.bits)
    else:
        best = min(sampled, key=lambda t: (t.value, t.number))
        bits, value = best.user_attrs["bits"], best.value
    if cfg.polish_evaluations:
        bits, value = _polish(study, bits, value, score, omega=omega, limits=limits,
                              choices=widths,
                              evaluations=cfg.polish_evaluations, progress=progress,
                              on_trial=on_trial)
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    solver_score = next((t.value for t in completed if t.number == 0), None)
    # Uniform plans, scored the same way: what mixed precision must beat (those over the
    # budget too: uniform 4-bit is just over an 8x budget once scales and biases count).
    uniform = {}
    for b in tqdm(choices, desc="scoring uniform plans", disable=not progress, leave=False):
        flat = {n: b for n in names}
        uniform[b] = {"size_bytes": footprint.bytes(flat), "bops": bops.total(flat, a_bits),
                      "within_budget": limits.fits(flat), "score": score(flat)}
    plan = plan_of(bits)
    size = limits.usage(bits)["bytes"]
    if a_choices:  # the exact bytes of its own quantizers, not the bound the search kept to
        size = weight_bytes(prepare_qat(model, plan, example_inputs=example_inputs), meta)
    plan.extra = {"size_bytes": size, "budget_bytes": budget_bytes,
                  "objective": float(sum(omega[k][b] for k, b in bits.items())),
                  "score": value, "score_metric": "kl_to_fp32_on_holdout",
                  "solver_score": solver_score, "solver_bits": solver.bits,
                  "bops": bops.total(*split_bits(bits, a_bits)), "fp32_bops": bops.fp32,
                  **({"bops_budget": max_bops} if max_bops is not None else {})}
    plan.extra["budgets"] = budgets_met(size, limits, bits)
    if max_latency_ms is not None:
        plan.extra.update(latency_ms=limits.usage(bits)["latency_ms"],
                          latency_budget_ms=max_latency_ms,
                          latency_on=latency.describe())
    assert limits.fits(bits) and size <= budget_bytes
    summary = {"study": {"name": name, "storage": storage, "metric": METRIC},
               "trials": [{"number": t.number, "score": t.value,
                           "stage": t.user_attrs.get("stage", "sampled"),
                           "size_bytes": t.user_attrs.get("size_bytes"),
                           "bops": t.user_attrs.get("bops"),
                           **({"latency_ms": t.user_attrs.get("latency_ms")}
                              if latency is not None else {}),
                           "bits": t.user_attrs.get("bits")} for t in completed],
               "solver": {"bits": solver.bits, "size_bytes": solver.size_bytes,
                          "objective": solver.objective},
               "uniform": uniform, "omega": {n: omega[n] for n in names},
               **({"activation_omega": {n: omega[act_key(n)] for n in names},
                   "activation_estimator": act_estimator} if a_choices else {}),
               **({"latency_table": latency.to_dict()} if latency is not None else {}),
               "layers": {n: {"weights": footprint.shapes[n].numel,
                              "bytes": footprint.layer(n, bits[n])} for n in names}}
    return plan, summary


def activation_estimator(cfg: SearchConfig, classes: int) -> str:
    """How the input curvature is measured (`mpq.hessian.activation`): exactly, one backward
    pass per class, up to `max_exact_classes` classes (or always with `estimator: exact`);
    else, or with `estimator: sampled`, by random draws to `rel_tol`."""
    if cfg.estimator == "sampled" or (cfg.estimator != "exact" and
                                      classes > cfg.max_exact_classes):
        return "sampled"
    return "exact"


def search_limits(model: nn.Module, model_name: str, cfg: SearchConfig, *, budget_bytes: int,
                  example_inputs: tuple, meta: dict | None = None, bops: Bops | None = None,
                  max_bops: int | None = None, latency: LatencyTable | None = None,
                  max_latency_ms: float | None = None) -> tuple[Limits, object]:
    """The budgets a search of `cfg` meets (`mpq.budgets.Limits`) and the widths each key of
    its plans takes (weights per layer, and `<layer>@a` with `a_bit_choices`)."""
    names = quantizable_layers(model)
    q8 = prepare_qat(model, uniform_plan(model_name, names, w_bits=8, a_bits=cfg.a_bits),
                     example_inputs=example_inputs)
    footprint = Footprint.of(q8, meta)
    widths = cfg.bit_choices
    if cfg.a_bit_choices:  # a layer whose input takes other bits than its tensor's other
        # consumers gets its own quantizer: the bound counts one per layer, the plan its bytes
        footprint = Footprint(footprint.shapes, footprint.fixed + ACT_QUANT_BYTES * len(names))
        widths = {**{n: cfg.bit_choices for n in names},
                  **{act_key(n): cfg.a_bit_choices for n in names}}
    bops = bops or Bops.of(model, names, example_inputs)
    return Limits(footprint, budget_bytes, {n: cfg.a_bits for n in names}, bops, max_bops,
                  latency, max_latency_ms), widths


def _solve_or_none(omega, limits: Limits):
    """The solver's plan within `limits`; None if no plan meets them."""
    try:
        return solve_within(omega, limits)
    except UsageError:
        return None


def _polish(study, bits, value, score, *, omega, limits, choices, evaluations,
            progress, on_trial):
    """`mpq.refine.polish` from the study's best plan. Each plan it scores is added to the
    study as a trial (`stage: polish`, bits as attributes, no sampled parameters, so the
    sampler ignores it); a resumed run answers from those trials and walks the same path."""
    import optuna
    from tqdm import tqdm

    def known() -> dict:
        return {plan_key(t.user_attrs["bits"]): t.value
                for t in study.get_trials(deepcopy=False,
                                          states=(optuna.trial.TrialState.COMPLETE,))
                if "bits" in t.user_attrs}

    cache = known()
    bar = tqdm(total=evaluations, desc="local search", unit="plan", disable=not progress,
               leave=False)

    def cached_score(plan: dict) -> float:
        bar.update()
        key = plan_key(plan)
        if key not in cache:
            cache.update(known())  # another worker sharing the storage may have scored it
        if key in cache:
            return cache[key]
        cache[key] = score(plan)
        attrs = {"stage": "polish", "bits": plan, "size_bytes": limits.usage(plan)["bytes"],
                 **({"bops": limits.bops.total(*split_bits(plan, limits.a_bits))}
                    if limits.bops else {}),
                 **({"latency_ms": limits.usage(plan)["latency_ms"]}
                    if limits.max_latency_ms is not None else {}),
                 **{f"bits.{n}": b for n, b in plan.items()}}
        trial = add_scored(study, cache[key], attrs)
        if on_trial is not None:
            on_trial(trial)
        return cache[key]

    try:
        bits, value, _ = polish(bits, value, cached_score, omega=omega, limits=limits,
                                choices=choices, max_evaluations=evaluations)
    finally:
        bar.close()
    return bits, value


def _log_trial(writer, trial) -> None:
    """Each trial in TensorBoard as it finishes, not only when the search ends."""
    writer.add_scalar("search/trial_score", trial.value, trial.number)
    writer.add_scalar("search/trial_size_bytes", trial.user_attrs["size_bytes"], trial.number)
    writer.flush()


def run_search(recipe: SearchRecipe, *, budget: str | None, out_dir: str | os.PathLike,
               data_root=None, checkpoint: str | None = None, storage: str | None = None,
               device: str = "auto", progress: bool = True, bops: str | None = None,
               latency_ms: float | None = None) -> Plan:
    """The whole search stage for a recipe: writes `plan.json`, `sensitivity.json`,
    `search.json`, `study.db` (unless `storage` is given) and TensorBoard logs in `tb/`.
    `bops` adds a BOPs budget (`mpq.budgets.parse_bops`: `16x` of FP32's, or a figure);
    `budget` None leaves bytes unbounded but for the FP32 size; `latency_ms` is a latency
    budget in milliseconds per batch of `search.latency_batch` images in
    `search.latency_runtime` on this CPU (`mpq.latency`: the table is measured once, cached)."""
    from torch.utils.tensorboard import SummaryWriter

    from .allocate import parse_budget
    from .checkpoint import TORCHVISION_WEIGHTS, load_teacher, model_meta
    from .data import cache_dir, load_split, make_loader
    from .size import fp32_parameter_bytes
    from .device import resolve_device

    cfg = recipe.search
    checkpoint = checkpoint or cfg.checkpoint
    device = resolve_device(device)
    model = load_teacher(checkpoint, model_name=recipe.model.name,
                         num_classes=recipe.model.num_classes,
                         normalization={"mean": list(recipe.data.mean),
                                        "std": list(recipe.data.std)}).eval()
    fp32_bytes = fp32_parameter_bytes(model)
    # no bytes budget: the FP32 size, which every plan meets (8-bit weights are a quarter)
    budget_bytes = fp32_bytes if budget is None else parse_budget(budget, fp32_bytes=fp32_bytes)
    size = recipe.data.image_size
    counter = Bops.of(model, quantizable_layers(model), (torch.zeros(1, 3, size, size),))
    max_bops = None if bops is None else parse_bops(bops, fp32_bops=counter.fp32)
    if latency_ms is not None and not (math.isfinite(latency_ms) and latency_ms > 0):
        raise UsageError(f"--latency-ms must be a positive number of milliseconds, got "
                         f"{latency_ms}")
    check_budget(model, recipe, budget_bytes, fp32_bytes, max_bops=max_bops, bops=counter)
    train = load_split(recipe.data, "train", root=data_root, progress=progress,
                       num_classes=recipe.model.num_classes)
    out = Path(out_dir)
    if storage:  # a user's URL is checked before any work; the default is made below
        check_storage(storage)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    # Held-out images: the tail of a fixed permutation of the training split; sensitivity and
    # calibration batches come from its head. The test split is never looked at.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    holdout_split = train.subset(order[-cfg.holdout_images:])
    head = train.subset(order[:cfg.batch_size * max(cfg.sensitivity_batches,
                                                    cfg.calibration_batches)])

    def batches(split, n=None):
        loader = make_loader(split, recipe.data, batch_size=cfg.batch_size, train=False)
        return [xy for _, xy in zip(range(n or len(loader)), loader.epoch(0))]

    sens_batches = batches(head, cfg.sensitivity_batches)
    calibration = [x for x, _ in batches(head, cfg.calibration_batches)]
    holdout = [x for x, _ in batches(holdout_split)]
    digest = hashlib.sha256(str(checkpoint).encode() if str(checkpoint).startswith(
        TORCHVISION_WEIGHTS) else Path(checkpoint).read_bytes()).hexdigest()
    example = (holdout[0][:1],)

    def check(table=None, max_ms=None):
        check_limits(search_limits(model, recipe.model.name, cfg, budget_bytes=budget_bytes,
                                   example_inputs=example, meta=model_meta(recipe),
                                   bops=counter, max_bops=max_bops, latency=table,
                                   max_latency_ms=max_ms), fp32_bytes=fp32_bytes)
    check()  # bytes and BOPs together, before the latency table is measured
    table = None
    if latency_ms is not None:
        narrow = min(cfg.a_bit_choices or [cfg.a_bits])
        table = latency_table(model, recipe.model.name, quantizable_layers(model),
                              runtime=cfg.latency_runtime, batch=cfg.latency_batch,
                              threads=cfg.latency_threads,
                              narrow_bits=narrow if narrow < 8 else None,
                              example_inputs=example, calibration=calibration,
                              cache_dir=cache_dir() / "latency", key={"checkpoint": digest},
                              seconds=cfg.latency_seconds, progress=progress)
        check(table, latency_ms)
    out.mkdir(parents=True, exist_ok=True)
    data_key = hashlib.sha256(torch.cat([x for x, _ in sens_batches]).numpy().tobytes())
    key = {"checkpoint": digest, "data": data_key.hexdigest(),
           "batches": cfg.sensitivity_batches, "batch_size": cfg.batch_size}
    sensitivity = sensitivity_cached(model.to(device), sens_batches,
                                     cache_dir=cache_dir() / "sensitivity", key=key, cfg=cfg,
                                     progress=progress)
    model = model.cpu()
    write_atomic(out / "sensitivity.json", json.dumps(
        {"checkpoint": str(checkpoint), "checkpoint_sha256": digest,
         "images": sum(len(y) for _, y in sens_batches),
         "layers": {k: v.to_dict() for k, v in sensitivity.items()}}, indent=2) + "\n")

    writer = SummaryWriter(str(out / "tb"))
    log_sensitivity(writer, sensitivity)
    names = list(sensitivity)

    if budget_bytes >= fp32_bytes and max_bops is None and latency_ms is None:
        plan = uniform_plan(recipe.model.name, names, w_bits=8, a_bits=cfg.a_bits)
        print(f"note: the budget {budget_bytes} bytes is at or above the FP32 size "
              f"{fp32_bytes}: every layer gets 8 bits")
        q = prepare_qat(model, plan, example_inputs=example)
        size = weight_bytes(q, model_meta(recipe))
        plan.extra = {"size_bytes": size, "budget_bytes": budget_bytes,
                      "budgets": {"bytes": {"budget": budget_bytes, "value": size,
                                            "met": size <= budget_bytes}}}
        summary = {}
    else:
        plan, summary = search_plan(model, model_name=recipe.model.name,
                                    sensitivity=sensitivity, budget_bytes=budget_bytes,
                                    holdout=holdout, calibration=calibration, cfg=cfg,
                                    storage=storage, example_inputs=example,
                                    meta=model_meta(recipe), progress=progress,
                                    on_trial=lambda t: _log_trial(writer, t),
                                    max_bops=max_bops, bops=counter,
                                    activation_batches=sens_batches, latency=table,
                                    max_latency_ms=latency_ms)
        if table is not None:
            check_latency(model, plan, table, example=example, calibration=calibration,
                          seconds=cfg.latency_seconds, progress=progress)
    layers = summary.get("layers", {})
    log_search(writer, plan.layers, summary.get("trials", []), omega=summary.get("omega"),
               numel={n: v["weights"] for n, v in layers.items()} if layers else None,
               nbytes={n: v["bytes"] for n, v in layers.items()} if layers else None,
               budget_bytes=budget_bytes,
               chosen={"size_bytes": plan.extra["size_bytes"], "score": plan.extra["score"]}
               if "score" in (plan.extra or {}) else None)
    writer.close()
    plan.extra = {**(plan.extra or {}), "fp32_bytes": fp32_bytes,
                  "compression": fp32_bytes / plan.extra["size_bytes"]}
    plan.save(out / "plan.json")
    write_atomic(out / "search.json", json.dumps(summary, indent=2) + "\n")
    return plan

