"""An exponential moving average of a model's weights over training steps (`train.ema_epochs`).

The average is over every floating-point entry of the state dict (parameters, BN statistics,
quantizer scales); integer and boolean entries (step counts, flags) are the live model's. A
run that averages evaluates, saves and exports the averaged model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """Moving average with time constant `steps` optimiser steps: after each step
    `avg = d * avg + (1 - d) * live`, with d = min(1 - 1/steps, (1 + n) / (10 + n)) at the n-th
    update, so the first steps, whose weights are still the start's, do not dominate."""

    def __init__(self, model: nn.Module, steps: float):
        if steps < 1:
            raise ValueError(f"a moving average needs a time constant of >= 1 step, got {steps}")
        self.decay = 1.0 - 1.0 / steps
        self.updates = 0
        self.average = {k: v.detach().clone() for k, v in self._floats(model).items()}

    @staticmethod
    def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, live in self._floats(model).items():
            self.average[key].lerp_(live.detach(), 1 - d)
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module):
        """The averaged weights in `model` inside the block, the live ones back after it."""
        live = {k: v.detach().clone() for k, v in self._floats(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(live, strict=False)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.average, strict=False)

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.average) - set(state["average"])
        if missing:
            raise ValueError(f"the saved average lacks {sorted(missing)[:3]}")
        self.average = {k: state["average"][k].clone() for k in self.average}
        self.updates = int(state["updates"])
