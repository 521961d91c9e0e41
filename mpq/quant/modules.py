"""Fake-quantization modules built from `mpq.quant.primitives`.

- `WeightQuantizer`: per-channel symmetric (narrow range) weights at 2..8 bits (`weight_range`).
- `ActQuantizer`: per-tensor activations, unsigned when calibration saw no negative value,
  else signed over the full range.
- `QuantConv` / `QuantLinear`: a layer with its weight quantizer and, for a conv followed by
  BatchNorm, the BN folded in: the conv runs with the quantized *folded* weight, which is exactly
  what export stores. The layer's input is quantized by a standalone `ActQuantizer` that
  `prepare_qat` puts on the tensor (shared with the tensor's other quantized consumers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import (fake_quantize, grad_scale, mse_optimal_scale, quant_range, round_ste,
                         weight_range)

__all__ = ["ActQuantizer", "QuantConv", "QuantLinear", "WeightQuantizer",
           "full_range_int8_weights_", "oscillation_step"]

SCALE_MODES = ("mse", "max", "lsq", "fixed")
# Momentum of the moving averages that find oscillating weights (a window of ~100 steps).
OSCILLATION_MOMENTUM = 0.01
WEIGHT_STES = ("clip", "identity")


@torch.no_grad()
def oscillation_step(k: torch.Tensor, last: torch.Tensor, direction: torch.Tensor):
    """One reading of integer weights `k` after `last`, whose last changes went `direction`
    (-1, 0, 1): returns (changed, oscillated: changed back the way it came, the new
    directions, in `direction`'s dtype)."""
    step = k - last
    changed = step != 0
    sign = torch.sign(step).to(direction.dtype)
    return changed, changed & (sign == -direction), torch.where(changed, sign, direction)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric fake quantizer for a weight (C_out, ...).

    Args:
        bits: 2..8.
        channels: number of output channels.
        mode: `mse` (MSE-optimal clipping ratio per channel, re-searched every
            `refresh_every` training steps, applied to the current max |w| every call; a
            training step is a call in training mode with gradients on),
            `max` (max |w| per channel, every call) or `lsq` (a learned step size, LSQ-style,
            initialised MSE-optimally on first use; see `compute_scale`'s `unit` for convs with
            a live BN) or `fixed` (the stored scale as it is: a
            model rebuilt from an export, whose weights already lie on their grid).
        refresh_every: training steps between two searches of the MSE-optimal ratio (the
            search costs ~40 quantizations of the weight; weights move slowly in QAT).
        ste: `clip` (the gradient stops at weights beyond the clipping range) or `identity`
            (it reaches every weight, as in TWN and TTQ; `mse` and `max` scales only).
        freeze_threshold: > 0 freezes oscillating weights (Nagel et al. 2022's iterative
            freezing): in training, each weight's integer is tracked, and once the moving
            average (momentum `OSCILLATION_MOMENTUM`) of how often it changes back the way it
            came exceeds this, the weight keeps the integer it has mostly had, and its latent
            value gets no more gradient. Needs `shape`, the weight's shape. 0: off.
    """

    def __init__(self, bits: int, channels: int, *, mode: str = "mse", refresh_every: int = 100,
                 ste: str = "clip", freeze_threshold: float = 0.0,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        if mode not in SCALE_MODES:
            raise ValueError(f"weight scale mode must be one of {SCALE_MODES}, got {mode!r}")
        if ste not in WEIGHT_STES:
            raise ValueError(f"weight STE must be one of {WEIGHT_STES}, got {ste!r}")
        if ste == "identity" and mode == "lsq":
            raise ValueError("an identity weight STE needs an mse or max scale, not lsq")
        self.bits, self.mode, self.refresh_every, self.ste = bits, mode, refresh_every, ste
        # False holds the `mse` ratio where it is (QAT's last epochs, `hold_ratio`): set by
        # the trainer each epoch, so it is not stored.
        self.refreshing = True
        self.qmin, self.qmax = weight_range(bits)
        self.scale = nn.Parameter(torch.zeros(channels), requires_grad=mode == "lsq")
        self.register_buffer("ratio", torch.ones(channels))
        self.register_buffer("steps", torch.tensor(0))
        self.register_buffer("initialized", torch.tensor(False))
        self.freeze_threshold = freeze_threshold
        if freeze_threshold:
            if not 0 < freeze_threshold < 1 or shape is None or shape[0] != channels:
                raise ValueError("freezing oscillations needs a threshold in (0, 1) and the "
                                 "weight's shape")
            # The integer each weight had last step, the direction of its last change, how
            # often it oscillates and the integer it mostly has (moving averages); which
            # weights are frozen, at which integer.
            self.register_buffer("osc_int", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("osc_dir", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("osc_freq", torch.zeros(shape))
            self.register_buffer("int_mean", torch.zeros(shape))
            self.register_buffer("frozen", torch.zeros(shape, dtype=torch.bool))
            self.register_buffer("frozen_int", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("tracking", torch.tensor(False))

    @torch.no_grad()
    def refresh_ratio(self, w: torch.Tensor) -> None:
        """Searches the MSE-optimal clipping ratio of each channel of `w` now (`mse` mode)."""
        top = w.abs().flatten(1).amax(1).clamp_min(1e-8)
        self.ratio.copy_(mse_optimal_scale(w, self.qmin, self.qmax, dim=0).flatten()
                         * self.qmax / top)

    def compute_scale(self, w: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
        """The scale used for `w`, shaped (C, 1, ...) to broadcast against it.

        `unit` (C,): a per-channel factor `w` carries that the learned (lsq) scale should not,
        such as a live BN's fold factor: the scale is learned for `w / unit` and applied as
        `scale * unit`, so the grid each weight falls on does not move with BN's statistics.
        The other modes are scale-equivariant per channel and ignore it.
        """
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.mode == "fixed":
            return self.scale.detach().reshape(shape)
        if self.mode == "lsq":
            unit = torch.ones(()) if unit is None else unit.detach().reshape(shape)
            if not bool(self.initialized):
                with torch.no_grad():
                    self.scale.copy_(mse_optimal_scale(w.detach() / unit, self.qmin, self.qmax,
                                                       dim=0).flatten())
                    self.initialized.fill_(True)
            g = 1.0 / math.sqrt(w[0].numel() * self.qmax)
            return grad_scale(self.scale.abs().clamp_min(1e-8), g).reshape(shape) * unit
        # A training step is a call that trains: a read under no_grad (logging, BN re-estimation)
        # neither counts nor refreshes, so reading the grid cannot move training's refreshes.
        step = self.training and torch.is_grad_enabled()
        with torch.no_grad():
            w = w.detach()
            if self.mode == "mse" and (not bool(self.initialized) or (
                    step and self.refreshing and int(self.steps) % self.refresh_every == 0)):
                self.refresh_ratio(w)
                self.initialized.fill_(True)
            if step:
                self.steps += 1
            top = w.abs().flatten(1).amax(1).clamp_min(1e-8)
            scale = (top * self.ratio if self.mode == "mse" else top) / self.qmax
            self.scale.copy_(scale)  # kept for export and logging
        return scale.reshape(shape)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`w` on its grid at `scale` (from `compute_scale`), with this quantizer's STE; a
        frozen weight at its frozen integer, with no gradient to its latent value."""
        if self.freeze_threshold and self.training and torch.is_grad_enabled():
            self._track_oscillations(w.detach(), scale.detach())
        out = fake_quantize(w, scale, self.qmin, self.qmax, clip_grad=self.ste == "clip")
        if self.freeze_threshold:  # one pass, and no host sync to ask whether any is frozen
            out = torch.where(self.frozen, self.frozen_int.to(out.dtype) * scale, out)
        return out

    @torch.no_grad()
    def integers(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The integers `quantize` puts `w` on (float), frozen weights at their integer."""
        k = torch.clamp(torch.round(w / scale), self.qmin, self.qmax)
        if self.freeze_threshold:
            k = torch.where(self.frozen, self.frozen_int.to(k.dtype), k)
        return k

    @torch.no_grad()
    def _track_oscillations(self, w: torch.Tensor, scale: torch.Tensor) -> None:
        k = torch.clamp(torch.round(w.float() / scale.float()), self.qmin, self.qmax)
        m = OSCILLATION_MOMENTUM
        if not bool(self.tracking):
            self.osc_int.copy_(k)
            self.int_mean.copy_(k)
            self.tracking.fill_(True)
            return
        _, oscillated, direction = oscillation_step(k, self.osc_int, self.osc_dir)
        self.osc_freq.mul_(1 - m).add_(oscillated.float(), alpha=m)
        self.osc_dir.copy_(direction)
        self.osc_int.copy_(k)
        self.int_mean.mul_(1 - m).add_(k, alpha=m)
        new = (self.osc_freq > self.freeze_threshold) & ~self.frozen
        target = torch.clamp(torch.round(self.int_mean), self.qmin, self.qmax)
        self.frozen_int.copy_(torch.where(new, target.to(torch.int8), self.frozen_int))
        self.frozen |= new

    def frozen_fraction(self) -> float:
        """The share of this weight's values frozen (0 without freezing)."""
        return float(self.frozen.float().mean()) if self.freeze_threshold else 0.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantize(w, self.compute_scale(w))

    def hold_ratio(self, hold: bool = True) -> None:
        """Stops (or restarts) the `mse` ratio's regular refreshes; steps still count, and the
        scale still follows max |w| every call. A refresh moves the grid under weights that
        had settled on it: held for QAT's last epochs, they settle on one that stays."""
        self.refreshing = not hold

    def set_bits(self, bits: int) -> None:
        """Moves the weight to a `bits`-bit grid (progressive lowering in QAT). Nothing stored
        changes, so a run resumed from a checkpoint computes what it did: `max` scales follow at
        once, the `mse` clipping ratio at its next regular refresh (`refresh_every` steps); a
        learned `lsq` scale is in steps of the old grid and is refused."""
        if self.mode not in ("mse", "max"):
            raise ValueError(f"a {self.mode!r} weight scale cannot move to another grid")
        if self.freeze_threshold:
            raise ValueError("frozen weights hold integers of one grid: they cannot move to "
                             "another")
        self.bits = bits
        self.qmin, self.qmax = weight_range(bits)

    def extra_repr(self) -> str:
        frozen = f", freeze_threshold={self.freeze_threshold}" if self.freeze_threshold else ""
        return f"bits={self.bits}, mode={self.mode}, ste={self.ste}{frozen}"


def full_range_int8_weights_(model: nn.Module) -> None:
    """Puts every 8-bit weight quantizer on the full [-127, 127] grid of files and checkpoints
    written before 8-bit weights kept within +-INT8_WEIGHT_MAX: they then compute what they were
    trained to (and the export refuses them, as their int8 kernels can saturate)."""
    for m in model.modules():
        if isinstance(m, WeightQuantizer) and m.bits == 8:
            m.qmin, m.qmax = quant_range(8, signed=True)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with a scale set by calibration.

    While `calibrating` is set it passes values through and records them; `finish_calibration`
    then picks unsigned (all values >= 0, e.g. after a ReLU) or signed and the MSE-optimal
    scale. With `learn_scale` the scale is a parameter trained with the LSQ gradient.
    """

    def __init__(self, bits: int = 8, *, learn_scale: bool = False,
                 max_samples: int = 1 << 20):
        super().__init__()
        self.bits, self.learn_scale, self.max_samples = bits, learn_scale, max_samples
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=learn_scale)
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("calibrated", torch.tensor(False))
        self.calibrating = False
        self._samples: list[torch.Tensor] = []
        self._min, self._max = math.inf, -math.inf

    @property
    def qrange(self) -> tuple[int, int]:
        """[0, 2^b - 1] unsigned; full-range [-2^(b-1), 2^(b-1) - 1] signed, which int8 runtimes
        hold exactly as unsigned values with zero point 2^(b-1) (their fast u8 x s8 kernels)."""
        if bool(self.signed):
            return -2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return quant_range(self.bits, signed=False)

    def start_calibration(self) -> None:
        self.calibrating, self._samples = True, []
        self._min, self._max = math.inf, -math.inf

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if not self._samples:
            raise RuntimeError("ActQuantizer saw no data during calibration")
        samples = torch.cat(self._samples)
        # The extremes join the sample so the clipping search sees the real range.
        samples = torch.cat([samples, torch.tensor([self._min, self._max])])
        self.signed.fill_(self._min < 0)
        qmin, qmax = self.qrange
        self.scale.copy_(mse_optimal_scale(samples, qmin, qmax))
        self.calibrated.fill_(True)
        self.calibrating, self._samples = False, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            flat = x.detach().flatten().float()
            self._min = min(self._min, flat.min().item())
            self._max = max(self._max, flat.max().item())
            step = max(1, flat.numel() // (self.max_samples // 16))
            self._samples.append(flat[::step].cpu())
            return x
        if not bool(self.calibrated):
            raise RuntimeError("ActQuantizer used before calibration; call mpq.quant.calibrate_")
        qmin, qmax = self.qrange
        x = x.float()  # under autocast, activations arrive in bf16/fp16: round in float32
        if self.learn_scale:
            scale = grad_scale(self.scale.abs().clamp_min(1e-8),
                               1.0 / math.sqrt(x[0].numel() * qmax))
            return fake_quantize(x, scale, qmin, qmax)
        return fake_quantize(x, self.scale.detach(), qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learn_scale={self.learn_scale}"


class _QuantLayer(nn.Module):
    """Shared parts: the float layer's parameters and a weight quantizer. `a_bits` records the
    bits of the input, which a standalone `ActQuantizer` in the graph quantizes; `prepare_qat`
    links that quantizer here (`input_quants[call]`) so that the bias, like an int8 kernel's,
    lies on the int32 grid of step input_scale * weight_scale (per output channel). A layer the
    model calls more than once has one weight and quantizer, and an input quantizer per call:
    the graph passes `call` (0, 1, ...) to each."""

    def __init__(self, layer: nn.Module, w_bits: int | None, a_bits: int | None, *,
                 weight_scale: str, weight_ste: str = "clip", freeze_threshold: float = 0.0):
        super().__init__()
        self.layer = layer
        self.w_bits, self.a_bits = w_bits, a_bits
        shape = tuple(layer.weight.shape)
        self.weight_quant = (WeightQuantizer(w_bits, shape[0], mode=weight_scale,
                                             ste=weight_ste, freeze_threshold=freeze_threshold,
                                             shape=shape)
                             if w_bits is not None else None)
        # Plain attributes, not submodules: the quantizers belong to the graph (and the state
        # dict) once; deepcopy keeps the links to the copied quantizers.
        self.__dict__["input_quants"] = []

    @property
    def input_quant(self) -> ActQuantizer | None:
        """The first call's input quantizer (None: float input)."""
        return self.input_quants[0] if self.input_quants else None

    def link_input_quant(self, quantizer: ActQuantizer, call: int = 0) -> None:
        quants = self.input_quants
        quants.extend([None] * (call + 1 - len(quants)))
        quants[call] = quantizer

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.quant_weight_bias(w, None)[0]

    def quant_weight_bias(self, w: torch.Tensor, bias: torch.Tensor | None, call: int = 0):
        """The quantized weight and the bias on call `call`'s int32 grid (float where nothing
        is quantized). The weight's scale is computed once, as each call may advance it."""
        if self.weight_quant is None:
            return w, bias
        q = self.weight_quant
        scale = q.compute_scale(w, self.scale_unit())
        wq = q.quantize(w, scale)
        step = self.bias_step(scale, call)
        if bias is None or step is None:
            return wq, bias
        return wq, round_ste(bias / step) * step

    def scale_unit(self) -> torch.Tensor | None:
        """The per-channel factor the quantized weight carries beyond the layer's own weight
        (see `WeightQuantizer.compute_scale`); None: none."""
        return None

    def bias_step(self, weight_scale: torch.Tensor, call: int = 0) -> torch.Tensor | None:
        """Per-channel step of call `call`'s bias grid: its input scale x weight scale (None:
        float bias)."""
        q = self.input_quants[call] if call < len(self.input_quants) else None
        if q is None or not bool(q.calibrated):
            return None
        return weight_scale.detach().flatten() * q.scale.detach().abs()

    def effective_weight(self) -> torch.Tensor:
        """The float weight the quantizer sees (folded with BN where there is one)."""
        return self.layer.weight

    @torch.no_grad()
    def weight_error(self, w: torch.Tensor | None = None,
                     quantized: torch.Tensor | None = None) -> float:
        """Relative quantization error ||Q(W) - W|| / ||W|| of the effective weight (or of the
        `w` and `quantized` the caller already has)."""
        w = self.effective_weight() if w is None else w
        quantized = self.quant_weight(w) if quantized is None else quantized
        return ((quantized - w).norm() / w.norm().clamp_min(1e-12)).item()


class QuantLinear(_QuantLayer):
    """`nn.Linear` with quantized weight and input."""

    def forward(self, x, call: int = 0):
        w, b = self.quant_weight_bias(self.layer.weight, self.layer.bias, call)
        return F.linear(x, w, b)

    def folded_bias(self) -> torch.Tensor | None:
        return self.layer.bias


class QuantConv(_QuantLayer):
    """`nn.Conv1d`/`nn.Conv2d` with quantized weight and input, and optionally a folded BN.

    With BN, the weight quantized is `W * gamma / sqrt(running_var + eps)`, per output channel.
    While BN statistics are live (training, before `freeze_bn_`), the conv output is divided by
    that factor again and normalised with the batch statistics, so BN keeps learning its
    statistics (as in Jacob et al. 2018 and torch.ao's ConvBn); in eval mode the layer computes
    `conv(x, Q(W_fold)) + b_fold`. `freeze_bn_` folds BN into the weight for good: from then on
    the conv weight *is* W_fold and BN's bias *is* b_fold, trained directly (not gamma through a
    fixed 1/sqrt(running_var), which blows up on channels of small variance).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module | None, w_bits, a_bits, *, weight_scale,
                 weight_ste: str = "clip", freeze_threshold: float = 0.0):
        super().__init__(conv, w_bits, a_bits, weight_scale=weight_scale, weight_ste=weight_ste,
                         freeze_threshold=freeze_threshold)
        self.bn = bn
        self.register_buffer("bn_frozen", torch.tensor(False))

    def _bn_factor(self) -> torch.Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def scale_unit(self) -> torch.Tensor | None:
        """The fold factor while BN is live: every weight this layer quantizes carries it."""
        if self.bn is None or bool(self.bn_frozen):
            return None
        return self._bn_factor().detach()

    def effective_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if self.bn is None or bool(self.bn_frozen):
            return w
        return w * self._bn_factor().reshape((-1,) + (1,) * (w.dim() - 1))

    def folded_bias(self) -> torch.Tensor | None:
        """The bias of the folded layer (None for a conv without BN or bias)."""
        bias = self.layer.bias
        if self.bn is None:
            return bias
        if bool(self.bn_frozen):
            return self.bn.bias
        factor = self._bn_factor()
        folded = self.bn.bias - factor * self.bn.running_mean
        return folded + factor * bias if bias is not None else folded

    @torch.no_grad()
    def freeze_bn_(self) -> None:
        """Folds BN into the conv weight and BN's bias; idempotent."""
        if self.bn is None or bool(self.bn_frozen):
            self.bn_frozen.fill_(True)
            return
        bias = self.folded_bias()
        if self.weight_quant is not None and self.weight_quant.mode == "lsq":
            self.weight_quant.scale.mul_(self._bn_factor())  # the fold is the weight's now
        self.layer.weight.copy_(self.effective_weight())
        self.bn.bias.copy_(bias)
        self.bn.weight.requires_grad_(False)
        if self.layer.bias is not None:
            self.layer.bias.zero_()
            self.layer.bias.requires_grad_(False)
        self.bn_frozen.fill_(True)

    def forward(self, x, call: int = 0):
        if self.bn is None:
            return self.layer._conv_forward(x, *self.quant_weight_bias(self.layer.weight,
                                                                       self.layer.bias, call))
        if not self.training or bool(self.bn_frozen):
            w, b = self.quant_weight_bias(self.effective_weight(), self.folded_bias(), call)
            out = self.layer._conv_forward(x, w, None)
            return out + b.reshape((1, -1) + (1,) * (out.dim() - 2))
        # Live BN: fold, quantize, undo the fold, convolve, normalise with batch statistics.
        # The fold factor is a constant here: without quantization its two uses cancel, so
        # gamma's true gradient comes from batch_norm alone (and the backward stays cheap).
        # Undoing the fold on the weight rather than on the conv's output is the same linear
        # map (conv(x, Q(W f)) / f = conv(x, Q(W f) / f) per output channel) at a cost of
        # one pass over the weight instead of two over the activation (forward and backward).
        w = self.layer.weight
        factor = self._bn_factor().detach().reshape((-1,) + (1,) * (w.dim() - 1))
        out = self.layer._conv_forward(x, self.quant_weight(w * factor) / factor, None)
        if self.layer.bias is not None:
            out = out + self.layer.bias.reshape((1, -1) + (1,) * (out.dim() - 2))
        bn = self.bn
        return F.batch_norm(out, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            training=True, momentum=bn.momentum if bn.momentum is not None
                            else 0.1, eps=bn.eps)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, bn_folded={self.bn is not None}"
