"""The bit plan: plain data saying how each quantizable layer is quantized.

    {"format": "mpq.plan", "version": 1, "model": "resnet20",
     "layers": {"conv1": {"w_bits": 8, "a_bits": 8}, "layer1.0.conv1": {"w_bits": 4, ...}, ...},
     ...more fields (size_bytes, budget_bytes, score) written by the search}

`layers` maps a module name, or a `re:` pattern (first match wins), to `{"w_bits", "a_bits"}`:
`w_bits` is the layer's weight bit width, `a_bits` that of the activation entering it; `null`
leaves that part in float. Other fields of a layer entry are kept as they are. A plan resolves
against a model's quantizable layers: a name or pattern that matches nothing, or a layer that
nothing matches, is an error that lists them. No layer is treated specially.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..files import write_atomic

__all__ = ["LayerQuant", "Plan", "load_plan", "uniform_plan"]

PLAN_FORMAT = "mpq.plan"
PLAN_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class LayerQuant:
    """One layer's settings: weight and input-activation bits (None keeps it in float)."""

    w_bits: int | None = 8
    a_bits: int | None = 8

    def __post_init__(self):
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not MIN_BITS <= value <= MAX_BITS):
                raise UsageError(f"{name}={value!r} is outside {MIN_BITS}..{MAX_BITS}; use an "
                                 f"integer bit width in that range, or null for float")


@dataclass
class Plan:
    """A bit plan: the model it is for and an ordered mapping of layer keys to settings."""

    model: str
    layers: dict[str, dict]
    extra: dict | None = None

    def __post_init__(self):
        for key, entry in self.layers.items():
            if not isinstance(entry, dict):
                raise UsageError(f"plan entry {key!r} must be a mapping like "
                                 f'{{"w_bits": 4, "a_bits": 8}}, got {entry!r}')
            try:
                LayerQuant(entry.get("w_bits", 8), entry.get("a_bits", 8))
            except UsageError as exc:
                raise UsageError(f"plan entry {key!r}: {exc}") from None
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise UsageError(f"plan entry {key!r} is not a valid regex: {exc}") from None

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": self.model,
                "layers": {k: dict(v) for k, v in self.layers.items()}, **(self.extra or {})}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise UsageError(f"not an mpq plan (expected format={PLAN_FORMAT!r}); write one with "
                             f"search.py or train.py --bits")
        if data.get("version") != PLAN_VERSION:
            raise UsageError(f"plan version {data.get('version')} is not supported "
                             f"(this mpq reads {PLAN_VERSION})")
        if not isinstance(data.get("layers"), dict) or not isinstance(data.get("model"), str):
            raise UsageError("a plan needs 'model' (a string) and 'layers' (a mapping)")
        extra = {k: v for k, v in data.items()
                 if k not in ("format", "version", "model", "layers")}
        return cls(model=data["model"], layers=dict(data["layers"]), extra=extra or None)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def resolve(self, layer_names: list[str]) -> dict[str, LayerQuant]:
        """Settings for each of `layer_names`, checking that the plan fits them exactly."""
        used: set[str] = set()
        resolved: dict[str, LayerQuant] = {}
        unmatched = []
        for name in layer_names:
            for key, entry in self.layers.items():
                hit = re.fullmatch(key[3:], name) if key.startswith("re:") else key == name
                if hit:
                    used.add(key)
                    resolved[name] = LayerQuant(entry.get("w_bits", 8), entry.get("a_bits", 8))
                    break
            else:
                unmatched.append(name)
        unknown = [k for k in self.layers if k not in used]
        problems = []
        if unknown:
            problems.append(f"names no layer of the model: {', '.join(unknown)}")
        if unmatched:
            problems.append(f"does not cover: {', '.join(unmatched)}")
        if problems:
            raise UsageError(f"the plan for {self.model!r} does not fit this model: "
                             f"{'; '.join(problems)} (its quantizable layers: "
                             f"{', '.join(layer_names)})")
        return resolved


def uniform_plan(model_name: str, layer_names: list[str], *, w_bits: int | None,
                 a_bits: int | None = 8) -> Plan:
    """Every layer at the same bits: the `--bits N` plan."""
    LayerQuant(w_bits, a_bits)
    return Plan(model=model_name,
                layers={name: {"w_bits": w_bits, "a_bits": a_bits} for name in layer_names})


def load_plan(path: str | os.PathLike) -> Plan:
    """Reads a plan JSON file; a missing or malformed file is a `UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"plan {path} does not exist; write one with search.py or use --bits")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"plan {path} is not valid JSON: {exc}") from None
    return Plan.from_dict(data)
