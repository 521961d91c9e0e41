"""A search's budgets: the refusal, before any work, of budgets no plan can meet (naming what
to ask for instead), and the chosen plan's figure against each budget (`mpq.budgets.Limits`),
its latency measured on this CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .allocate import tightest_budget
from .budgets import Bops, Limits
from .config import Recipe
from .errors import UsageError
from .latency import LatencyTable, measure_plans
from .quant import Plan, prepare_qat, quantizable_layers, uniform_plan
from .size import Footprint

__all__ = ["PlanFloor", "budgets_met", "check_budget", "check_latency", "check_limits",
           "plan_floor"]


def budgets_met(size_bytes: int, limits: Limits, bits: dict[str, int]) -> dict:
    """Each budget of a search's plan: its limit, the plan's figure and whether it meets it
    (bytes: the exact file, `size_bytes`; latency: as the table predicts)."""
    used = {**limits.usage(bits), "bytes": size_bytes}
    return {k: {"budget": limit, "value": used[k], "met": used[k] <= limit}
            for k, limit in limits.budgets().items()}


@dataclass(frozen=True)
class PlanFloor:
    """The smallest `model.mpq` any plan of a search recipe can make: every layer at the fewest
    bits of `bit_choices`. `weight_bytes` of its `bytes` are the packed weights themselves; the
    rest is per-channel scales, biases, activation scales and the header."""

    bytes: int
    weight_bytes: int
    bits: int


def plan_floor(model: nn.Module, recipe: Recipe) -> PlanFloor:
    """The `PlanFloor` of `recipe`'s search on `model` (an FP32 model in eval mode)."""
    from .pack import packed_size
    from .checkpoint import model_meta

    cfg, size = recipe.search, recipe.data.image_size
    bits = min(cfg.bit_choices)
    q = prepare_qat(model, uniform_plan(recipe.model.name, quantizable_layers(model),
                                        w_bits=bits, a_bits=cfg.a_bits),
                    example_inputs=(torch.zeros(1, 3, size, size),))
    footprint = Footprint.of(q, model_meta(recipe))
    return PlanFloor(bytes=footprint.smallest([bits]), bits=bits,
                     weight_bytes=sum(packed_size(s.numel, bits)
                                      for s in footprint.shapes.values()))


def check_budget(model: nn.Module, recipe: Recipe, budget_bytes: int, fp32_bytes: int, *,
                 max_bops: int | None = None, bops: Bops | None = None) -> None:
    """Refuses, before any work, a budget below the smallest plan the recipe allows, saying
    the most compression it can reach; with `max_bops` (and the model's `bops`) the same for
    BOPs, naming the tighter of the two when neither can be met."""
    floor = plan_floor(model, recipe)
    short = {}
    if budget_bytes < floor.bytes:
        short["bytes"] = floor.bytes / budget_bytes
    a_floor = min(recipe.search.a_bit_choices or [recipe.search.a_bits])
    if max_bops is not None:
        layers = list(bops.macs)
        least = bops.total(dict.fromkeys(layers, floor.bits), dict.fromkeys(layers, a_floor))
        if max_bops < least:
            short["bops"] = least / max_bops
    if not short:
        return
    also = " (the other budget cannot be met either)" if len(short) == 2 else ""
    if max(short, key=short.get) == "bytes":
        raise UsageError(
            f"budget {budget_bytes} bytes ({fp32_bytes / budget_bytes:.2f}x) is below the smallest "
            f"possible model.mpq, {floor.bytes} bytes ({fp32_bytes / floor.bytes:.2f}x): every "
            f"layer at {floor.bits} bits, {floor.weight_bytes} bytes of weights plus "
            f"{floor.bytes - floor.weight_bytes} of per-channel scales, biases and the header; "
            f"ask for {fp32_bytes / floor.bytes:.2f}x or less (--budget {floor.bytes}B){also}")
    raise UsageError(
        f"BOPs budget {max_bops:.4g} ({bops.fp32 / max_bops:.2f}x of FP32's {bops.fp32:.4g}) is "
        f"below the fewest any plan reaches, {least:.4g} ({bops.fp32 / least:.2f}x): every layer "
        f"at {floor.bits}-bit weights and {a_floor}-bit activations; ask for "
        f"--bops {bops.fp32 / least:.2f}x or less{also}")


def check_limits(found: tuple[Limits, object], *, fp32_bytes: int) -> None:
    """Refuses, before any work, budgets that no plan meets together, naming the one that binds
    hardest and what to ask for (`mpq.allocate.tightest_budget`)."""
    limits, widths = found
    if isinstance(widths, list):
        widths = dict.fromkeys(limits.footprint.shapes, widths)
    worst = tightest_budget(widths, limits)
    if worst is None:
        return
    k, least = worst
    others = " within the other budgets" if len(limits.budgets()) > 1 else ""
    if k == "bytes":
        raise UsageError(f"budget {limits.bytes} bytes ({fp32_bytes / limits.bytes:.2f}x) is below "
                         f"the smallest model.mpq any plan makes{others}, {least:.0f} bytes "
                         f"({fp32_bytes / least:.2f}x); ask for --budget "
                         f"{math.floor(fp32_bytes / least * 100) / 100:.2f}x or less, or relax the "
                         f"others")
    if k == "bops":
        fp32 = limits.bops.fp32
        raise UsageError(f"BOPs budget {limits.max_bops:.4g} ({fp32 / limits.max_bops:.2f}x of "
                         f"FP32's) is below the fewest any plan reaches{others}, {least:.4g} "
                         f"({fp32 / least:.2f}x); ask for --bops "
                         f"{math.floor(fp32 / least * 100) / 100:.2f}x or less, or relax the others")
    table = limits.latency
    raise UsageError(f"latency budget {limits.max_latency_ms:g} ms is below the least any plan "
                     f"reaches{others}, {least:.3f} ms ({table.describe()}: every layer's input "
                     f"at 8 bits takes {table.base_ms:.3f} ms); ask for --latency-ms "
                     f"{math.ceil(least * 1000) / 1000:.3f} or more, or relax the others")


def check_latency(model: nn.Module, plan: Plan, table: LatencyTable, *, example: tuple,
                  calibration, seconds: float, progress: bool) -> None:
    """Times the chosen plan's whole int8 model beside the table's base plan and records both
    in `plan.extra` (`latency_measured_ms`, and the prediction's relative error), so the plan
    says how well the table it was chosen by predicted it."""
    base = uniform_plan(plan.model, list(plan.layers), w_bits=8, a_bits=8)
    ms = measure_plans(model, {"base": base, "plan": plan}, runtime=table.runtime,
                       batch=table.batch, threads=table.threads, example_inputs=example,
                       calibration=calibration, seconds=seconds, progress=progress)
    # drift since the table was measured (machine load) scales both alike
    predicted = plan.extra["latency_ms"] * ms["base"] / table.base_ms
    budget = plan.extra["budgets"]["latency_ms"]
    budget.update(measured=ms["plan"], measured_met=ms["plan"] <= budget["budget"])
    plan.extra.update(latency_measured_ms=ms["plan"], latency_base_measured_ms=ms["base"],
                      latency_relative_error=(predicted - ms["plan"]) / ms["plan"])
    if ms["plan"] > budget["budget"]:
        print(f"warning: the plan's int8 model took {ms['plan']:.3f} ms in {table.runtime}, over "
              f"the {budget['budget']:g} ms budget the table predicted it meets "
              f"({plan.extra['latency_ms']:.3f} ms; the base plan took {ms['base']:.3f} ms now, "
              f"{table.base_ms:.3f} ms when the table was measured)", flush=True)
