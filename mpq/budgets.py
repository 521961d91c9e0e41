"""What a plan costs besides its bytes, and the set of budgets a plan must meet.

Bit operations (BOPs), the compute measure of HAWQ-V3 and NNCF: a quantizable layer's are its
multiply-accumulates per image times its weight bits times the bits of the activation entering
it (32 for a part left in float); the FP32 model's are every quantizable layer's MACs at 32 x 32.
MACs come from one forward pass of one example image through the FP32 model, each call of a
shared layer counted.

`Limits` holds the budgets one search must meet (bytes always, BOPs and latency when asked:
latency against `mpq.latency.LatencyTable`), answers
whether a plan meets them all, and weighs a change of one layer's bits in each budget's units
(its share of that budget), which the repairs of `mpq.refine` rank by.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import UsageError
from .size import Footprint

if TYPE_CHECKING:
    from .latency import LatencyTable

__all__ = ["Bops", "Limits", "parse_bops"]

FLOAT_BITS = 32


@dataclass(frozen=True)
class Bops:
    """Multiply-accumulates per image of each quantizable layer, and the BOPs they make."""

    macs: Mapping[str, int]

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, layers: list[str], example_inputs: tuple) -> Bops:
        """MACs of `layers` in `model` (FP32, eval mode) for one image of `example_inputs`."""
        macs = dict.fromkeys(layers, 0)
        modules = {name: model.get_submodule(name) for name in layers}

        def hook(name):
            def count(module, args, out):
                per_output = module.weight[0].numel()  # cin/groups * kernel, or in_features
                macs[name] += out[0].numel() * per_output
            return count

        handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
        try:
            model(*(x[:1] for x in example_inputs))
        finally:
            for h in handles:
                h.remove()
        return cls(macs)

    def layer(self, name: str, w_bits: int | None, a_bits: int | None) -> int:
        return self.macs[name] * (w_bits or FLOAT_BITS) * (a_bits or FLOAT_BITS)

    def total(self, w_bits: Mapping[str, int | None], a_bits: Mapping[str, int | None]) -> int:
        return sum(self.layer(n, w_bits[n], a_bits[n]) for n in self.macs)

    @property
    def fp32(self) -> int:
        return sum(self.macs.values()) * FLOAT_BITS * FLOAT_BITS


_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bops(text: str, *, fp32_bops: int) -> int:
    """BOPs from a ratio of the FP32 model's (`16x`: a sixteenth of them) or an absolute figure
    (`2.5e9`, `400M`, `2.5G`); anything not positive and finite, or a ratio under 1x, is a
    `UsageError`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]?)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in (*_SUFFIX, "x"):
        raise UsageError(f"--bops {text!r} is not understood; give a ratio of the FP32 model's "
                         f"BOPs ({fp32_bops:.4g}) such as 16x, or a figure such as 400M or 2.5e9")
    value = float(m.group(1))
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--bops {text!r} must be a positive, finite figure or ratio (16x)")
    if unit == "x" and value < 1:
        raise UsageError(f"--bops {text!r} asks for more than the FP32 model's BOPs; a ratio is "
                         f"FP32 BOPs / budget: ask for 1x or more (16x)")
    return math.floor(fp32_bops / value if unit == "x" else value * _SUFFIX[unit])


ACT = "@a"


def act_key(layer: str) -> str:
    """The key of a layer's input-activation bits in a search's plan of bits (beside the layer's
    own key, which holds its weight bits)."""
    return layer + ACT


def split_bits(bits: Mapping[str, int], a_bits: Mapping[str, int | None]
               ) -> tuple[dict[str, int], dict[str, int | None]]:
    """(weight bits, activation bits) per layer of a search's plan of bits: a layer without an
    activation key keeps `a_bits`' width."""
    w = {n: b for n, b in bits.items() if not n.endswith(ACT)}
    return w, {n: bits.get(act_key(n), a_bits.get(n)) for n in w}


@dataclass(frozen=True)
class Limits:
    """The budgets a plan must meet: `bytes` on disk (as `footprint` weighs them), BOPs if
    `max_bops` is set, and milliseconds as `latency` predicts them if `max_latency_ms` is. A
    plan maps each layer to its weight bits and, where the search chooses them,
    `act_key(layer)` to its input activation's bits (else `a_bits`)."""

    footprint: Footprint
    bytes: int
    a_bits: Mapping[str, int | None] = field(default_factory=dict)
    bops: Bops | None = None
    max_bops: int | None = None
    latency: LatencyTable | None = None
    max_latency_ms: float | None = None

    def usage(self, bits: Mapping[str, int]) -> dict[str, float]:
        """Each budgeted figure of a plan."""
        w, a = split_bits(bits, self.a_bits)
        out = {"bytes": self.footprint.bytes(w)}
        if self.max_bops is not None:
            out["bops"] = self.bops.total(w, a)
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.latency.total(w, a)
        return out

    def budgets(self) -> dict[str, float]:
        out = {"bytes": self.bytes}
        if self.max_bops is not None:
            out["bops"] = self.max_bops
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.max_latency_ms
        return out

    def layer_costs(self, name: str, w_bits: int, a_bits: int | None) -> dict[str, float]:
        """One layer's share of each budgeted figure at these bits (latency: what it adds to
        the table's base)."""
        a = a_bits if a_bits is not None else self.a_bits.get(name)
        out = {"bytes": self.footprint.layer(name, w_bits)}
        if self.max_bops is not None:
            out["bops"] = self.bops.layer(name, w_bits, a)
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.latency.layer(name, w_bits, a)
        return out

    def fixed(self) -> dict[str, float]:
        """What each budgeted figure holds whatever the bits (the rows' constant parts)."""
        out = {"bytes": self.footprint.fixed}
        if self.max_bops is not None:
            out["bops"] = 0
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.latency.base_ms
        return out

    def fits(self, bits: Mapping[str, int]) -> bool:
        used = self.usage(bits)
        return all(used[k] <= limit for k, limit in self.budgets().items())

    def exceeded(self, bits: Mapping[str, int]) -> set[str]:
        used = self.usage(bits)
        return {k for k, limit in self.budgets().items() if used[k] > limit}

    def delta(self, bits: Mapping[str, int], key: str, new: int, *, only=None) -> float:
        """What setting `key` of `bits` to `new` changes, summed over the budgets (or those in
        `only`), each in bytes-budget units (its change times bytes / its limit): positive when
        the plan grows. With bytes alone it is the change in bytes itself, so the repairs move
        as they did before BOPs existed."""
        layer = key[:-len(ACT)] if key.endswith(ACT) else key
        w, a = bits[layer], bits.get(act_key(layer), self.a_bits.get(layer))
        w2, a2 = (w, new) if key.endswith(ACT) else (new, a)
        before, after = self.layer_costs(layer, w, a), self.layer_costs(layer, w2, a2)
        change = {k: after[k] - before[k] for k in before}
        total = 0
        for k, limit in self.budgets().items():
            if only is None or k in only:
                total += change[k] if k == "bytes" else change[k] * self.bytes / limit
        return total
